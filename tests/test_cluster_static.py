"""Static embeddings in clustering: the distilled model's cache (built once, reused, atomic), the split search
that asks MiniLM only where static vectors say a split is possible, and clusters + purity on a known mixture
through the Ray Data pipeline (slow)."""

from __future__ import annotations

import os
import random
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import recipe_data as rd

from kolm_ray.clustering import STATIC_DIMS, StaticEmbedder, fit_clusters, static_model_path
from kolm_ray.clustering.fit import CONFIRM_SAMPLE
from kolm_ray.clustering.static import MODEL_FILES

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture
def cache(tmp_path, monkeypatch) -> Path:
    path = tmp_path / "cache"
    monkeypatch.setenv("KOLM_CACHE", str(path))
    return path


def _writer(calls: list, pause: float = 0.0):
    """A build step that writes the model's files (their content does not matter to the cache)."""

    def build(base: Path, out: Path) -> None:
        calls.append(out)
        time.sleep(pause)
        for name in MODEL_FILES:
            (out / name).write_text(f"{name} from {base.name}")

    return build


# ---- the cache ----------------------------------------------------------------------------------------------


def test_the_static_model_is_built_once_then_reused(cache):
    calls: list = []
    first = static_model_path(build=_writer(calls))
    again = static_model_path(build=_writer(calls))
    assert first == again and first.parent == cache and len(calls) == 1
    assert sorted(p.name for p in first.iterdir()) == sorted(MODEL_FILES)
    assert [p.name for p in cache.iterdir() if p.name.endswith(".tmp")] == []
    # two processes (here threads, each with its own lock file handle) asking at once: one build
    other = cache.parent / "other"
    os.environ["KOLM_CACHE"] = str(other)
    calls.clear()
    got: list = []
    threads = [
        threading.Thread(target=lambda: got.append(static_model_path(build=_writer(calls, 0.3))))
        for _ in range(2)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(calls) == 1 and got[0] == got[1] and got[0].parent == other


def test_a_failed_build_leaves_no_model_and_the_next_call_builds_it(cache):
    def half(base: Path, out: Path) -> None:
        (out / "model.safetensors").write_bytes(b"\0" * 1000)
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        static_model_path(build=half)
    assert list(cache.glob("static-minilm-*")) == [] and list(cache.glob(".*.tmp")) == []

    def forgetful(base: Path, out: Path) -> None:  # a build that "succeeds" without the weights
        (out / "config.json").write_text("{}")

    with pytest.raises(RuntimeError, match="wrote no model.safetensors, tokenizer.json"):
        static_model_path(build=forgetful)
    assert list(cache.glob("static-minilm-*")) == []
    calls: list = []
    assert (static_model_path(build=_writer(calls)) / "model.safetensors").is_file() and len(calls) == 1


def test_a_build_killed_midway_is_never_served_and_its_leftovers_go(cache):
    # SIGKILL mid-write: no finally runs; what is left is a temporary directory, never the model
    script = (
        "import os, signal\n"
        "from kolm_ray.clustering.static import static_model_path\n"
        "def build(base, out):\n"
        "    (out / 'model.safetensors').write_bytes(b'half')\n"
        "    os.kill(os.getpid(), signal.SIGKILL)\n"
        "static_model_path(build=build)\n"
    )
    env = {**os.environ, "PYTHONPATH": str(REPO), "KOLM_CACHE": str(cache)}
    proc = subprocess.run([sys.executable, "-c", script], env=env, timeout=120)
    assert proc.returncode == -9
    leftovers = list(cache.glob(".static-minilm-*.tmp"))
    assert len(leftovers) == 1 and list(cache.glob("static-minilm-*")) == []
    old = time.time() - 2 * 3600  # a leftover older than an hour belongs to a dead build
    os.utime(leftovers[0], (old, old))
    calls: list = []
    built = static_model_path(build=_writer(calls))
    assert len(calls) == 1 and not leftovers[0].exists() and built.name.startswith("static-minilm-l6-")


# ---- the split search: MiniLM only where static vectors say a split is possible ----------------------------


def _blob(center: np.ndarray, n: int, spread: float, rng) -> np.ndarray:
    x = center + spread * rng.standard_normal((n, len(center)))
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def test_minilm_decides_the_split_only_where_the_static_search_finds_one():
    rng = np.random.default_rng(0)
    dims = STATIC_DIMS
    a, b = np.eye(dims)[0], np.eye(dims)[1]
    static = np.vstack([_blob(a, 200, 0.03, rng), _blob(b, 150, 0.03, rng)])
    fps = np.array(["f"] * 350)
    asked: list[int] = []

    def minilm_says(groups: bool):
        def confirm(idx: np.ndarray) -> np.ndarray:
            asked.append(len(idx))
            if not groups:  # MiniLM sees one group: the static split is not taken
                return _blob(np.eye(384)[5], len(idx), 0.3, rng)
            return np.where((idx < 200)[:, None], _blob(np.eye(384)[2], len(idx), 0.03, rng),
                            _blob(np.eye(384)[3], len(idx), 0.03, rng))  # fmt: skip

        return confirm

    one = fit_clusters(static, fps, confirm=minilm_says(False))
    assert len(one.ids) == 1 and asked == [min(350, CONFIRM_SAMPLE)] and one.minilm_rows == asked[0]
    two = fit_clusters(static, fps, confirm=minilm_says(True))
    assert len(two.ids) == 2 and two.confirmed["f"] >= 0.35
    parts = two.assign(static, fps)  # MiniLM's parts, as static centroids, assign every row
    assert len(set(parts[:200])) == 1 and len(set(parts[200:])) == 1 and parts[0] != parts[200]
    # no group structure at all in the static vectors: MiniLM is never asked
    asked.clear()
    noise = _blob(np.zeros(dims), 400, 1.0, rng)
    assert len(fit_clusters(noise, np.array(["f"] * 400), confirm=minilm_says(True)).ids) == 1 and asked == []


def test_a_row_of_an_unknown_shape_joins_a_cluster_of_its_own_request():
    from kolm_ray.clustering import request_fingerprint, structural_fingerprint

    rng = np.random.default_rng(1)
    a, b = np.eye(STATIC_DIMS)[0], np.eye(STATIC_DIMS)[1]
    banking = {"messages": [{"role": "system", "content": "Classify banking requests (day 3)."}]}
    travel = {"system": "Travel desk triage."}
    emb = np.vstack([_blob(a, 100, 0.05, rng), _blob(b, 100, 0.05, rng)])
    reqs = [banking] * 100 + [travel] * 100
    fps = np.array([structural_fingerprint(r, {"intent": "x"}) for r in reqs])
    rfps = np.array([request_fingerprint(r) for r in reqs])
    model = fit_clusters(emb, fps, rfps=rfps)
    assert len(model.ids) == 2
    # an upstream error of a banking call whose text reads like travel: its request decides, not its vector
    error_fp = structural_fingerprint(banking, {"error": {"code": 529}})
    banking_cluster = model.assign(emb[:1], fps[:1])[0]
    assert model.assign(emb[150:151], np.array([error_fp]), rfps[:1])[0] == banking_cluster
    assert model.assign(emb[150:151], np.array([error_fp]))[0] != banking_cluster  # without: nearest of all
    assert request_fingerprint({"system": "Travel desk triage."}) == request_fingerprint(
        {"messages": [{"role": "system", "content": "travel desk  triage."}]}
    )


@pytest.fixture(scope="module")
def static_embedder() -> StaticEmbedder:
    return StaticEmbedder(static_model_path())  # the real distillation: once per test session (KOLM_CACHE)


@pytest.mark.slow
def test_the_distilled_model_embeds_like_minilm(static_embedder):
    path = static_model_path()
    assert {p.name for p in path.iterdir()} >= set(MODEL_FILES)  # model2vec's files; its model card dropped
    e = static_embedder(
        ["I forgot my password", "how do I reset my password", "roast a chicken at 200 degrees"]
    )
    assert e.shape == (3, STATIC_DIMS) and e.dtype == np.float32
    assert np.allclose(np.linalg.norm(e, axis=1), 1, atol=1e-5)
    assert e[0] @ e[1] > e[0] @ e[2] + 0.2
    assert static_embedder([]).shape == (0, STATIC_DIMS)


def _mixture() -> tuple[list[dict], dict[str, str], float]:
    """Three tasks in one namespace: an intent classifier with 15% wrong labels behind its own system prompt,
    and, behind no system prompt and with the same output key set (one fingerprint), an order-priority
    tagger and a cooking tagger. Returns (observations, task per id, the classifier's true purity)."""
    cat, flips = rd.categorical(400, noise=0.15, seed=5)
    rows, task = [], {}
    for o in cat:
        rows.append({**o, "id": "c" + o["id"]})
        task["c" + o["id"]] = "classifier"
    for o in rd.extractive(200, seed=2):
        rows.append({**o, "id": "x" + o["id"], "output": {"label": o["output"]["priority"]}})
        task["x" + o["id"]] = "orders"
    for i, q in enumerate(rd.queries("cooking", 150, random.Random(0))):
        rows.append({**rd.obs(i, q, {"label": "cooking"}), "id": f"k{i:05d}"})
        task[f"k{i:05d}"] = "cooking"
    random.Random(1).shuffle(rows)
    return rows, task, 1 - flips / len(cat)


@pytest.mark.slow
def test_static_pipeline_separates_tasks_and_estimates_purity(static_embedder, tmp_path):
    import ray

    from kolm_ray.clustering import cluster_members, cluster_namespace
    from kolm_ray.recipe import recipe_from_observations

    rows, task, true_purity = _mixture()
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        result = cluster_namespace(rows, num_workers=2)
        members = {c["id"]: cluster_members(result, c["id"]) for c in result.clusters}
    finally:
        ray.shutdown()
    tasks_of = {cid: {task[m["id"]] for m in obs} for cid, (obs, _) in members.items()}
    assert all(len(t) == 1 for t in tasks_of.values()), tasks_of  # no cluster mixes two tasks
    assert {t for ts in tasks_of.values() for t in ts} == {"classifier", "orders", "cooking"}
    # the orders/cooking split was MiniLM's decision, on a sample of that fingerprint only
    assert 0 < result.timings["minilm_rows"] <= 2 * CONFIRM_SAMPLE and result.model.confirmed
    (cid,) = [cid for cid, t in tasks_of.items() if t == {"classifier"}]
    summary = next(c for c in result.clusters if c["id"] == cid)
    assert summary["size"] == 400 and abs(summary["purity"] - true_purity) <= 0.05
    obs, emb = members[cid]
    assert emb.shape == (400, STATIC_DIMS)
    info = recipe_from_observations(obs, out_dir=str(tmp_path / "r"), embeddings=emb)
    assert abs(info["k_floor"] - true_purity) <= 0.05
