"""Signing keys for tests: both algorithms, deterministic Ed25519 pairs written as `kolm signing generate`
writes them, and the environment of a node that signs (compiles) or only verifies."""

from __future__ import annotations

import hashlib
import hmac
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.serialization import Encoding, NoEncryption, PrivateFormat, PublicFormat

ALGS = ("hmac-sha256", "ed25519")
HMAC_KEY = "signing-tests-hmac-key-0123456789"  # tests only


def ed25519_key(seed: int) -> Ed25519PrivateKey:
    """The same key for the same seed, so that artifacts built at import time match the fixtures' keys."""
    return Ed25519PrivateKey.from_private_bytes(hashlib.sha256(f"kolm-tests-{seed}".encode()).digest())


def ed25519_key_id(key: Ed25519PrivateKey) -> str:
    raw = key.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)
    return hashlib.sha256(raw).hexdigest()[:16]


def hmac_key_id(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()[:16]


def write_pair(directory: Path, seed: int, name: str = "kolm-signing") -> tuple[Path, Path]:
    """(private key file, public key file) for seed, PEM like `kolm signing generate` writes."""
    key = ed25519_key(seed)
    directory.mkdir(parents=True, exist_ok=True)
    private, public = directory / f"{name}.key", directory / f"{name}.pub"
    private.write_bytes(key.private_bytes(Encoding.PEM, PrivateFormat.PKCS8, NoEncryption()))
    private.chmod(0o600)
    public.write_bytes(key.public_key().public_bytes(Encoding.PEM, PublicFormat.SubjectPublicKeyInfo))
    return private, public


def sign(alg: str, body: bytes, seed: int = 1, hmac_key: str = HMAC_KEY) -> bytes:
    """The hex signature a holder of the test key makes over `body`."""
    if alg == "ed25519":
        return ed25519_key(seed).sign(body).hex().encode()
    return hmac.new(hmac_key.encode(), body, hashlib.sha256).hexdigest().encode()


def key_id(alg: str, seed: int = 1, hmac_key: str = HMAC_KEY) -> str:
    return ed25519_key_id(ed25519_key(seed)) if alg == "ed25519" else hmac_key_id(hmac_key)


def verifying_node(monkeypatch, alg: str, tmp: Path, seed: int = 1) -> None:
    """The environment of a node that only verifies `alg` artifacts of the test key: for Ed25519 only the
    public key (KOLM_TRUSTED_KEYS), no secret of any kind; for HMAC the shared key."""
    monkeypatch.delenv("KOLM_SIGNING_KEY_FILE", raising=False)
    if alg == "ed25519":
        _, public = write_pair(tmp / f"keys-{seed}", seed)
        monkeypatch.setenv("KOLM_TRUSTED_KEYS", str(public))
        monkeypatch.delenv("KOLM_SIGNING_KEY", raising=False)
    else:
        monkeypatch.setenv("KOLM_SIGNING_KEY", HMAC_KEY)
        monkeypatch.delenv("KOLM_TRUSTED_KEYS", raising=False)


def signing_node(monkeypatch, alg: str, tmp: Path, seed: int = 1) -> None:
    """A node that compiles `alg` artifacts with the test key (and so also verifies them)."""
    verifying_node(monkeypatch, alg, tmp, seed)
    if alg == "ed25519":
        private, _ = write_pair(tmp / f"keys-{seed}", seed)
        monkeypatch.setenv("KOLM_SIGNING_KEY_FILE", str(private))
