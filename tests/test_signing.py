"""Ed25519 signing (issue 26): `kolm signing generate`, KOLM_SIGNING_KEY_FILE where artifacts are compiled,
KOLM_TRUSTED_KEYS where they are verified, rotation, untrusted keys (exit 4 naming the key id), a verifying
node with no key (one line saying what to set, and no key made up), HMAC artifacts beside Ed25519 ones, and
an artifact compiled in one process verified and run in another that holds only the public key."""

from __future__ import annotations

import hashlib
import json
import os
import stat
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
from compile_helpers import build_artifact_without_ray, compile_argv
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.hazmat.primitives.serialization import (
    BestAvailableEncryption,
    Encoding,
    NoEncryption,
    PrivateFormat,
    PublicFormat,
    load_pem_public_key,
)
from signing_helpers import HMAC_KEY, ed25519_key, ed25519_key_id, write_pair

from kolm_ray.artifact import pack, verify
from kolm_ray.cli import main
from kolm_ray.errors import ArtifactError, KolmError

REPO = Path(__file__).resolve().parent.parent


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def small_artifact(tmp: Path, name: str = "x") -> Path:
    """pack() a few files with whatever key the environment names."""
    staging = tmp / f"staging-{name}"
    staging.mkdir(parents=True)
    (staging / "model.safetensors").write_bytes(b"\x00" * 100)
    (staging / "config.json").write_text('{"a": 1}')
    out = tmp / f"{name}.kolm"
    pack(staging, out, {"name": name, "kind": "encoder-tagger", "spec": {}, "metrics": {}})
    return out


def error_line(capsys) -> str:
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: ") and "Traceback" not in err, err
    return err.strip()


# ---- kolm signing generate ---------------------------------------------------------------------------------


def test_generate_writes_a_key_pair_and_never_overwrites_one(tmp_path, capsys) -> None:
    out = tmp_path / "keys"
    assert main(["signing", "generate", "--out", str(out)]) == 0
    made = json.loads(capsys.readouterr().out)
    private, public = out / "kolm-signing.key", out / "kolm-signing.pub"
    assert made == {
        "alg": "ed25519",
        "key_id": made["key_id"],
        "private_key": str(private),
        "public_key": str(public),
    }
    assert mode(private) == 0o600 and mode(out) == 0o700
    assert private.read_bytes().startswith(b"-----BEGIN PRIVATE KEY-----")
    raw = load_pem_public_key(public.read_bytes()).public_bytes(Encoding.Raw, PublicFormat.Raw)
    assert len(raw) == 32 and made["key_id"] == hashlib.sha256(raw).hexdigest()[:16]
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    assert main(["signing", "generate", "--out", str(out)]) == 2
    assert (
        error_line(capsys)
        == f"error: {private} exists; kolm never overwrites a key (move it away or pick another --out)"
    )
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before  # untouched, no temporary file left
    private.unlink()  # only the public key left: still refused, and no private key appears
    assert main(["signing", "generate", "--out", str(out)]) == 2
    assert "kolm-signing.pub exists" in error_line(capsys) and sorted(os.listdir(out)) == ["kolm-signing.pub"]


def test_two_generated_keys_differ(tmp_path, capsys) -> None:
    ids = []
    for name in ("a", "b"):
        assert main(["signing", "generate", "--out", str(tmp_path / name)]) == 0
        ids.append(json.loads(capsys.readouterr().out)["key_id"])
    assert ids[0] != ids[1]


# ---- signing and trusting ----------------------------------------------------------------------------------


def test_signed_with_the_key_file_verified_with_the_public_key_only(
    tmp_path, monkeypatch, kolm_home, capsys
) -> None:
    private, public = write_pair(tmp_path / "keys", seed=1)
    monkeypatch.setenv("KOLM_SIGNING_KEY_FILE", str(private))
    artifact = small_artifact(tmp_path)
    monkeypatch.delenv("KOLM_SIGNING_KEY_FILE")
    monkeypatch.setenv("KOLM_TRUSTED_KEYS", str(public))
    m = verify(artifact)
    kid = ed25519_key_id(ed25519_key(1))
    assert m["signature_alg"] == "ed25519" and m["key_id"] == kid
    assert main(["verify", str(artifact)]) == 0
    assert f"signature valid (ed25519, key {kid})" in capsys.readouterr().out
    assert not (kolm_home / "signing.key").exists()  # no HMAC key made for either step


def test_rotation_two_trusted_keys_both_verify_a_third_is_exit_4_naming_it(
    tmp_path, monkeypatch, capsys
) -> None:
    trusted = tmp_path / "trusted"
    artifacts = {}
    for seed in (1, 2, 3):
        private, _ = write_pair(tmp_path / f"k{seed}", seed)
        monkeypatch.setenv("KOLM_SIGNING_KEY_FILE", str(private))
        artifacts[seed] = small_artifact(tmp_path, f"a{seed}")
    monkeypatch.delenv("KOLM_SIGNING_KEY_FILE")
    write_pair(trusted, 1, name="old")  # the directory form: every .pub in it; other files are ignored
    write_pair(trusted, 2, name="new")
    (trusted / "old.key").unlink(), (trusted / "new.key").unlink()
    (trusted / "README").write_text("not a key")
    monkeypatch.setenv("KOLM_TRUSTED_KEYS", str(trusted))
    assert verify(artifacts[1])["key_id"] == ed25519_key_id(ed25519_key(1))
    assert verify(artifacts[2])["key_id"] == ed25519_key_id(ed25519_key(2))
    assert main(["verify", str(artifacts[3])]) == 4
    ids = sorted(ed25519_key_id(ed25519_key(s)) for s in (1, 2))
    third = ed25519_key_id(ed25519_key(3))
    assert error_line(capsys) == (
        f"error: {artifacts[3]}: signed with key {third}, which is not a trusted key (this node trusts "
        f"{ids[0]}, {ids[1]}); add its .pub file to KOLM_TRUSTED_KEYS to accept it"
    )
    # the file form: one .pub holding both PEM blocks (a bundle) works the same
    bundle = tmp_path / "bundle.pub"
    bundle.write_bytes((trusted / "old.pub").read_bytes() + b"\n" + (trusted / "new.pub").read_bytes())
    monkeypatch.setenv("KOLM_TRUSTED_KEYS", str(bundle))
    assert verify(artifacts[1]) and verify(artifacts[2])
    with pytest.raises(ArtifactError, match=f"signed with key {third}, which is not a trusted key"):
        verify(artifacts[3])


def test_hmac_and_ed25519_artifacts_verify_side_by_side(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("KOLM_SIGNING_KEY", HMAC_KEY)
    old = small_artifact(tmp_path, "old")
    private, public = write_pair(tmp_path / "keys", 1)
    monkeypatch.setenv("KOLM_SIGNING_KEY_FILE", str(private))  # the Ed25519 key wins for signing
    new = small_artifact(tmp_path, "new")
    monkeypatch.delenv("KOLM_SIGNING_KEY_FILE")
    monkeypatch.setenv("KOLM_TRUSTED_KEYS", str(public))
    assert verify(old)["signature_alg"] == "hmac-sha256" and verify(new)["signature_alg"] == "ed25519"
    monkeypatch.delenv("KOLM_SIGNING_KEY")  # a node without the HMAC key keeps only the Ed25519 artifacts
    assert verify(new)
    with pytest.raises(ArtifactError, match="this node has no HMAC key; set KOLM_SIGNING_KEY"):
        verify(old)


@pytest.mark.parametrize("alg", ["hmac-sha256", "ed25519"])
def test_a_node_with_no_key_says_what_to_set_and_makes_none(alg, tmp_path, monkeypatch, capsys) -> None:
    """The bug of issue 26: a verifier without KOLM_SIGNING_KEY made a random key and refused everything."""
    if alg == "ed25519":
        monkeypatch.setenv("KOLM_SIGNING_KEY_FILE", str(write_pair(tmp_path / "keys", 1)[0]))
    else:
        monkeypatch.setenv("KOLM_SIGNING_KEY", HMAC_KEY)
    artifact = small_artifact(tmp_path)
    monkeypatch.delenv("KOLM_SIGNING_KEY_FILE", raising=False)
    monkeypatch.delenv("KOLM_SIGNING_KEY", raising=False)
    fresh = tmp_path / "fresh-home"  # not even created: verifying writes nothing
    monkeypatch.setenv("KOLM_HOME", str(fresh))
    for command in ("verify", "run"):
        assert main([command, str(artifact), *(["hi"] if command == "run" else [])]) == 4
        line = error_line(capsys)
        if alg == "ed25519":
            assert line.endswith(
                f"signed with ed25519 key {ed25519_key_id(ed25519_key(1))} and this node trusts no Ed25519 "
                "key; set KOLM_TRUSTED_KEYS to the signer's .pub file or a directory of .pub files"
            )
        else:
            assert (
                "signed with HMAC key " in line and "this node has no HMAC key; set KOLM_SIGNING_KEY" in line
            )
    assert not fresh.exists()


@pytest.mark.parametrize(
    ("setup", "message"),
    [
        (lambda d: d / "nope.pub", "KOLM_TRUSTED_KEYS {d}/nope.pub: no such file or directory"),
        (lambda d: (d / "empty").mkdir() or d / "empty", "KOLM_TRUSTED_KEYS {d}/empty holds no .pub files"),
        (
            lambda d: (d / "x.pub").write_text("ssh-rsa AAAA") and d / "x.pub",
            "KOLM_TRUSTED_KEYS {d}/x.pub holds no PEM public key",
        ),
        (
            lambda d: (
                (d / "r.pub").write_bytes(
                    rsa.generate_private_key(65537, 2048)
                    .public_key()
                    .public_bytes(Encoding.PEM, PublicFormat.SubjectPublicKeyInfo)
                )
                and d / "r.pub"
            ),
            "KOLM_TRUSTED_KEYS {d}/r.pub holds a RSAPublicKey; kolm verifies Ed25519 keys only",
        ),
        (
            lambda d: (
                (d / "bad.pub").write_text("-----BEGIN PUBLIC KEY-----\nAAAA\n-----END PUBLIC KEY-----\n")
                and d / "bad.pub"
            ),
            "KOLM_TRUSTED_KEYS {d}/bad.pub holds a malformed PEM public key",
        ),
    ],
    ids=["missing", "empty-dir", "not-pem", "rsa", "garbled"],
)
def test_bad_trusted_keys_are_exit_2_naming_the_file(setup, message, tmp_path, monkeypatch, capsys) -> None:
    monkeypatch.setenv("KOLM_SIGNING_KEY_FILE", str(write_pair(tmp_path / "keys", 1)[0]))
    artifact = small_artifact(tmp_path)
    monkeypatch.delenv("KOLM_SIGNING_KEY_FILE")
    monkeypatch.setenv("KOLM_TRUSTED_KEYS", str(setup(tmp_path)))
    assert main(["verify", str(artifact)]) == 2
    assert error_line(capsys).startswith("error: " + message.format(d=tmp_path))


def _rsa_private(path: Path) -> Path:
    key = rsa.generate_private_key(65537, 2048)
    path.write_bytes(key.private_bytes(Encoding.PEM, PrivateFormat.PKCS8, NoEncryption()))
    return path


def _encrypted(path: Path) -> Path:
    path.write_bytes(
        ed25519_key(1).private_bytes(Encoding.PEM, PrivateFormat.PKCS8, BestAvailableEncryption(b"pw"))
    )
    return path


@pytest.mark.parametrize(
    ("setup", "message"),
    [
        (lambda d: d / "nope.key", "KOLM_SIGNING_KEY_FILE {d}/nope.key: no such file"),
        (lambda d: d, "KOLM_SIGNING_KEY_FILE {d} is a directory; name the key file"),
        (lambda d: _encrypted(d / "enc.key"), "KOLM_SIGNING_KEY_FILE {d}/enc.key is encrypted"),
        (lambda d: _rsa_private(d / "rsa.key"), "KOLM_SIGNING_KEY_FILE {d}/rsa.key holds a RSAPrivateKey"),
        (
            lambda d: write_pair(d, 1)[1],
            "KOLM_SIGNING_KEY_FILE {d}/kolm-signing.pub is not a PEM private key",
        ),
    ],
    ids=["missing", "directory", "encrypted", "rsa", "public-key"],
)
def test_bad_signing_key_file_fails_compile_before_training(
    setup, message, tmp_path, monkeypatch, capsys
) -> None:
    monkeypatch.setenv("KOLM_SIGNING_KEY_FILE", str(setup(tmp_path)))
    assert main(compile_argv(tmp_path, "--dry-run")) == 2  # the plan is fine; the key is not
    assert error_line(capsys).startswith("error: " + message.format(d=tmp_path))
    with pytest.raises(KolmError):
        small_artifact(tmp_path)
    assert not list(tmp_path.glob("*.kolm")) and not list(tmp_path.glob(".x.kolm*"))


def test_status_shows_the_keys_and_creates_nothing(tmp_path, monkeypatch, kolm_home, capsys) -> None:
    private, public = write_pair(tmp_path / "keys", 1)
    monkeypatch.setenv("KOLM_TRUSTED_KEYS", str(public))
    assert main(["signing", "status"]) == 0
    shown = json.loads(capsys.readouterr().out)
    kid = ed25519_key_id(ed25519_key(1))
    assert shown["trusted_ed25519"] == [{"key_id": kid, "file": str(public)}]
    assert shown["hmac_key_id"] is None and shown["signs_with"]["key_id"] is None
    monkeypatch.setenv("KOLM_SIGNING_KEY_FILE", str(private))
    assert main(["signing", "status"]) == 0
    assert json.loads(capsys.readouterr().out)["signs_with"] == {
        "alg": "ed25519",
        "key_id": kid,
        "file": str(private),
    }
    assert not (kolm_home / "signing.key").exists()


# ---- another process, only the public key ------------------------------------------------------------------


def verifying_env(home: Path, trusted: Path | None) -> dict[str, str]:
    """A fresh node's environment: a new KOLM_HOME, no secret of any kind, only the public key(s)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("KOLM_")}
    env.update(KOLM_HOME=str(home), PYTHONPATH=str(REPO), KOLM_TORCH_THREADS="1")
    if trusted is not None:
        env["KOLM_TRUSTED_KEYS"] = str(trusted)
    return env


def kolm(*argv: str, env: dict[str, str], timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "kolm_ray.cli", *argv],
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def test_kolm_verify_in_another_process_with_the_public_key_only(tmp_path, monkeypatch) -> None:
    private, public = write_pair(tmp_path / "keys", 1)
    monkeypatch.setenv("KOLM_SIGNING_KEY_FILE", str(private))
    artifact = small_artifact(tmp_path)
    home = tmp_path / "other-node"
    r = kolm("verify", str(artifact), env=verifying_env(home, public))
    assert r.returncode == 0 and f"(ed25519, key {ed25519_key_id(ed25519_key(1))})" in r.stdout, r.stderr
    assert not home.exists()  # verifying wrote nothing, KOLM_HOME included


@pytest.mark.slow
def test_compiled_here_verified_and_run_in_another_process_with_the_public_key_only(
    tmp_path, monkeypatch
) -> None:
    """compile's phases in this process with the private key; `kolm verify`, `kolm run` and `kolm models
    promote` in fresh processes that hold only the public key (a real tagger, the real CLI)."""
    private, public = write_pair(tmp_path / "keys", 1)
    monkeypatch.setenv("KOLM_SIGNING_KEY_FILE", str(private))
    monkeypatch.setenv("KOLM_TORCH_THREADS", "1")
    artifact, _ = build_artifact_without_ray(tmp_path, epochs=6)
    kid = ed25519_key_id(ed25519_key(1))
    with zipfile.ZipFile(artifact) as z:
        manifest = json.loads(z.read("manifest.json"))
    assert manifest["signature_alg"] == "ed25519" and manifest["key_id"] == kid
    home = tmp_path / "other-node"
    env = verifying_env(home, public)
    r = kolm("verify", str(artifact), env=env)
    assert r.returncode == 0 and f"signature valid (ed25519, key {kid})" in r.stdout, r.stderr
    r = kolm("run", str(artifact), "how do i refund invoice charge", env=env)
    assert r.returncode == 0 and json.loads(r.stdout)["namespace"] == "billing", r.stderr
    r = kolm("models", "promote", str(artifact), "--namespace", "billing", "--force", env=env)
    assert r.returncode == 0, r.stderr
    assert not (home / "signing.key").exists()  # nothing secret was ever made on this node
    # the capture proxy's registry check (capture/local.py) on that node: verifies with the public key only,
    # and reports (answering upstream meanwhile) once the key is no longer trusted
    from kolm_ray import registry
    from kolm_ray.observations.store import open_store

    monkeypatch.delenv("KOLM_SIGNING_KEY_FILE")
    monkeypatch.setenv("KOLM_HOME", str(home))
    monkeypatch.setenv("KOLM_TRUSTED_KEYS", str(public))
    store = open_store(None)
    try:
        row = registry.live_models(store)["billing"]
        assert registry.check_file(row) is None
        monkeypatch.setenv("KOLM_TRUSTED_KEYS", str(write_pair(tmp_path / "k2", 2)[1]))
        assert (
            f"no longer verifies: signed with key {kid}, which is not a trusted key"
            in registry.check_file(row)
        )
    finally:
        store.close()
    r = kolm(
        "verify", str(artifact), env=verifying_env(tmp_path / "third", write_pair(tmp_path / "k2", 2)[1])
    )
    assert r.returncode == 4 and r.stderr.count("\n") == 1
    assert f"signed with key {kid}, which is not a trusted key" in r.stderr


@pytest.mark.slow
def test_real_cli_generate_compile_then_verify_elsewhere(tmp_path) -> None:
    """The issue's acceptance: `kolm signing generate`, `kolm compile` (Ray Train) with the private key,
    then `kolm verify` / `kolm run` / `kolm inspect` in a process with a fresh KOLM_HOME, no KOLM_SIGNING_KEY
    and only KOLM_TRUSTED_KEYS. All real subprocesses."""
    compile_env = {k: v for k, v in os.environ.items() if not k.startswith("KOLM_") and k != "RAY_ADDRESS"}
    compile_env.update(KOLM_HOME=str(tmp_path / "compile-node"), PYTHONPATH=str(REPO), KOLM_TORCH_THREADS="1")
    r = kolm("signing", "generate", "--out", str(tmp_path / "keys"), env=compile_env)
    assert r.returncode == 0, r.stderr
    made = json.loads(r.stdout)
    compile_env["KOLM_SIGNING_KEY_FILE"] = made["private_key"]
    r = kolm(*compile_argv(tmp_path, "--epochs", "6"), env=compile_env, timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.splitlines()[1].endswith("  signature=ed25519")
    assert not (tmp_path / "compile-node" / "signing.key").exists()  # Ed25519 only: no HMAC key made
    artifact = tmp_path / "tagger.kolm"
    env = verifying_env(tmp_path / "serve-node", Path(made["public_key"]))
    r = kolm("verify", str(artifact), env=env)
    assert r.returncode == 0 and f"(ed25519, key {made['key_id']})" in r.stdout, r.stderr
    r = kolm("inspect", str(artifact), env=env)
    assert r.returncode == 0 and json.loads(r.stdout)["key_id"] == made["key_id"]
    r = kolm("run", str(artifact), "how do i refund invoice charge", env=env)
    assert r.returncode == 0 and json.loads(r.stdout)["namespace"] == "billing", r.stderr
    r = kolm("verify", str(artifact), env=verifying_env(tmp_path / "bare-node", None))
    assert r.returncode == 4 and "set KOLM_TRUSTED_KEYS" in r.stderr and r.stderr.count("\n") == 1
    assert not (tmp_path / "serve-node" / "signing.key").exists()
    assert not (tmp_path / "bare-node").exists()
