"""Who signs a .kolm and whose signatures a node accepts: Ed25519 key pairs, or the older shared HMAC key.

    kolm signing generate --out keys/       # keys/kolm-signing.key (0600) + keys/kolm-signing.pub
    kolm signing status                     # what this node signs with and which keys it trusts (JSON)

Signing (pack, on the nodes that compile):
    KOLM_SIGNING_KEY_FILE set -> Ed25519 with that private key (PEM PKCS#8, as `generate` writes it)
    otherwise                 -> HMAC-SHA256 with settings.signing_key() (KOLM_SIGNING_KEY, else
                                 $KOLM_HOME/signing.key, created on first use: signing may make a key)
Verifying (verify and open, on every node):
    "ed25519"     -> the public key whose id the manifest names, among KOLM_TRUSTED_KEYS (a .pub file, or
                     a directory of .pub files) and this node's own KOLM_SIGNING_KEY_FILE; an id not among
                     them is exit 4 naming it. Two trusted keys at once is how a key is rotated.
    "hmac-sha256" -> settings.hmac_key(), never created here: a verifier without a key says what to set.

A key id is the first 16 hex characters of the SHA-256 of the key: for Ed25519 of its 32 raw public-key
bytes (RFC 8032's encoding; `openssl pkey -pubin -outform DER | tail -c 32 | sha256sum` gives the same
bytes' hash), for HMAC of the secret itself (as before). Verifying nodes need no secret at all.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import re
import sys
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kolm_ray.errors import ArtifactError, KolmError
from kolm_ray.settings import hmac_key, signing_key

HMAC_SHA256 = "hmac-sha256"
ED25519 = "ed25519"
ALGS = (HMAC_SHA256, ED25519)
HEX_LENGTH = {HMAC_SHA256: 64, ED25519: 128}  # a 32-byte MAC, a 64-byte Ed25519 signature, in hex
PRIVATE_NAME, PUBLIC_NAME = "kolm-signing.key", "kolm-signing.pub"
MAX_KEY_FILE_BYTES = 64 << 10  # a PEM key is ~120 bytes; a bundle of a few hundred keys still fits
MAX_TRUSTED_FILES = 1000  # .pub files read from a KOLM_TRUSTED_KEYS directory
_PEM_PUBLIC = re.compile(rb"-----BEGIN PUBLIC KEY-----\s.*?-----END PUBLIC KEY-----", re.S)


def key_id(public_key: Any) -> str:
    """An Ed25519 public key's id: the first 16 hex characters of the SHA-256 of its 32 raw bytes."""
    from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

    return hashlib.sha256(public_key.public_bytes(Encoding.Raw, PublicFormat.Raw)).hexdigest()[:16]


# ---- signing -----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Signer:
    """What pack signs with: the algorithm, the key's id, and a function from manifest bytes to hex."""

    alg: str
    key_id: str
    sign: Callable[[bytes], str]


def _read_key_file(path: Path, what: str) -> bytes:
    try:
        size = path.stat().st_size
        if size > MAX_KEY_FILE_BYTES:
            raise KolmError(f"{what} {path} is {size} bytes; a key file is at most {MAX_KEY_FILE_BYTES}")
        return path.read_bytes()
    except FileNotFoundError:
        raise KolmError(f"{what} {path}: no such file") from None
    except IsADirectoryError:
        raise KolmError(f"{what} {path} is a directory; name the key file") from None
    except OSError as e:
        raise KolmError(f"cannot read {what} {path}: {e.strerror or e}") from None


def load_private_key(path: str | Path) -> Any:
    """The Ed25519 private key in `path` (unencrypted PEM), or KolmError (exit 2) saying what is wrong."""
    from cryptography.exceptions import UnsupportedAlgorithm
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
    from cryptography.hazmat.primitives.serialization import load_pem_private_key

    path = Path(path).expanduser()
    data = _read_key_file(path, "KOLM_SIGNING_KEY_FILE")
    try:
        key = load_pem_private_key(data, password=None)
    except TypeError:  # cryptography's word for "encrypted, and no password given"
        raise KolmError(
            f"KOLM_SIGNING_KEY_FILE {path} is encrypted; kolm reads an unencrypted key file kept 0600"
        ) from None
    except (ValueError, UnsupportedAlgorithm):
        raise KolmError(
            f"KOLM_SIGNING_KEY_FILE {path} is not a PEM private key "
            "(make a key pair with: kolm signing generate --out DIR)"
        ) from None
    if not isinstance(key, Ed25519PrivateKey):
        raise KolmError(
            f"KOLM_SIGNING_KEY_FILE {path} holds a {type(key).__name__.lstrip('_')}; kolm signs with "
            "Ed25519 (make a key pair with: kolm signing generate --out DIR)"
        )
    return key


def _signing_key_file() -> Path | None:
    value = os.environ.get("KOLM_SIGNING_KEY_FILE")
    if value is None:
        return None
    if not value.strip():
        raise KolmError("KOLM_SIGNING_KEY_FILE is set but empty; name a private key file or unset it")
    return Path(value).expanduser()


def signing_alg() -> str:
    """The algorithm pack will sign with here; an Ed25519 key file is read and checked (exit 2 when bad),
    and nothing is created: compile calls this before it trains, so a bad key fails in seconds."""
    path = _signing_key_file()
    if path is None:
        return HMAC_SHA256
    load_private_key(path)
    return ED25519


def signer() -> Signer:
    """The key pack signs with: KOLM_SIGNING_KEY_FILE's Ed25519 key, else the HMAC key (made on first use)."""
    path = _signing_key_file()
    if path is not None:
        private = load_private_key(path)
        return Signer(ED25519, key_id(private.public_key()), lambda body: private.sign(body).hex())
    key, kid = signing_key()
    return Signer(HMAC_SHA256, kid, lambda body: hmac.new(key, body, hashlib.sha256).hexdigest())


# ---- trusting ----------------------------------------------------------------------------------------------


def load_public_keys(path: str | Path) -> dict[str, tuple[Any, str]]:
    """key id -> (Ed25519 public key, the file it came from), from one .pub file (one or more PEM public
    keys) or a directory of .pub files. Anything unreadable or not Ed25519: KolmError naming the file."""
    from cryptography.exceptions import UnsupportedAlgorithm
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
    from cryptography.hazmat.primitives.serialization import load_pem_public_key

    path = Path(path).expanduser()
    if path.is_dir():
        try:
            files = sorted(p for p in path.iterdir() if p.suffix == ".pub" and p.is_file())
        except OSError as e:  # not "a corrupt artifact": the node's own key directory cannot be listed
            raise KolmError(f"cannot read KOLM_TRUSTED_KEYS {path}: {e.strerror or e}") from None
        if not files:
            raise KolmError(f"KOLM_TRUSTED_KEYS {path} holds no .pub files")
        if len(files) > MAX_TRUSTED_FILES:
            raise KolmError(
                f"KOLM_TRUSTED_KEYS {path} holds {len(files)} .pub files, over {MAX_TRUSTED_FILES}"
            )
    elif path.exists():
        files = [path]
    else:
        raise KolmError(f"KOLM_TRUSTED_KEYS {path}: no such file or directory")
    keys: dict[str, tuple[Any, str]] = {}
    for file in files:
        blocks = _PEM_PUBLIC.findall(_read_key_file(file, "KOLM_TRUSTED_KEYS"))
        if not blocks:
            raise KolmError(
                f"KOLM_TRUSTED_KEYS {file} holds no PEM public key (-----BEGIN PUBLIC KEY-----, "
                "as kolm signing generate writes it)"
            )
        for block in blocks:
            try:
                public = load_pem_public_key(block)
            except (ValueError, UnsupportedAlgorithm):
                raise KolmError(f"KOLM_TRUSTED_KEYS {file} holds a malformed PEM public key") from None
            if not isinstance(public, Ed25519PublicKey):
                raise KolmError(
                    f"KOLM_TRUSTED_KEYS {file} holds a {type(public).__name__.lstrip('_')}; "
                    "kolm verifies Ed25519 keys only"
                )
            keys.setdefault(key_id(public), (public, str(file)))
    return keys


def trusted_keys() -> dict[str, tuple[Any, str]]:
    """The Ed25519 keys this node accepts: KOLM_TRUSTED_KEYS's, plus the public half of its own signing
    key (a node that compiles can always check what it just signed; it could sign anything anyway)."""
    keys: dict[str, tuple[Any, str]] = {}
    value = os.environ.get("KOLM_TRUSTED_KEYS")
    if value is not None:
        if not value.strip():
            raise KolmError("KOLM_TRUSTED_KEYS is set but empty; name a .pub file or a directory of them")
        keys.update(load_public_keys(value))
    own = _signing_key_file()
    if own is not None:
        public = load_private_key(own).public_key()
        keys.setdefault(key_id(public), (public, f"{own} (KOLM_SIGNING_KEY_FILE)"))
    return keys


def _clean(value: Any, limit: int = 32) -> str:
    """Untrusted text (a claimed key id) safe to echo: printable characters only, at most `limit`."""
    text = "".join(ch for ch in str(value) if ch.isprintable())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def check_signature(body: bytes, signature: bytes, manifest: dict[str, Any], where: str) -> None:
    """ArtifactError unless `signature` (hex, already matched against HEX_LENGTH's forms) signs `body`
    under the manifest's own signature_alg and key_id, with a key this node holds or trusts.

    The algorithm and key id are read from the manifest before it is trusted; both are inside the signed
    bytes, so changing either breaks the signature, and an HMAC key is never taken from a public key file
    (no algorithm confusion). Messages never hold ': ' after the path: the registry shows the last part.
    """
    alg, claimed = manifest.get("signature_alg"), manifest.get("key_id")
    if alg not in ALGS:
        raise ArtifactError(f"{where}: signature_alg {_clean(repr(alg))} is not {' or '.join(ALGS)}")
    kid = _clean(claimed) if isinstance(claimed, str) else _clean(repr(claimed))
    if len(signature) != HEX_LENGTH[alg]:
        raise ArtifactError(
            f"{where}: malformed signature (expected {HEX_LENGTH[alg]} hex characters for {alg})"
        )
    if alg == HMAC_SHA256:
        held = hmac_key()
        if held is None:
            raise ArtifactError(
                f"{where}: signed with HMAC key {kid} and this node has no HMAC key; set KOLM_SIGNING_KEY "
                "to the key it was signed with, or sign with Ed25519 (KOLM_SIGNING_KEY_FILE where it is "
                "compiled) and set KOLM_TRUSTED_KEYS here"
            )
        key, own_id = held
        expected = hmac.new(key, body, hashlib.sha256).hexdigest().encode()
        if not hmac.compare_digest(signature, expected):
            hint = f" (signed with key {kid}, this key is {own_id})" if claimed != own_id else ""
            raise ArtifactError(
                f"{where}: signature does not match; tampered or signed with another key{hint}"
            )
        return
    from cryptography.exceptions import InvalidSignature

    trusted = trusted_keys()
    if not trusted:
        raise ArtifactError(
            f"{where}: signed with ed25519 key {kid} and this node trusts no Ed25519 key; set "
            "KOLM_TRUSTED_KEYS to the signer's .pub file or a directory of .pub files"
        )
    if not isinstance(claimed, str) or claimed not in trusted:
        ids = ", ".join(sorted(trusted))
        raise ArtifactError(
            f"{where}: signed with key {kid}, which is not a trusted key (this node trusts {ids}); add its "
            ".pub file to KOLM_TRUSTED_KEYS to accept it"
        )
    try:
        trusted[claimed][0].verify(bytes.fromhex(signature.decode("ascii")), body)
    except InvalidSignature:
        raise ArtifactError(
            f"{where}: signature does not match; tampered or signed with another key (it names trusted "
            f"key {kid})"
        ) from None


# ---- kolm signing ------------------------------------------------------------------------------------------


def _write_new(path: Path, data: bytes, mode: int) -> None:
    """Write `path` with `mode` unless it exists: a private temporary file, fsync'd, then hard-linked to its
    name (link(2) fails when the name exists, so no key is ever replaced or read half written)."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            os.fchmod(f.fileno(), mode)
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        try:
            os.link(tmp, path)
        except FileExistsError:
            raise KolmError(
                f"{path} exists; kolm never overwrites a key (move it away or pick another --out)"
            ) from None
    finally:
        Path(tmp).unlink(missing_ok=True)


def generate(out: str | Path) -> dict[str, str]:
    """A new Ed25519 key pair in `out`: kolm-signing.key (0600, PEM PKCS#8) and kolm-signing.pub (0644, PEM
    SubjectPublicKeyInfo). Refuses (exit 2) when either exists; a failure leaves neither behind."""
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
    from cryptography.hazmat.primitives.serialization import (
        Encoding,
        NoEncryption,
        PrivateFormat,
        PublicFormat,
    )

    out = Path(out).expanduser()
    private_path, public_path = out / PRIVATE_NAME, out / PUBLIC_NAME
    for p in (private_path, public_path):
        if p.exists() or p.is_symlink():
            raise KolmError(f"{p} exists; kolm never overwrites a key (move it away or pick another --out)")
    try:
        out.mkdir(parents=True, exist_ok=True, mode=0o700)
    except OSError as e:
        raise KolmError(f"cannot create --out {out}: {e.strerror or e}") from None
    private = Ed25519PrivateKey.generate()
    public = private.public_key()
    _write_new(private_path, private.private_bytes(Encoding.PEM, PrivateFormat.PKCS8, NoEncryption()), 0o600)
    try:
        _write_new(public_path, public.public_bytes(Encoding.PEM, PublicFormat.SubjectPublicKeyInfo), 0o644)
    except BaseException:
        private_path.unlink(missing_ok=True)  # ours: made a moment ago, never handed out
        raise
    try:
        dir_fd = os.open(out, os.O_RDONLY)
        try:
            os.fsync(dir_fd)  # both names survive a crash
        finally:
            os.close(dir_fd)
    except OSError:
        pass
    return {
        "alg": ED25519,
        "key_id": key_id(public),
        "private_key": str(private_path),
        "public_key": str(public_path),
    }


def status() -> dict[str, Any]:
    """What this node signs with and which keys it accepts; reads keys, creates nothing."""
    path = _signing_key_file()
    held = hmac_key()
    signs: dict[str, Any]
    if path is not None:
        signs = {"alg": ED25519, "key_id": key_id(load_private_key(path).public_key()), "file": str(path)}
    elif held is not None:
        signs = {"alg": HMAC_SHA256, "key_id": held[1]}
    else:
        signs = {"alg": HMAC_SHA256, "key_id": None, "note": "a key is made in $KOLM_HOME on first compile"}
    return {
        "signs_with": signs,
        "trusted_ed25519": [{"key_id": k, "file": f} for k, (_, f) in sorted(trusted_keys().items())],
        "hmac_key_id": held[1] if held is not None else None,
    }


def signing_command(args) -> int:
    """kolm signing generate --out DIR | kolm signing status: make a key pair, or show this node's keys."""
    if args.action == "generate":
        made = generate(args.out)
        print(json.dumps(made))
        print(
            f"compile nodes: export KOLM_SIGNING_KEY_FILE={made['private_key']} (keep it 0600, on those "
            f"nodes only); every verifying node: KOLM_TRUSTED_KEYS={made['public_key']} (or a directory "
            "of .pub files)",
            file=sys.stderr,
        )
        return 0
    print(json.dumps(status(), indent=2))
    return 0
