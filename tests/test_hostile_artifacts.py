"""Hostile .kolm files: each is refused with exit 4 and one clean line, fast, in bounded memory, and
nothing of it is left on disk. Built by hand (a zip writer below) where zipfile would refuse to write them.
Every test runs for both signature algorithms: HMAC-SHA256 with the shared key, and Ed25519 on a node that
holds only the public key (KOLM_TRUSTED_KEYS; no secret at all).
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import struct
import subprocess
import sys
import tempfile
import zipfile
import zlib
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from signing_helpers import ALGS, ed25519_key, key_id, signing_node, verifying_node
from signing_helpers import sign as sign_as

from kolm_ray import artifact as art
from kolm_ray.artifact import MANIFEST, SIGNATURE, open_artifact, pack, verify
from kolm_ray.cli import main
from kolm_ray.errors import ArtifactError

REPO = Path(__file__).resolve().parent.parent
GIB = 1 << 30
OTHER_HMAC_KEY = "another-hostile-tests-hmac-key-42"  # a key the verifying node does not hold
ESCAPE = "\x1b[31mEVIL\x1b]0;pwned\x07\u202e"


# --- building zips by hand --------------------------------------------------------------------------------


def deflated_zeros(n_mib: int) -> bytes:
    """A raw deflate stream of n_mib MiB of zeros, built from one compressed MiB repeated (~1 KiB per MiB):
    each full-flushed chunk stands alone, and b"\\x03\\x00" is an empty final block."""
    c = zlib.compressobj(9, zlib.DEFLATED, -15)
    chunk = c.compress(b"\0" * (1 << 20)) + c.flush(zlib.Z_FULL_FLUSH)
    return chunk * n_mib + b"\x03\x00"


def raw_zip(entries: list[tuple[str, bytes, int, int, int]]) -> bytes:
    """A zip of (name, stored bytes, method, declared uncompressed size, crc): sizes may lie."""
    out, central = bytearray(), bytearray()
    for name, data, method, size, crc in entries:
        encoded = name.encode()
        offset = len(out)
        out += struct.pack(
            "<4s5H3L2H", b"PK\x03\x04", 20, 0, method, 0, 0x21, crc, len(data), size, len(encoded), 0
        )
        out += encoded + data
        central += struct.pack(
            "<4s6H3L5H2L",
            b"PK\x01\x02",
            20,
            20,
            0,
            method,
            0,
            0x21,
            crc,
            len(data),
            size,
            len(encoded),
            0,
            0,
            0,
            0,
            0,
            offset,
        )
        central += encoded
    eocd = struct.pack("<4s4H2LH", b"PK\x05\x06", 0, 0, len(entries), len(entries), len(central), len(out), 0)
    return bytes(out + central + eocd)


def stored(name: str, data: bytes) -> tuple[str, bytes, int, int, int]:
    return (name, data, zipfile.ZIP_STORED, len(data), zlib.crc32(data))


def sign(body: bytes, alg: str) -> bytes:
    """Signed with the test key of `alg`: the key the verifying node trusts (seed 1, HMAC_KEY)."""
    return sign_as(alg, body)


def manifest_for(members: dict[str, bytes], alg: str, **extra) -> dict:
    return {
        "format": "kolm/1",
        "name": "x",
        "kind": "encoder-tagger",
        "spec": {},
        "metrics": {},
        "files": {n: hashlib.sha256(d).hexdigest() for n, d in members.items()},
        "sizes": {n: len(d) for n, d in members.items()},
        "created_at": "2026-01-01T00:00:00Z",
        "signature_alg": alg,
        "key_id": key_id(alg),
        **extra,
    }


def signed_zip(
    members: dict[str, bytes], alg: str, manifest: dict | None = None, body: bytes | None = None
) -> bytes:
    body = body if body is not None else json.dumps(manifest or manifest_for(members, alg)).encode()
    return raw_zip(
        [stored(MANIFEST, body), stored(SIGNATURE, sign(body, alg))]
        + [stored(n, d) for n, d in members.items()]
    )


MEMBERS = {"model.safetensors": b"\x00" * 64, "config.json": b'{"a": 1}'}


def foreign_keys(alg: str) -> dict[str, bytes]:
    """Signed, but not by a key the node trusts: another key, another key claiming the trusted key's id,
    and an HMAC made with the trusted Ed25519 public key as its secret (algorithm confusion)."""
    other = (lambda b: sign_as(alg, b, seed=2, hmac_key=OTHER_HMAC_KEY), key_id(alg, 2, OTHER_HMAC_KEY))
    public_pem = ed25519_key(1).public_key().public_bytes(Encoding.PEM, PublicFormat.SubjectPublicKeyInfo)
    out = {}
    for case, signer, manifest in (
        ("signed with an untrusted key", other[0], manifest_for(MEMBERS, alg, key_id=other[1])),
        ("names the trusted key, signed with another", other[0], manifest_for(MEMBERS, alg)),
        (
            "hmac with the public key as its secret",
            lambda b: hmac.new(public_pem, b, hashlib.sha256).hexdigest().encode(),
            manifest_for(MEMBERS, alg, signature_alg="hmac-sha256", key_id=key_id("ed25519")),
        ),
        ("signature of the other algorithm's length", lambda b: b"0" * (192 - len(sign(b, alg))), None),
    ):
        body = json.dumps(manifest or manifest_for(MEMBERS, alg)).encode()
        out[case] = raw_zip(
            [stored(MANIFEST, body), stored(SIGNATURE, signer(body))]
            + [stored(n, d) for n, d in MEMBERS.items()]
        )
    return out


def hostile_artifacts(alg: str) -> dict[str, bytes]:
    """name -> bytes of every hostile artifact the issue lists (and a few more), for `alg`'s test key."""
    bomb = deflated_zeros(2048)  # inflates to 2 GiB from ~2 MiB
    sig = b"0" * len(sign(b"", alg))  # an unsigned artifact's signature, of the right form
    deep = b"[" * 100_000 + b"]" * 100_000
    deep_small = b"[" * 200 + b"]" * 200  # parses; deeper than any manifest needs
    wrong_key = json.dumps({**manifest_for(MEMBERS, alg), "key_id": ESCAPE}).encode()
    return {
        "manifest inflating to 2 GiB": raw_zip(
            [(MANIFEST, bomb, zipfile.ZIP_DEFLATED, 2 * GIB, 0), stored(SIGNATURE, sig)]
        ),
        "manifest inflating to 2 GiB, header says 1 KiB": raw_zip(
            [(MANIFEST, bomb, zipfile.ZIP_DEFLATED, 1024, 0), stored(SIGNATURE, sig)]
        ),
        "manifest inflating to 2 GiB, header says 4 MiB": raw_zip(
            [(MANIFEST, bomb, zipfile.ZIP_DEFLATED, 4 << 20, 0), stored(SIGNATURE, sig)]
        ),
        "signature inflating to 2 GiB": raw_zip(
            [stored(MANIFEST, b"{}"), (SIGNATURE, bomb, zipfile.ZIP_DEFLATED, 2 * GIB, 0)]
        ),
        "duplicate manifest": raw_zip(
            [stored(MANIFEST, b"{}"), stored(SIGNATURE, sig), stored(MANIFEST, b'{"format": "kolm/1"}')]
        ),
        "duplicate member": raw_zip(
            [
                stored(MANIFEST, body := json.dumps(manifest_for(MEMBERS, alg)).encode()),
                stored(SIGNATURE, sign(body, alg)),
                *(stored(n, d) for n, d in MEMBERS.items()),
                stored("config.json", b'{"evil": 1}'),
            ]
        ),
        "malformed signature (not hex)": raw_zip([stored(MANIFEST, b"{}"), stored(SIGNATURE, b"zz" * 32)]),
        "malformed signature (not ascii)": raw_zip(
            [stored(MANIFEST, b"{}"), stored(SIGNATURE, "é".encode() * 32)]
        ),
        "malformed signature (empty)": raw_zip([stored(MANIFEST, b"{}"), stored(SIGNATURE, b"")]),
        "malformed signature (huge)": raw_zip([stored(MANIFEST, b"{}"), stored(SIGNATURE, b"a" * 100_000)]),
        "[] manifest, unsigned": raw_zip([stored(MANIFEST, b"[]"), stored(SIGNATURE, sig)]),
        "[] manifest, signed": signed_zip({}, alg, body=b"[]"),
        "deeply nested manifest, unsigned": raw_zip([stored(MANIFEST, deep), stored(SIGNATURE, sig)]),
        "deeply nested manifest, signed": signed_zip({}, alg, body=deep),
        "200-level manifest, signed": signed_zip({}, alg, body=deep_small),
        "escapes in key_id": raw_zip([stored(MANIFEST, wrong_key), stored(SIGNATURE, sig)]),
        "files is a list, signed": signed_zip(
            MEMBERS, alg, {**manifest_for(MEMBERS, alg), "files": list(MEMBERS)}
        ),
        "spec is a string, signed": signed_zip(MEMBERS, alg, {**manifest_for(MEMBERS, alg), "spec": "x"}),
        "no spec, signed": signed_zip(
            MEMBERS, alg, {k: v for k, v in manifest_for(MEMBERS, alg).items() if k != "spec"}
        ),
        "hash is a number, signed": signed_zip(
            MEMBERS, alg, {**manifest_for(MEMBERS, alg), "files": dict.fromkeys(MEMBERS, 5)}
        ),
        "negative size, signed": signed_zip(
            MEMBERS,
            alg,
            {
                **manifest_for(MEMBERS, alg),
                "sizes": {**manifest_for(MEMBERS, alg)["sizes"], "config.json": -1},
            },
        ),
        "escape in a member name, signed": signed_zip({ESCAPE: b"x"}, alg),
        "path traversal, signed": signed_zip({"../../evil.json": b"x"}, alg),
        "member larger than the manifest says, signed": raw_zip(
            [
                stored(MANIFEST, body := json.dumps(manifest_for(MEMBERS, alg)).encode()),
                stored(SIGNATURE, sign(body, alg)),
                stored("model.safetensors", MEMBERS["model.safetensors"]),
                ("config.json", deflated_zeros(64), zipfile.ZIP_DEFLATED, 64 << 20, 0),
            ]
        ),
        "member header lying about its size, signed": raw_zip(
            [
                stored(MANIFEST, body := json.dumps(manifest_for(MEMBERS, alg)).encode()),
                stored(SIGNATURE, sign(body, alg)),
                stored("model.safetensors", MEMBERS["model.safetensors"]),
                ("config.json", deflated_zeros(64), zipfile.ZIP_DEFLATED, len(MEMBERS["config.json"]), 0),
            ]
        ),
        "bzip2 member": raw_zip([stored(MANIFEST, b"{}"), (SIGNATURE, b"BZh9", zipfile.ZIP_BZIP2, 64, 0)]),
        "too many entries": raw_zip([stored(f"f{i}", b"") for i in range(art.MAX_MEMBERS + 1)]),
        "not a zip": b"PK\x03\x04" + b"\0" * 100,
        **foreign_keys(alg),
    }


HOSTILE = {alg: hostile_artifacts(alg) for alg in ALGS}


@pytest.fixture(autouse=True, params=ALGS)
def alg(request, monkeypatch, tmp_path, kolm_home) -> str:
    """Each test once per algorithm, on a node that verifies only: for Ed25519 it holds the public key and
    no secret, and nothing it does may create one (no $KOLM_HOME/signing.key appears)."""
    verifying_node(monkeypatch, request.param, tmp_path)
    yield request.param
    if request.param == "ed25519":
        assert not (kolm_home / "signing.key").exists()


@pytest.fixture
def pack_signed(alg, monkeypatch, tmp_path):
    """pack() as a compile node of `alg` would (for Ed25519, with the private key set only while packing)."""

    def run(staging, out, manifest):
        with monkeypatch.context() as mp:
            signing_node(mp, alg, tmp_path)
            return pack(staging, out, manifest)

    return run


@pytest.fixture(scope="module")
def predictors_imported() -> None:
    """`kolm run` imports torch once per process (seconds); the timings below are of the refusal alone."""
    import kolm_ray.inference.predictors  # noqa: F401


@pytest.fixture
def private_tmp(tmp_path, monkeypatch) -> Path:
    """The temporary directory open_artifact extracts into, so a test can see what is left there."""
    d = tmp_path / "tmpdir"
    d.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(d))
    return d


@pytest.mark.parametrize("case", sorted(HOSTILE[ALGS[0]]))
def test_hostile_artifact_is_exit_4_fast_and_leaves_nothing(
    case, alg, tmp_path, private_tmp, capsys, predictors_imported
) -> None:
    path = tmp_path / "hostile.kolm"
    path.write_bytes(HOSTILE[alg][case])
    assert main(["run", str(path), "hello"]) == 4  # how fast: benchmarks/failure_timings.py
    assert main(["verify", str(path)]) == 4
    err = capsys.readouterr().err
    lines = err.splitlines()
    assert len(lines) == 2 and all(line.startswith("error: ") for line in lines), err
    assert all(ch.isprintable() for line in lines for ch in line), repr(err)
    assert list(private_tmp.iterdir()) == []  # nothing extracted, not even a temporary directory


def test_messages_name_the_problem(alg, tmp_path) -> None:
    ed = alg == "ed25519"
    expect = {
        "manifest inflating to 2 GiB": "declares 2147483648 bytes, over the limit",
        "manifest inflating to 2 GiB, header says 4 MiB": "corrupt",  # zipfile stops at 4 MiB: bad CRC
        "duplicate member": "duplicate member names ['config.json']",
        "malformed signature (not ascii)": "malformed signature",
        "[] manifest, signed": "not a JSON object",
        "deeply nested manifest, signed": "not a JSON object of at most 64 levels",
        "escapes in key_id": "signed with key [31mEVIL]0;pwned",
        "spec is a string, signed": "manifest field spec has the wrong type (str)",
        "member larger than the manifest says, signed": "declares 67108864 bytes in the zip, the signed manifest 8",
        "too many entries": "10001 zip entries",
        "no spec, signed": "manifest lacks spec",
        "signed with an untrusted key": f"signed with key {key_id(alg, 2, OTHER_HMAC_KEY)}"
        + (", which is not a trusted key (this node trusts " if ed else ", this key is "),
        "names the trusted key, signed with another": "signature does not match; tampered or signed",
        # a public key is never an HMAC secret: the Ed25519-only node has none, the HMAC node's differs
        "hmac with the public key as its secret": "this node has no HMAC key; set KOLM_SIGNING_KEY"
        if ed
        else "signature does not match",
        "signature of the other algorithm's length": f"expected {128 if ed else 64} hex characters for {alg}",
    }
    for case, words in expect.items():
        path = tmp_path / "x.kolm"
        path.write_bytes(HOSTILE[alg][case])
        with pytest.raises(ArtifactError) as e:
            verify(path)
        assert words in str(e.value), (case, str(e.value))


def test_member_is_written_only_once_its_hash_matches(alg, tmp_path) -> None:
    members = {"a.json": b'{"a": 1}', "b.json": b'{"b": 2}'}
    good = manifest_for(members, alg)
    tampered = raw_zip(
        [
            stored(MANIFEST, body := json.dumps(good).encode()),
            stored(SIGNATURE, sign(body, alg)),
            stored("a.json", members["a.json"]),
            stored("b.json", b'{"b": 3}'),  # same size, different bytes
        ]
    )
    path, dest = tmp_path / "t.kolm", tmp_path / "out"
    dest.mkdir()
    path.write_bytes(tampered)
    with pytest.raises(ArtifactError, match="b.json does not match its hash"):
        verify(path, extract_to=dest)
    assert sorted(p.name for p in dest.iterdir()) == ["a.json"]  # b.json's temporary file is gone too


def test_signed_artifact_from_before_sizes_still_opens(alg, tmp_path) -> None:
    members = {"sub/config.json": b'{"a": 1}'}
    m = manifest_for(members, alg)
    del m["sizes"]
    path = tmp_path / "old.kolm"
    path.write_bytes(signed_zip(members, alg, m))
    with open_artifact(path) as opened:
        assert (opened.dir / "sub" / "config.json").read_bytes() == b'{"a": 1}'
        assert [p.name for p in opened.dir.iterdir()] == ["sub"]  # no leftover temporary files


def test_pack_records_signed_sizes(alg, pack_signed, tmp_path) -> None:
    staging = tmp_path / "s"
    staging.mkdir()
    (staging / "w.safetensors").write_bytes(b"\1" * 300)
    m = pack_signed(
        staging, tmp_path / "p.kolm", {"name": "p", "kind": "encoder-tagger", "spec": {}, "metrics": {}}
    )
    assert m["sizes"] == {"w.safetensors": 300}
    assert verify(tmp_path / "p.kolm")["sizes"] == {"w.safetensors": 300}
    assert m["signature_alg"] == alg and m["key_id"] == key_id(alg)


# --- fuzzing ----------------------------------------------------------------------------------------------

JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda kids: st.lists(kids, max_size=4) | st.dictionaries(st.text(max_size=10), kids, max_size=4),
    max_leaves=20,
)


def _outcome(path: Path) -> dict | None:
    """verify + open: a verified manifest (dict), or None for an ArtifactError; anything else fails."""
    try:
        manifest = verify(path)
    except ArtifactError:
        return None
    assert isinstance(manifest, dict) and isinstance(manifest["files"], dict)
    with open_artifact(path) as opened:
        assert opened.manifest == manifest
    return manifest


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_fuzz_artifact_bytes(data, pack_signed, tmp_path, private_tmp) -> None:
    """Random byte edits and truncations of a real artifact: verified, or ArtifactError, never another error."""
    staging = tmp_path / "staging"
    if not staging.exists():
        staging.mkdir()
        (staging / "model.safetensors").write_bytes(bytes(range(256)) * 4)
        (staging / "tokenizer.json").write_text('{"t": [1, 2, 3]}' * 20)
        pack_signed(
            staging,
            tmp_path / "good.kolm",
            {"name": "g", "kind": "encoder-tagger", "spec": {}, "metrics": {}},
        )
    raw = bytearray((tmp_path / "good.kolm").read_bytes())
    for _ in range(data.draw(st.integers(0, 6))):
        raw[data.draw(st.integers(0, len(raw) - 1))] = data.draw(st.integers(0, 255))
    if data.draw(st.booleans()):
        raw = raw[: data.draw(st.integers(0, len(raw)))]
    path = tmp_path / "fuzz.kolm"
    path.write_bytes(bytes(raw))
    _outcome(path)
    assert list(private_tmp.iterdir()) == []


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    edits=st.dictionaries(
        st.sampled_from(
            ["format", "files", "sizes", "spec", "kind", "key_id", "signature_alg", "metrics", "base"]
        ),
        JSON,
        max_size=3,
    ),
    whole=st.one_of(st.none(), JSON),
    signed=st.booleans(),
    signature=st.binary(max_size=140),
)
def test_fuzz_manifests(edits, whole, signed, signature, alg, tmp_path, private_tmp) -> None:
    """Arbitrary manifests, signed with the real key or not: a verified open or ArtifactError, nothing else."""
    manifest = whole if whole is not None else {**manifest_for(MEMBERS, alg), **edits}
    body = json.dumps(manifest).encode()
    zipped = raw_zip(
        [stored(MANIFEST, body), stored(SIGNATURE, sign(body, alg) if signed else signature)]
        + [stored(n, d) for n, d in MEMBERS.items()]
    )
    path = tmp_path / "m.kolm"
    path.write_bytes(zipped)
    result = _outcome(path)
    if result is not None:
        assert signed and isinstance(result.get("spec", {}), dict)
    assert list(private_tmp.iterdir()) == []


# --- the real CLI in a subprocess -------------------------------------------------------------------------


AS_LIMIT = 512 << 20  # address space of the child: a 2 GiB manifest cannot be held in it


def _limit_memory() -> None:
    import resource

    resource.setrlimit(resource.RLIMIT_AS, (AS_LIMIT, AS_LIMIT))


@pytest.mark.slow
def test_every_hostile_artifact_in_a_subprocess_bounded_time_and_memory(alg, pack_signed, tmp_path) -> None:
    """`kolm verify` in a real process under a 512 MiB address-space limit: every hostile artifact is exit 4
    with one clean line (not a MemoryError, not a traceback) in seconds, and nothing is extracted (TMPDIR is
    a fresh directory that stays empty). A real artifact verifies under the same limit."""
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    env = {**os.environ, "TMPDIR": str(scratch), "PYTHONPATH": str(REPO)}  # the verifying node's keys only
    good = tmp_path / "good"
    good.mkdir()
    (good / "w.safetensors").write_bytes(b"\1" * (8 << 20))
    pack_signed(
        good, tmp_path / "good.kolm", {"name": "g", "kind": "encoder-tagger", "spec": {}, "metrics": {}}
    )
    for case, data in {"good": (tmp_path / "good.kolm").read_bytes(), **HOSTILE[alg]}.items():
        path = tmp_path / "x.kolm"
        path.write_bytes(data)
        proc = subprocess.run(  # under a memory limit: a bomb would be a MemoryError, not one line
            [sys.executable, "-m", "kolm_ray.cli", "verify", str(path)],
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
            preexec_fn=_limit_memory,
        )
        if case == "good":
            assert proc.returncode == 0, proc.stderr
            continue
        assert proc.returncode == 4, (case, proc.stderr)
        assert proc.stderr.count("\n") == 1 and proc.stderr.startswith("error: "), (case, proc.stderr)
        assert all(ch.isprintable() for ch in proc.stderr.strip()), (case, proc.stderr)
        assert list(scratch.iterdir()) == []
