"""Summarise: per cluster its size, purity estimate, shape and top examples; a cluster's members for a
recipe; the plain-text table `kolm cluster` prints.
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any

import numpy as np

from kolm_ray.clustering.fit import ClusterModel, _unit
from kolm_ray.clustering.read import _loads, _missing
from kolm_ray.errors import KolmError

if TYPE_CHECKING:
    from kolm_ray.clustering import ClusterResult

TOP_EXAMPLES = 3


def summarize_cluster(group: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """One row per cluster: size, purity estimate, shape, top examples (nearest the centroid)."""
    from kolm_ray.clustering.purity import estimate_purity
    from kolm_ray.clustering.shape import infer_shape, labels_for

    emb = np.asarray(group["embedding"], dtype=np.float32)
    rejected = np.asarray(group["rejected"], dtype=bool)
    centroid = _unit(emb.mean(axis=0))
    near = np.argsort(-(emb @ centroid))
    keep = np.flatnonzero(~rejected)
    inputs = [str(group["input"][i]) for i in keep]
    outputs = [_loads(group["output"][i]) for i in keep]
    purity, method, note = None, None, None
    if len(keep) >= 10:
        try:
            shape = infer_shape(outputs, inputs)
            ok = [j for j, o in enumerate(outputs) if shape.conforms(o) is None]
            outs = [outputs[j] for j in ok]
            report = estimate_purity(
                emb[keep][ok],
                labels_for(shape, outs),
                [inputs[j] for j in ok],
                outs,
                conform_share=len(ok) / len(keep),
            )
            purity, method = report.purity, report.method
        except KolmError as e:
            note = str(e)
    summary = {
        "id": int(group["cluster"][0]),
        "size": len(emb),
        "rejected": int(rejected.sum()),
        "verified": int(sum(1 for v in group["verified"] if not _missing(v) and int(v) == 1)),
        "purity": purity,
        "purity_method": method,
        "shape": str(group["shape"][near[0]]),
        "fingerprint": str(group["fp"][near[0]]),
        "top_examples": [
            {"input": str(group["input"][i])[:200], "output": _loads(group["output"][i])}
            for i in near[:TOP_EXAMPLES]
        ],
    }
    if note:
        summary["note"] = note
    return {
        "namespace": np.array([str(group["namespace"][0])]),
        "cluster": np.array([summary["id"]]),
        "summary": np.array([json.dumps(summary, ensure_ascii=False)]),
    }


def summarise(ds: Any, models: dict[str, ClusterModel], summarize: bool) -> dict[str, list[dict[str, Any]]]:
    """Per namespace, its clusters largest first: full summaries (purity, examples) or just id and size."""
    out: dict[str, list[dict[str, Any]]] = {}
    if not models:
        return out
    if summarize:
        parts = sum(len(m.ids) for m in models.values())
        rows = (
            ds.groupby(["namespace", "cluster"], num_partitions=min(parts, 16))
            .map_groups(summarize_cluster, batch_format="numpy")
            .take_all()
        )
        for r in rows:
            out.setdefault(str(r["namespace"]), []).append(json.loads(r["summary"]))
    else:
        sizes: dict[tuple[str, int], int] = {}
        for b in ds.select_columns(["namespace", "cluster"]).iter_batches(batch_format="numpy"):
            for ns, c in zip(b["namespace"].astype(str), b["cluster"].tolist(), strict=True):
                sizes[(ns, c)] = sizes.get((ns, c), 0) + 1
        for (ns, c), n in sizes.items():
            out.setdefault(ns, []).append({"id": int(c), "size": n})
    for clusters in out.values():
        clusters.sort(key=lambda c: (-c["size"], c["id"]))
    return out


def cluster_members(result: ClusterResult, cluster_id: int) -> tuple[list[dict[str, Any]], np.ndarray]:
    """One cluster's observations (as dicts) and their embeddings (the pipeline's: static vectors by
    default), for a recipe."""

    def pick(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        mask = (batch["cluster"] == cluster_id) & (batch["namespace"].astype(str) == result.namespace)
        return {k: v[mask] for k, v in batch.items()}

    part = result.dataset.map_batches(pick, batch_format="numpy")
    obs, emb = [], []
    for b in part.iter_batches(batch_size=4096, batch_format="numpy"):
        for i in range(len(b["id"])):
            v = b["verified"][i]
            obs.append(
                {
                    "id": str(b["id"][i]),
                    "input": str(b["input"][i]),
                    "output": _loads(b["output"][i]),
                    "verified": None if _missing(v) else bool(int(v)),
                    "request": _loads(b["request"][i]),  # the recipe records the cluster's request shape
                }
            )
        emb.append(np.asarray(b["embedding"], dtype=np.float32))
    dim = result.model.centroids.shape[1]
    return obs, (np.concatenate(emb) if emb else np.zeros((0, dim), np.float32))


def format_table(clusters: list[dict[str, Any]]) -> str:
    """The clusters as a plain-text table (one line per top example under each cluster)."""
    lines = [f"{'id':>3}  {'size':>6}  {'purity':>6}  {'rejected':>8}  shape"]
    for c in clusters:
        purity = "-" if c.get("purity") is None else f"{c['purity']:.3f}"
        lines.append(
            f"{c['id']:>3}  {c['size']:>6}  {purity:>6}  {c.get('rejected', 0):>8}  {c.get('shape', '')}"
        )
        for ex in c.get("top_examples", []):
            out = json.dumps(ex["output"], ensure_ascii=False)
            lines.append(f"{'':>5}- {ex['input'][:70]!r} -> {out[:60]}")
    return "\n".join(lines)
