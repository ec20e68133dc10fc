"""The .kolm artifact: signed, hashed, atomic; tampered, truncated or wrongly keyed files are refused.
Every test runs for both signature algorithms (HMAC-SHA256 and Ed25519)."""

from __future__ import annotations

import json
import zipfile
from pathlib import Path

import pytest
from signing_helpers import ALGS, signing_node, write_pair

from kolm_ray.artifact import MANIFEST, open_artifact, pack, verify
from kolm_ray.cli import main
from kolm_ray.errors import ArtifactError


@pytest.fixture(params=ALGS)
def alg(request, monkeypatch, tmp_path) -> str:
    """The algorithm under test; the node signs with its key (and so verifies what it signed)."""
    signing_node(monkeypatch, request.param, tmp_path)
    return request.param


@pytest.fixture
def artifact(tmp_path: Path, alg: str) -> Path:
    staging = tmp_path / "staging"
    (staging / "sub").mkdir(parents=True)
    (staging / "model.safetensors").write_bytes(b"\x00" * 1000)
    (staging / "config.json").write_text('{"a": 1}')
    (staging / "sub" / "tokenizer.json").write_text('{"t": 2}')
    pack(
        staging,
        tmp_path / "x.kolm",
        {"name": "x", "kind": "encoder-tagger", "spec": {}, "metrics": {"k_score": 0.9}},
    )
    return tmp_path / "x.kolm"


def _rewrite(src: Path, dst: Path, change) -> None:
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w") as zout:
        for info in zin.infolist():
            data = change(info.filename, zin.read(info.filename))
            if data is not None:
                zout.writestr(info.filename, data)


def test_manifest_fields_and_roundtrip(artifact: Path, alg: str) -> None:
    m = verify(artifact)
    assert m["format"] == "kolm/1" and m["signature_alg"] == alg
    with zipfile.ZipFile(artifact) as z:
        assert len(z.read("signature")) == {"hmac-sha256": 64, "ed25519": 128}[alg]
    assert set(m["files"]) == {"model.safetensors", "config.json", "sub/tokenizer.json"}
    assert {"created_at", "key_id", "name", "kind", "spec", "metrics"} <= set(m)
    with open_artifact(artifact) as opened:
        assert (opened.dir / "sub" / "tokenizer.json").read_text() == '{"t": 2}'
    assert not opened.dir.exists()


def test_tampered_member_refused(artifact: Path, tmp_path: Path) -> None:
    bad = tmp_path / "bad.kolm"
    _rewrite(artifact, bad, lambda n, d: b"\x01" + d[1:] if n == "model.safetensors" else d)
    with pytest.raises(ArtifactError, match="does not match its hash"):
        verify(bad)


def test_tampered_manifest_refused(artifact: Path, tmp_path: Path) -> None:
    bad = tmp_path / "bad.kolm"

    def change(name, data):
        if name != MANIFEST:
            return data
        m = json.loads(data)
        m["metrics"]["k_score"] = 1.0
        return json.dumps(m).encode()

    _rewrite(artifact, bad, change)
    with pytest.raises(ArtifactError, match="signature does not match"):
        verify(bad)


def test_extra_member_refused(artifact: Path, tmp_path: Path) -> None:
    bad = tmp_path / "bad.kolm"
    _rewrite(artifact, bad, lambda n, d: d)
    with zipfile.ZipFile(bad, "a") as z:
        z.writestr("evil.py", "print('hi')")
    with pytest.raises(ArtifactError, match="extra"):
        verify(bad)


def test_truncated_refused(artifact: Path, tmp_path: Path) -> None:
    bad = tmp_path / "trunc.kolm"
    data = artifact.read_bytes()
    for cut in (len(data) // 2, len(data) - 10, 100):
        bad.write_bytes(data[:cut])
        with pytest.raises(ArtifactError):
            verify(bad)


def test_wrong_key_refused(artifact: Path, alg: str, monkeypatch, tmp_path: Path) -> None:
    signed_by = verify(artifact)["key_id"]
    if alg == "ed25519":  # a node that trusts another key only: exit 4 naming the key that signed it
        monkeypatch.delenv("KOLM_SIGNING_KEY_FILE")
        monkeypatch.setenv("KOLM_TRUSTED_KEYS", str(write_pair(tmp_path / "other", seed=2)[1]))
        with pytest.raises(ArtifactError, match=f"signed with key {signed_by}, which is not a trusted key"):
            verify(artifact)
        return
    monkeypatch.setenv("KOLM_SIGNING_KEY", "a-different-key-of-reasonable-length")
    with pytest.raises(ArtifactError, match=f"another key \\(signed with key {signed_by}, this key is "):
        verify(artifact)


def test_not_a_zip_refused(tmp_path: Path) -> None:
    p = tmp_path / "x.kolm"
    p.write_text("hello")
    with pytest.raises(ArtifactError, match="not a .kolm"):
        verify(p)


def test_cli_verify_and_inspect_exit_codes(artifact: Path, tmp_path: Path, capsys) -> None:
    assert main(["verify", str(artifact)]) == 0
    assert "signature valid" in capsys.readouterr().out
    assert main(["inspect", str(artifact)]) == 0
    assert json.loads(capsys.readouterr().out)["format"] == "kolm/1"
    bad = tmp_path / "bad.kolm"
    bad.write_bytes(artifact.read_bytes()[:-40])
    assert main(["verify", str(bad)]) == 4
    assert capsys.readouterr().err.startswith("error: ")


def test_failed_pack_leaves_no_file(tmp_path: Path) -> None:
    staging = tmp_path / "staging"
    staging.mkdir()
    (staging / "a.json").write_text("{}")
    out = tmp_path / "out.kolm"
    with pytest.raises(TypeError):  # an unserialisable manifest fails mid-pack
        pack(staging, out, {"metrics": object()})
    assert not out.exists() and not list(tmp_path.glob(".out.kolm*"))


def _resign(
    src: Path, dst: Path, change_manifest=None, drop: str | None = None, add: dict | None = None
) -> None:
    """Rewrite an artifact and sign it again with the real key: what only a holder of the key can do."""
    import hashlib

    from kolm_ray.artifact.signing import signer

    with zipfile.ZipFile(src) as z:
        members = {n: z.read(n) for n in z.namelist() if n not in (MANIFEST, "signature", drop)}
        manifest = json.loads(z.read(MANIFEST))
    members.update(add or {})
    manifest["files"] = {n: hashlib.sha256(d).hexdigest() for n, d in members.items()}
    manifest["sizes"] = {n: len(d) for n, d in members.items()}
    if change_manifest:
        change_manifest(manifest)
    body = json.dumps(manifest).encode()
    with zipfile.ZipFile(dst, "w") as z:
        z.writestr(MANIFEST, body)
        z.writestr("signature", signer().sign(body))
        for n, d in members.items():
            z.writestr(n, d)


def test_signed_but_unsound_artifacts_refused(artifact: Path, tmp_path: Path) -> None:
    none_alg = tmp_path / "none.kolm"
    _resign(artifact, none_alg, change_manifest=lambda m: m.update(signature_alg="none"))
    with pytest.raises(ArtifactError, match="signature_alg 'none'"):
        verify(none_alg)
    pickled = tmp_path / "pickled.kolm"
    _resign(artifact, pickled, add={"pytorch_model.bin": b"\x80\x04K\x01."})
    with pytest.raises(ArtifactError, match="pickle members"):
        verify(pickled)


def test_artifact_without_its_weights_is_exit_4_for_run(artifact: Path, tmp_path: Path, capsys) -> None:
    hollow = tmp_path / "hollow.kolm"
    _resign(artifact, hollow, drop="model.safetensors")
    assert main(["verify", str(hollow)]) == 0  # signed and hashed consistently
    capsys.readouterr()
    assert main(["run", str(hollow), "hello"]) == 4
    assert (
        capsys.readouterr().err.strip().startswith("error: encoder-tagger artifact lacks model.safetensors")
    )


def test_missing_artifact_path_is_a_user_mistake(tmp_path: Path, capsys) -> None:
    for command in ("verify", "inspect", "run"):
        argv = [command, str(tmp_path / "nope.kolm")] + (["hi"] if command == "run" else [])
        assert main(argv) == 2
        assert capsys.readouterr().err.strip().endswith("nope.kolm: no such artifact")
