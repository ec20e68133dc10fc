"""The signed .kolm artifact: pack, verify, open. No pickle anywhere.

A .kolm is a zip holding
    manifest.json   format "kolm/1", name, description, kind, base, spec, k_floor, metrics,
                    files {name: sha256} of every other member, sizes {name: bytes}, created_at,
                    signature_alg ("ed25519" or "hmac-sha256"), key_id
    signature       hex Ed25519 signature (KOLM_SIGNING_KEY_FILE) or HMAC-SHA256 (settings.signing_key())
                    of manifest.json's exact bytes; who signs and whom a node trusts: signing.py
    model.safetensors / adapter_model.safetensors, config.json, tokenizer files, labels.json, ...

open_artifact() checks the signature and every member's hash before anything else reads a byte of it;
any mismatch, a missing, extra or duplicate member, a truncated zip, a wrong key, or anything malformed
or oversized (a zip bomb, a huge or deeply nested manifest, a garbled signature) raises ArtifactError
(exit 4) within a bounded time and memory: what the artifact declares is capped before it is read and
enforced again while it inflates.
pack() writes a temporary file next to the target and renames it, so a failed compile leaves no file.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import re
import shutil
import struct
import tempfile
import time
import zipfile
import zlib
from collections import Counter
from pathlib import Path, PurePosixPath
from typing import Any

from kolm_ray.artifact.signing import ALGS, HEX_LENGTH, check_signature, signer
from kolm_ray.errors import ArtifactError, KolmError

FORMAT = "kolm/1"
MANIFEST = "manifest.json"
SIGNATURE = "signature"
MAX_MEMBER_BYTES = 64 << 30  # no member larger than 64 GiB (a 7B model's safetensors are ~15 GiB)
MAX_MANIFEST_BYTES = (
    8 << 20
)  # a manifest holds a spec, metrics and hashes: a few KiB; read before the signature
MAX_SIGNATURE_BYTES = 256  # 128 hex characters (Ed25519; HMAC is 64) and some whitespace
MAX_MEMBERS = 10_000  # a tokenizer, config and a few weight shards; zipfile parses every entry up front
MAX_DEPTH = 64  # JSON nesting in a manifest; a spec's schema is a few levels deep
CHUNK = 1 << 20  # bytes inflated per read: memory per member stays at this, whatever its size
PICKLE_SUFFIXES = frozenset({".bin", ".pkl", ".pickle", ".pt", ".pth", ".ckpt"})  # torch.save / pickle files


_METHODS = (zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED)  # what pack() writes; bzip2/lzma members are refused
# What zipfile and its decompressors raise on a damaged archive (a bad deflate stream is zlib.error,
# an encrypted member RuntimeError): each becomes one ArtifactError line.
_CORRUPT = (
    zipfile.BadZipFile,
    zlib.error,
    EOFError,
    OSError,
    KeyError,
    ValueError,
    NotImplementedError,
    RuntimeError,
    struct.error,
    OverflowError,
)
_HEX64 = re.compile(r"[0-9a-f]{64}")
_SIGNATURE_HEX = re.compile("|".join(f"[0-9a-f]{{{n}}}" for n in sorted(set(HEX_LENGTH.values()))))
_REQUIRED = ("files", "key_id", "kind", "spec")  # what verify and every predictor read without a default
# Manifest fields and their JSON types, checked after the signature so that readers can rely on them.
_FIELD_TYPES: dict[str, type | tuple[type, ...]] = {
    "name": str,
    "description": (str, type(None)),
    "kind": str,
    "base": (dict, str, type(None)),
    "spec": dict,
    "k_floor": (int, float, type(None)),
    "metrics": dict,
    "files": dict,
    "sizes": dict,
    "created_at": str,
    "key_id": str,
}


def _sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _safe_name(name: Any) -> bool:
    """A member name that stays inside the extraction directory: relative, no `..`, printable, no `\\`."""
    if not isinstance(name, str) or not name or not name.isprintable() or "\\" in name:
        return False
    p = PurePosixPath(name)
    return not p.is_absolute() and ".." not in p.parts and not name.endswith("/") and bool(p.parts)


def pack(staging: str | Path, out: str | Path, manifest: dict[str, Any]) -> dict[str, Any]:
    """Zip every file under `staging` with a signed manifest into `out`, atomically. Returns the manifest."""
    staging, out = Path(staging), Path(out)
    sign = signer()  # before hashing gigabytes: a bad KOLM_SIGNING_KEY_FILE fails at once
    files = {
        p.relative_to(staging).as_posix(): _sha256_file(p) for p in sorted(staging.rglob("*")) if p.is_file()
    }
    if MANIFEST in files or SIGNATURE in files:
        raise KolmError(f"staging directory may not hold {MANIFEST} or {SIGNATURE}")
    full = {
        "format": FORMAT,
        **manifest,
        "files": files,
        # Signed byte counts: verify caps each member at its own size while it inflates.
        "sizes": {name: (staging / name).stat().st_size for name in files},
        "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "signature_alg": sign.alg,
        "key_id": sign.key_id,
    }
    body = json.dumps(full, indent=2, sort_keys=True).encode()
    sig = sign.sign(body)
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{out.name}.", suffix=".part", dir=out.parent)
    os.close(fd)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600; an artifact is an ordinary file
    try:
        with zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_DEFLATED, compresslevel=1) as z:
            z.writestr(MANIFEST, body)
            z.writestr(SIGNATURE, sig)
            for name in files:
                # safetensors are already dense; storing them saves seconds per compile and per load
                kind = zipfile.ZIP_STORED if name.endswith(".safetensors") else zipfile.ZIP_DEFLATED
                z.write(staging / name, name, compress_type=kind)
        os.replace(tmp, out)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return full


def _clean(value: Any, limit: int = 80) -> str:
    """`value` as text safe to echo: control, escape and bidi characters dropped, at most `limit` chars.

    Whatever an artifact says about itself (key_id, format, member names) is untrusted until its signature
    checks, and an escape sequence in it must not reach the user's terminal.
    """
    text = "".join(ch for ch in str(value) if ch.isprintable())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _open_zip(path: Path) -> zipfile.ZipFile:
    if not path.is_file():  # a mistyped path is the user's mistake (exit 2), not a bad artifact (exit 4)
        raise KolmError(f"{_clean(path, 300)}: no such artifact")
    where = _clean(path, 300)
    try:
        entries = _declared_entries(path)
        if entries is not None and entries > MAX_MEMBERS:
            # zipfile builds a ZipInfo per central-directory entry: refuse before it reads a million
            raise ArtifactError(f"{where}: {entries} zip entries, over the limit of {MAX_MEMBERS}")
        z = zipfile.ZipFile(path)
    except _CORRUPT as e:
        raise ArtifactError(f"{where}: not a .kolm artifact or truncated ({_clean(e)})") from None
    infos = z.infolist()
    counts = Counter(i.filename for i in infos)
    problem = None
    if len(infos) > MAX_MEMBERS:
        problem = f"{len(infos)} zip entries, over the limit of {MAX_MEMBERS}"
    elif dup := sorted(n for n, c in counts.items() if c > 1):
        problem = f"duplicate member names {_clean(dup[:5], 200)}"
    elif odd := [i.filename for i in infos if i.compress_type not in _METHODS or i.flag_bits & 0x1]:
        problem = f"members {_clean(odd[:5], 200)} are encrypted or use a compression kolm does not write"
    if problem:
        z.close()
        raise ArtifactError(f"{where}: {problem}")
    return z


def _declared_entries(path: Path) -> int | None:
    """The entry count the end-of-central-directory record declares (zip64 too), None when not found."""
    with path.open("rb") as f:
        size = f.seek(0, os.SEEK_END)
        tail_len = min(size, 22 + 65535 + 20)  # EOCD + the longest comment + the zip64 locator before it
        f.seek(size - tail_len)
        tail = f.read(tail_len)
        at = tail.rfind(b"PK\x05\x06")
        if at < 0 or len(tail) - at < 22:
            return None
        entries = struct.unpack_from("<H", tail, at + 10)[0]
        if entries != 0xFFFF or at < 20 or tail[at - 20 : at - 16] != b"PK\x06\x07":
            return entries
        (zip64_at,) = struct.unpack_from("<Q", tail, at - 20 + 8)
        if zip64_at + 56 > size:
            return None
        f.seek(zip64_at)
        record = f.read(56)
        if record[:4] != b"PK\x06\x06":
            return None
        return struct.unpack_from("<Q", record, 32)[0]


def _read_capped(z: zipfile.ZipFile, name: str, cap: int, where: str) -> bytes:
    """A small member read whole, refused when its header declares more than `cap` bytes or when it
    inflates past `cap` whatever the header says (zipfile stops at the declared size; this counts too)."""
    info = z.getinfo(name)
    if info.file_size > cap:
        raise ArtifactError(f"{where}: {name} declares {info.file_size} bytes, over the limit of {cap}")
    chunks, total = [], 0
    with z.open(info) as src:
        while chunk := src.read(min(CHUNK, cap + 1 - total)):
            total += len(chunk)
            if total > cap:
                raise ArtifactError(f"{where}: {name} inflates past the limit of {cap} bytes")
            chunks.append(chunk)
    return b"".join(chunks)


def _depth(value: Any) -> int:
    """Nesting depth of a JSON value, iteratively (a deep value must not exhaust the stack here)."""
    deepest, stack = 0, [(value, 1)]
    while stack:
        v, d = stack.pop()
        deepest = max(deepest, d)
        if d > MAX_DEPTH:
            break
        if isinstance(v, dict):
            stack.extend((x, d + 1) for x in v.values())
        elif isinstance(v, list):
            stack.extend((x, d + 1) for x in v)
    return deepest


def _parse_manifest(body: bytes) -> Any:
    """manifest.json's value, or None when it is not bounded JSON (never RecursionError or ValueError)."""
    try:
        value = json.loads(body)
    except (ValueError, RecursionError):
        return None
    return value if _depth(value) <= MAX_DEPTH else None


def _check_manifest(manifest: Any, where: str) -> dict[str, Any]:
    """The signed manifest's shape: every field a reader relies on has its type, or ArtifactError."""
    if not isinstance(manifest, dict):
        raise ArtifactError(f"{where}: manifest.json is not a JSON object of at most {MAX_DEPTH} levels")
    if manifest.get("format") != FORMAT:
        raise ArtifactError(f"{where}: format {_clean(repr(manifest.get('format')))} is not {FORMAT}")
    if manifest.get("signature_alg") not in ALGS:
        alg = _clean(repr(manifest.get("signature_alg")))
        raise ArtifactError(f"{where}: signature_alg {alg} is not {' or '.join(ALGS)}")
    for field, types in _FIELD_TYPES.items():
        if field in manifest and not isinstance(manifest[field], types):
            kind = type(manifest[field]).__name__
            raise ArtifactError(f"{where}: manifest field {field} has the wrong type ({kind})")
    lacking = [f for f in _REQUIRED if f not in manifest]
    if lacking:
        raise ArtifactError(f"{where}: manifest lacks {', '.join(lacking)}")
    files, sizes = manifest["files"], manifest.get("sizes")
    for name, digest in files.items():
        if not _safe_name(name):
            raise ArtifactError(f"{where}: unsafe member name {_clean(repr(name))}")
        if not isinstance(digest, str) or not _HEX64.fullmatch(digest):
            raise ArtifactError(f"{where}: {_clean(name)}: hash in the manifest is not a sha256 hex digest")
    if sizes is not None:
        if set(sizes) != set(files):
            raise ArtifactError(f"{where}: manifest sizes and files name different members")
        for name, size in sizes.items():
            if isinstance(size, bool) or not isinstance(size, int) or not 0 <= size <= MAX_MEMBER_BYTES:
                raise ArtifactError(
                    f"{where}: {_clean(name)}: size in the manifest is not a valid byte count"
                )
    return manifest


def verify(path: str | Path, extract_to: str | Path | None = None) -> dict[str, Any]:
    """Check signature and every file hash; optionally extract the verified members. Returns the manifest.

    Before the signature checks, only manifest.json and signature are read, each capped in size however it
    is compressed. Members are then hashed while they inflate, capped at the size the signed manifest
    declares; with `extract_to`, each goes to a temporary file that takes its name only once its hash
    matches (on any failure the caller removes the directory: OpenedArtifact does).
    """
    path = Path(path)
    where = _clean(path, 300)
    z = _open_zip(path)
    with z:
        try:
            names = z.namelist()
            if MANIFEST not in names or SIGNATURE not in names:
                raise ArtifactError(f"{where}: missing {MANIFEST} or {SIGNATURE}; not a .kolm artifact")
            body = _read_capped(z, MANIFEST, MAX_MANIFEST_BYTES, where)
            sig = _read_capped(z, SIGNATURE, MAX_SIGNATURE_BYTES, where).strip()
            if not _SIGNATURE_HEX.fullmatch(sig.decode("latin-1")):
                raise ArtifactError(
                    f"{where}: malformed signature (expected 64 or 128 lowercase hex characters)"
                )
            parsed = _parse_manifest(body)
            if not isinstance(parsed, dict):  # it must name its algorithm and key before it can be checked
                raise ArtifactError(
                    f"{where}: manifest.json is not a JSON object of at most {MAX_DEPTH} levels"
                )
            check_signature(body, sig, parsed, where)  # the manifest's own alg and key id, trusted keys only
            manifest = _check_manifest(parsed, where)
            files: dict[str, str] = manifest["files"]
            sizes: dict[str, int] | None = manifest.get("sizes")
            pickled = sorted(n for n in files if Path(n).suffix.lower() in PICKLE_SUFFIXES)
            if pickled:
                shown = _clean(pickled, 200)
                raise ArtifactError(f"{where}: pickle members {shown}; a .kolm holds safetensors only")
            present = set(names)
            extra = present - set(files) - {MANIFEST, SIGNATURE}
            missing = set(files) - present
            if extra or missing:
                shown = _clean(f"extra {sorted(extra)[:5]}, missing {sorted(missing)[:5]}", 300)
                raise ArtifactError(f"{where}: members differ from the manifest ({shown})")
            dest = Path(extract_to) if extract_to is not None else None
            for name, digest in files.items():
                info = z.getinfo(name)
                cap = MAX_MEMBER_BYTES if sizes is None else sizes[name]
                if sizes is not None and info.file_size != cap:
                    raise ArtifactError(
                        f"{where}: {_clean(name)} declares {info.file_size} bytes in the zip, "
                        f"the signed manifest {cap}"
                    )
                if info.file_size > cap:
                    raise ArtifactError(
                        f"{where}: {_clean(name)} declares {info.file_size} bytes, over {cap}"
                    )
                _extract_checked(z, info, digest, cap, sizes is not None, dest, where)
        except _CORRUPT as e:
            raise ArtifactError(f"{where}: corrupt or truncated artifact ({_clean(e)})") from None
    return manifest


def _extract_checked(
    z: zipfile.ZipFile,
    info: zipfile.ZipInfo,
    digest: str,
    cap: int,
    exact: bool,
    dest: Path | None,
    where: str,
) -> None:
    """Hash a member while it inflates (at most `cap` bytes, exactly `cap` when `exact`); with `dest`, it is
    written to a temporary file that takes the member's name only once the hash matches."""
    h, total, tmp = hashlib.sha256(), 0, None
    name = _clean(info.filename)
    try:
        if dest is not None:
            fd, tmp = tempfile.mkstemp(prefix=".member-", suffix=".part", dir=dest)
            dst: Any = os.fdopen(fd, "wb")
        else:
            dst = _NullWriter()
        with dst, z.open(info) as src:
            while chunk := src.read(CHUNK):
                total += len(chunk)
                if total > cap:
                    raise ArtifactError(f"{where}: {name} inflates past {cap} bytes")
                h.update(chunk)
                dst.write(chunk)
        if exact and total != cap:
            raise ArtifactError(f"{where}: {name} holds {total} bytes, the signed manifest says {cap}")
        if not hmac.compare_digest(h.hexdigest(), digest):
            raise ArtifactError(f"{where}: {name} does not match its hash in the manifest; tampered")
        if tmp is not None:
            target = dest / info.filename
            target.parent.mkdir(parents=True, exist_ok=True)
            os.replace(tmp, target)
            tmp = None
    finally:
        if tmp is not None:
            Path(tmp).unlink(missing_ok=True)


class _NullWriter:
    def write(self, _: bytes) -> None:
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


class OpenedArtifact:
    """A verified artifact extracted to a private temporary directory (removed on close())."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.dir = Path(tempfile.mkdtemp(prefix="kolm-artifact-"))
        try:
            self.manifest = verify(self.path, extract_to=self.dir)
        except BaseException:
            shutil.rmtree(self.dir, ignore_errors=True)
            raise

    def close(self) -> None:
        shutil.rmtree(self.dir, ignore_errors=True)

    def __enter__(self) -> OpenedArtifact:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def open_artifact(path: str | Path) -> OpenedArtifact:
    """Verify, then extract; callers load weights only from the returned directory."""
    return OpenedArtifact(path)


def verify_command(args) -> int:
    """kolm verify X.kolm: check the signature and every file hash."""
    m = verify(args.artifact)
    key = f"{m['signature_alg']}, key {_clean(m['key_id'], 32)}"
    print(
        f"ok {_clean(args.artifact, 300)}: signature valid ({key}), "
        f"{len(m['files'])} files match their hashes"
    )
    return 0


def inspect_command(args) -> int:
    """kolm inspect X.kolm: print the (verified) manifest."""
    m = verify(args.artifact)
    print(json.dumps(m, indent=2, sort_keys=True))
    return 0
