"""Cluster a namespace's observations by intent with Ray Data.

    kolm cluster --namespace support                 # table: id, size, purity, top examples
    kolm cluster --namespace support --json --num-workers 2

The pipeline (`_pipeline`) reads top to bottom, one module of this package per phase:
    read      (read.py) ray.data.read_sql over the store, sharded by row (the driver never holds the raw text)
    featurize (featurize.py) map_batches(Featurizer) on an actor pool (`--num-workers`, one CPU each; one
              actor by default for static vectors, one per CPU for MiniLM): a
              static sentence vector per row (MiniLM distilled into token vectors once, cached: static.py)
              + structural signals: a fingerprint of the system prompt, the response format and the
              output's shape (its key set), the output's label values and the input's word prefixes
              (hashed: the driver never sees the text)
    fit       (fit.py) on the driver, from vectors, fingerprints and hashes only: a structural fingerprint
              always separates; within one, tasks asked in the user turn behind one shared system prompt
              are told apart by their instruction (a prefix many rows share) and the labels they answer
              with (template_tasks); else k-means splits only where the silhouette (cosine) over k = 2..6
              says the inputs form clearly separate groups (k = 1 otherwise). Where the static vectors say
              a split is possible, MiniLM embeds a sample of that fingerprint (in Ray) and decides
    assign    (fit.py) map_batches: nearest centroid within the row's fingerprint
    summarise (summarise.py) groupby(cluster).map_groups: size, purity (kolm_ray.clustering.purity), top examples

MiniLM for every row (`embedder="minilm"`: 10 CPU-seconds per 1,000 inputs here, against ~0.06 for the
static vectors) is the baseline `benchmarks/recipe.py` measures against. MiniLM runs as ONNX with int8
weights (built once into the cache; about 3x faster than PyTorch fp32 on CPU); KOLM_EMBED_BACKEND=torch
selects the PyTorch model instead.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from typing import Any

import numpy as np

from kolm_ray.clustering.featurize import (
    EMBED_DIM,
    Featurizer,
    MiniLMEmbedder,
    embed_texts,
    featurize,
    onnx_model_path,
    output_shape,
    request_fingerprint,
    response_format,
    structural_fingerprint,
    system_prompt,
    vocab_label,
)
from kolm_ray.clustering.fit import ClusterModel, assign, fit, fit_clusters, shared_label_share
from kolm_ray.clustering.read import read, read_observations, rows_from_observations
from kolm_ray.clustering.static import STATIC_DIMS, StaticEmbedder, static_model_path
from kolm_ray.clustering.summarise import cluster_members, format_table, summarise, summarize_cluster
from kolm_ray.errors import KolmError
from kolm_ray.placement import ray_session

# ---- the pipeline -------------------------------------------------------------------------------------------

__all__ = [
    "EMBED_DIM", "STATIC_DIMS", "ClusterModel", "ClusterResult", "Featurizer", "MiniLMEmbedder", "StaticEmbedder",
    "cluster_command", "static_model_path",
    "cluster_members", "cluster_namespace", "cluster_namespaces", "embed_texts", "fit_clusters",
    "format_table", "onnx_model_path", "output_shape", "read_observations", "response_format",
    "request_fingerprint", "rows_from_observations", "shared_label_share", "structural_fingerprint", "summarize_cluster",
    "system_prompt", "vocab_label",
]  # fmt: skip


@dataclass
class ClusterResult:
    """Clusters (largest first), the materialized dataset with a `cluster` column, and phase timings."""

    clusters: list[dict[str, Any]]
    dataset: Any
    model: ClusterModel
    timings: dict[str, float]
    rows: int
    namespace: str = ""
    """The rows of `dataset` this result is about (a dataset may hold several namespaces)."""


def _workers(num_workers: int | None, embedder: str) -> int:
    import ray

    if num_workers is not None:
        if num_workers < 1:
            raise KolmError(f"--num-workers must be >= 1, got {num_workers}")
        return num_workers
    if embedder == "static":
        # ~0.06 CPU-ms per row: one actor embeds 100k rows in seconds, and a second one's start (a Python
        # process importing Ray Data) costs more than it saves (benchmarks/recipe.py: 1 vs 2 workers)
        return 1
    return max(1, int(ray.available_resources().get("CPU", 1)))


def cluster_namespace(
    source: str | list[Any],
    namespace: str | None = None,
    num_workers: int | None = None,
    summarize: bool = True,
    seed: int = 0,
    embedder: str = "static",
    include_untrusted: bool = False,
) -> ClusterResult:
    """Run the pipeline on a store URL + namespace, or on an in-memory list of observations.

    Needs Ray initialized (see `ray_session`). Returns no clusters for an empty namespace. From a store,
    only rows a model may learn from (observations/keys.py), unless `include_untrusted`.
    """
    if isinstance(source, str):
        if not namespace:
            raise KolmError("--namespace is required")
        return cluster_namespaces(
            source, [namespace], num_workers, summarize, seed, embedder, include_untrusted
        )[namespace]
    return _pipeline(source, [""], num_workers, summarize, seed, embedder)[""]


def cluster_namespaces(
    store_url: str,
    namespaces: list[str],
    num_workers: int | None = None,
    summarize: bool = True,
    seed: int = 0,
    embedder: str = "static",
    include_untrusted: bool = False,
) -> dict[str, ClusterResult]:
    """Cluster several namespaces in one pass: one read, one featurize actor pool, then a fit per namespace
    (clusters never span namespaces). Cheaper than one pipeline per namespace: each pipeline pays for its
    actors' start and its operators' scheduling (about 3 s on 2 CPUs). embedder: "static" (the default) or
    "minilm" (MiniLM for every row: the baseline)."""
    if not namespaces:
        raise KolmError("--namespace is required")
    return _pipeline(
        store_url, list(dict.fromkeys(namespaces)), num_workers, summarize, seed, embedder, include_untrusted
    )


def _pipeline(
    source: str | list[Any],
    namespaces: list[str],
    num_workers: int | None,
    summarize: bool,
    seed: int,
    embedder: str = "static",
    include_untrusted: bool = False,
) -> dict[str, ClusterResult]:
    workers = _workers(num_workers, embedder)
    t0 = time.perf_counter()
    ds = read(source, namespaces, num_blocks=2 * workers, include_untrusted=include_untrusted)
    ds = featurize(ds, workers, embedder)
    t_embed = time.perf_counter()
    models, counts, fit_s = fit(ds, namespaces, seed, embedder, workers)
    t_fit = time.perf_counter()
    known = {ns: m for ns, m in models.items() if m is not None}
    ds = assign(ds, known)
    clusters = summarise(ds, known, summarize)
    t_end = time.perf_counter()
    results = {}
    dim = STATIC_DIMS if embedder == "static" else EMBED_DIM
    for ns in namespaces:
        model = models[ns] or fit_clusters(np.zeros((0, dim)), np.array([]))
        timings = {
            "embed_s": t_embed - t0,  # read + featurize, shared by the namespaces of this pass
            "fit_s": fit_s[ns],  # MiniLM on the split search's samples included
            "assign_summarize_s": t_end - t_fit,
            "total_s": t_end - t0,
            "namespaces_in_pass": len(namespaces),
            "minilm_rows": model.minilm_rows,
        }
        results[ns] = ClusterResult(
            clusters.get(ns, []), ds, model, {k: round(v, 3) for k, v in timings.items()}, counts[ns], ns
        )
    return results


def cluster_command(args: Any) -> int:
    """kolm cluster: run the Ray Data pipeline on one or more namespaces and print their clusters."""
    from kolm_ray.observations.dataset import check_readable
    from kolm_ray.settings import redact_url, store_url

    url = store_url(args.store)
    namespaces = list(dict.fromkeys(args.namespace))
    include = getattr(args, "include_untrusted", False)
    check_readable(url, namespaces, include)  # an empty or unknown namespace: exit 2 before Ray starts
    with ray_session(worker_logs=False):
        results = cluster_namespaces(url, namespaces, num_workers=args.num_workers, include_untrusted=include)
    empty = [ns for ns in namespaces if not results[ns].clusters]
    if empty:
        raise KolmError(f"namespace {empty[0]!r} has no observations in {redact_url(url)}")
    if args.json:
        docs = [{"namespace": ns, "rows": r.rows, "clusters": r.clusters, "timings": r.timings}
                for ns, r in results.items()]  # fmt: skip
        print(json.dumps(docs[0] if len(docs) == 1 else {"namespaces": docs}, indent=2, ensure_ascii=False))
    else:
        for ns, r in results.items():
            print(f"namespace {ns}: {r.rows} observations, {len(r.clusters)} clusters")
            print(format_table(r.clusters))
    return 0
