"""The signed .kolm artifact: pack, verify, open. No pickle anywhere.

A .kolm is a zip holding
    manifest.json   format "kolm/1", name, description, kind, base, spec, k_floor, metrics,
                    files {name: sha256} of every other member, created_at, signature_alg, key_id
    signature       hex HMAC-SHA256 of manifest.json's exact bytes (key: settings.signing_key())
    model.safetensors / adapter_model.safetensors, config.json, tokenizer files, labels.json, ...

open_artifact() checks the signature and every member's hash before anything else reads a byte of it;
any mismatch, a missing or extra member, a truncated zip or a wrong key raises ArtifactError (exit 4).
pack() writes a temporary file next to the target and renames it, so a failed compile leaves no file.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import shutil
import tempfile
import time
import zipfile
from pathlib import Path, PurePosixPath
from typing import Any

from kolm_ray.errors import ArtifactError, KolmError
from kolm_ray.settings import signing_key

FORMAT = "kolm/1"
MANIFEST = "manifest.json"
SIGNATURE = "signature"
SIGNATURE_ALG = "hmac-sha256"
MAX_MEMBER_BYTES = 64 << 30  # refuse zip bombs: no member larger than 64 GiB
PICKLE_SUFFIXES = frozenset({".bin", ".pkl", ".pickle", ".pt", ".pth", ".ckpt"})  # torch.save / pickle files


def _sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _safe_name(name: str) -> bool:
    p = PurePosixPath(name)
    return bool(name) and not p.is_absolute() and ".." not in p.parts and "\\" not in name


def pack(staging: str | Path, out: str | Path, manifest: dict[str, Any]) -> dict[str, Any]:
    """Zip every file under `staging` with a signed manifest into `out`, atomically. Returns the manifest."""
    staging, out = Path(staging), Path(out)
    key, key_id = signing_key()
    files = {
        p.relative_to(staging).as_posix(): _sha256_file(p) for p in sorted(staging.rglob("*")) if p.is_file()
    }
    if MANIFEST in files or SIGNATURE in files:
        raise KolmError(f"staging directory may not hold {MANIFEST} or {SIGNATURE}")
    full = {
        "format": FORMAT,
        **manifest,
        "files": files,
        "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "signature_alg": SIGNATURE_ALG,
        "key_id": key_id,
    }
    body = json.dumps(full, indent=2, sort_keys=True).encode()
    sig = hmac.new(key, body, hashlib.sha256).hexdigest()
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


def _open_zip(path: Path) -> zipfile.ZipFile:
    if not path.is_file():  # a mistyped path is the user's mistake (exit 2), not a bad artifact (exit 4)
        raise KolmError(f"{path}: no such artifact")
    try:
        return zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError) as e:
        raise ArtifactError(f"{path}: not a .kolm artifact or truncated ({e})") from None


def verify(path: str | Path, extract_to: str | Path | None = None) -> dict[str, Any]:
    """Check signature and every file hash; optionally extract the verified members. Returns the manifest."""
    path = Path(path)
    z = _open_zip(path)
    with z:
        try:
            names = set(z.namelist())
            if MANIFEST not in names or SIGNATURE not in names:
                raise ArtifactError(f"{path}: missing {MANIFEST} or {SIGNATURE}; not a .kolm artifact")
            body = z.read(MANIFEST)
            sig = z.read(SIGNATURE).decode("ascii", "replace").strip()
            key, key_id = signing_key()
            expected = hmac.new(key, body, hashlib.sha256).hexdigest()
            if not hmac.compare_digest(sig, expected):
                try:
                    claimed = json.loads(body).get("key_id")
                except ValueError:
                    claimed = None
                hint = (
                    f" (signed with key {claimed}, this key is {key_id})"
                    if claimed and claimed != key_id
                    else ""
                )
                raise ArtifactError(
                    f"{path}: signature does not match; tampered or signed with another key{hint}"
                )
            manifest = json.loads(body)
            if manifest.get("format") != FORMAT:
                raise ArtifactError(f"{path}: format {manifest.get('format')!r} is not {FORMAT}")
            if manifest.get("signature_alg") != SIGNATURE_ALG:
                raise ArtifactError(
                    f"{path}: signature_alg {manifest.get('signature_alg')!r} is not {SIGNATURE_ALG}"
                )
            files: dict[str, str] = manifest.get("files", {})
            pickled = sorted(n for n in files if Path(n).suffix.lower() in PICKLE_SUFFIXES)
            if pickled:
                raise ArtifactError(f"{path}: pickle members {pickled}; a .kolm holds safetensors only")
            extra = names - set(files) - {MANIFEST, SIGNATURE}
            missing = set(files) - names
            if extra or missing:
                raise ArtifactError(
                    f"{path}: members differ from the manifest (extra {sorted(extra)}, missing {sorted(missing)})"
                )
            dest = Path(extract_to) if extract_to is not None else None
            for name, digest in files.items():
                if not _safe_name(name):
                    raise ArtifactError(f"{path}: unsafe member name {name!r}")
                info = z.getinfo(name)
                if info.file_size > MAX_MEMBER_BYTES:
                    raise ArtifactError(f"{path}: member {name} is implausibly large")
                h = hashlib.sha256()
                target = None
                if dest is not None:
                    target = dest / name
                    target.parent.mkdir(parents=True, exist_ok=True)
                with z.open(info) as src, target.open("wb") if target else _NullWriter() as dst:
                    for chunk in iter(lambda: src.read(1 << 20), b""):
                        h.update(chunk)
                        dst.write(chunk)
                if not hmac.compare_digest(h.hexdigest(), digest):
                    raise ArtifactError(f"{path}: {name} does not match its hash in the manifest; tampered")
        except (zipfile.BadZipFile, EOFError, OSError, KeyError, UnicodeDecodeError, ValueError) as e:
            if isinstance(e, ArtifactError):
                raise
            raise ArtifactError(f"{path}: corrupt or truncated artifact ({e})") from None
    return manifest


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
    print(
        f"ok {args.artifact}: signature valid (key {m['key_id']}), {len(m['files'])} files match their hashes"
    )
    return 0


def inspect_command(args) -> int:
    """kolm inspect X.kolm: print the (verified) manifest."""
    m = verify(args.artifact)
    print(json.dumps(m, indent=2, sort_keys=True))
    return 0
