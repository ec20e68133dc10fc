"""Fit and assign: clusters per structural fingerprint, split by k-means only where the silhouette says the
inputs form clearly separate groups; then each row's nearest centroid within its fingerprint.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from kolm_ray.clustering.featurize import EMBED_DIM

MAX_FIT = 20000  # the fit step sees at most this many rows (a random sample); assignment sees all
MAX_K = 6
SPLIT_SAMPLE = 1000  # rows per fingerprint the split search sees (k-means k = 2..MAX_K + silhouettes)
MIN_SILHOUETTE = 0.35  # within one fingerprint, split only clearly separate input groups (CLINC domains
# score 0.15-0.30 on their own, so one task is never split into its topics)
MIN_CLUSTER = 20


@dataclass
class ClusterModel:
    """Centroids (unit vectors), the fingerprint each belongs to, and cluster ids (largest first)."""

    centroids: np.ndarray
    fingerprints: list[str]
    ids: list[int]
    silhouettes: dict[str, float] = field(default_factory=dict)

    def assign(self, emb: np.ndarray, fps: np.ndarray) -> np.ndarray:
        sims = emb @ self.centroids.T
        same = np.array(self.fingerprints)[None, :] == np.asarray(fps)[:, None]
        known = same.any(axis=1)
        # Within the row's fingerprint when it is known; the nearest of all otherwise.
        masked = np.where(same | ~known[:, None], sims, -np.inf)
        return np.array(self.ids)[masked.argmax(axis=1)]


def shared_label_share(labels: np.ndarray, parts: np.ndarray) -> float:
    """Share of labelled rows whose label value occurs in two or more parts (each >= 5% of that label)."""
    rows = shared = 0
    for value in set(labels.tolist()) - {""}:
        where = parts[labels == value]
        counts = np.bincount(where)
        rows += len(where)
        if (counts >= max(1, 0.05 * len(where))).sum() >= 2:
            shared += len(where)
    return shared / rows if rows else 0.0


def fit_clusters(
    emb: np.ndarray, fps: np.ndarray, labels: np.ndarray | None = None, seed: int = 0
) -> ClusterModel:
    """Choose the clusters from the data: one per fingerprint, split further by k-means only when the
    silhouette over k = 2..6 is at least MIN_SILHOUETTE, every part has MIN_CLUSTER rows, and the parts do
    not share their output labels (parts answered from one vocabulary are one task)."""
    from sklearn.cluster import KMeans
    from sklearn.metrics import silhouette_score

    rng = np.random.default_rng(seed)
    found: list[tuple[int, str, np.ndarray]] = []  # (size, fingerprint, centroid)
    silhouettes = {}
    labels = np.full(len(fps), "") if labels is None else np.asarray(labels)
    for fp in sorted(set(fps.tolist())):
        x, lab = emb[fps == fp], labels[fps == fp]
        best_k, best_s, best_labels = 1, -1.0, None
        if len(x) >= 2 * MIN_CLUSTER:
            pick = rng.choice(len(x), min(len(x), SPLIT_SAMPLE), replace=False)
            sample, sample_lab = x[pick], lab[pick]
            for k in range(2, MAX_K + 1):
                if len(sample) < k * MIN_CLUSTER:
                    break
                # One k-means++ start: a split that needs several starts to be found is not "clearly separate".
                km = KMeans(n_clusters=k, n_init=1, random_state=seed).fit(sample)
                sizes = np.bincount(km.labels_, minlength=k)
                if sizes.min() < max(MIN_CLUSTER, 0.05 * len(sample)):
                    continue
                s = float(silhouette_score(sample, km.labels_, metric="cosine"))
                if s >= MIN_SILHOUETTE and shared_label_share(sample_lab, km.labels_) >= 0.5:
                    continue  # separate-looking inputs answered from one vocabulary: one task
                if s > best_s:
                    best_k, best_s, best_labels = k, s, km
            silhouettes[fp] = round(best_s, 4)
        if best_k > 1 and best_s >= MIN_SILHOUETTE:
            parts = best_labels.predict(x)
            for c in range(best_k):
                found.append((int((parts == c).sum()), fp, _unit(x[parts == c].mean(axis=0))))
        else:
            found.append((len(x), fp, _unit(x.mean(axis=0))))
    found.sort(key=lambda t: (-t[0], t[1]))
    if not found:
        return ClusterModel(np.zeros((0, EMBED_DIM), np.float32), [], [], silhouettes)
    return ClusterModel(
        centroids=np.stack([c for _, _, c in found]).astype(np.float32),
        fingerprints=[fp for _, fp, _ in found],
        ids=list(range(len(found))),
        silhouettes=silhouettes,
    )


def _unit(v: np.ndarray) -> np.ndarray:
    return v / max(float(np.linalg.norm(v)), 1e-12)


def _assign_batch(batch: dict[str, np.ndarray], models: dict[str, ClusterModel]) -> dict[str, np.ndarray]:
    """Nearest centroid of the row's own namespace (cluster ids are per namespace)."""
    names = batch["namespace"].astype(str)
    cluster = np.zeros(len(names), dtype=np.int64)
    emb = np.asarray(batch["embedding"], dtype=np.float32)
    for ns in np.unique(names):
        rows = names == ns
        cluster[rows] = models[str(ns)].assign(emb[rows], batch["fp"][rows])
    batch["cluster"] = cluster
    return batch


def _fit_samples(ds: Any, counts: dict[str, int], seed: int) -> dict[str, dict[str, list[np.ndarray]]]:
    """Each namespace's fit rows (at most ~MAX_FIT, a uniform sample), rejected rows left out, in one pass
    over the embeddings, fingerprints and labels (never the text)."""
    rng = np.random.default_rng(seed)
    out: dict[str, dict[str, list[np.ndarray]]] = {}
    cols = ["namespace", "embedding", "fp", "label", "rejected"]
    for b in ds.select_columns(cols).iter_batches(batch_size=4096, batch_format="numpy"):
        names = b["namespace"].astype(str)
        # rejected calls (errors) never shape the clusters
        keep = ~np.asarray(b["rejected"], dtype=bool)
        share = np.array([min(1.0, MAX_FIT / max(1, counts.get(n, 1))) for n in names])
        keep &= rng.random(len(names)) < share
        for ns in np.unique(names[keep]):
            rows = keep & (names == ns)
            part = out.setdefault(str(ns), {"emb": [], "fp": [], "label": []})
            part["emb"].append(np.asarray(b["embedding"], dtype=np.float32)[rows])
            part["fp"].append(np.asarray(b["fp"])[rows])
            part["label"].append(np.asarray(b["label"])[rows])
    return out


def _fit_namespace(
    sample: dict[str, list[np.ndarray]] | None, ds: Any, namespace: str, seed: int
) -> ClusterModel:
    if sample is not None:
        model = fit_clusters(
            np.concatenate(sample["emb"]), np.concatenate(sample["fp"]), np.concatenate(sample["label"]), seed
        )
        if model.ids:
            return model
    # every row rejected: one cluster so they can still be listed
    emb = [
        np.asarray(b["embedding"], dtype=np.float32)[b["namespace"].astype(str) == namespace]
        for b in ds.select_columns(["namespace", "embedding"]).iter_batches(batch_format="numpy")
    ]
    return ClusterModel(_unit(np.concatenate(emb).mean(axis=0))[None, :].astype(np.float32), ["*"], [0])


def fit(
    ds: Any, namespaces: list[str], seed: int
) -> tuple[dict[str, ClusterModel | None], dict[str, int], dict[str, float]]:
    """The fit phase, on the driver: (model per namespace, None when it has no rows; row counts; seconds)."""
    counts: dict[str, int] = dict.fromkeys(namespaces, 0)
    for b in ds.select_columns(["namespace"]).iter_batches(batch_size=None, batch_format="numpy"):
        for ns, c in zip(*np.unique(b["namespace"].astype(str), return_counts=True), strict=True):
            counts[str(ns)] = counts.get(str(ns), 0) + int(c)
    samples = _fit_samples(ds, counts, seed)
    models: dict[str, ClusterModel | None] = {}
    seconds: dict[str, float] = {}
    for ns in namespaces:
        t = time.perf_counter()
        models[ns] = _fit_namespace(samples.get(ns), ds, ns, seed) if counts[ns] else None
        seconds[ns] = time.perf_counter() - t
    return models, counts, seconds


def assign(ds: Any, models: dict[str, ClusterModel]):
    """The assign phase: a `cluster` column, each row's nearest centroid within its namespace."""
    if not models:
        return ds
    return ds.map_batches(
        _assign_batch, fn_kwargs={"models": models}, batch_format="numpy", batch_size=1024
    ).materialize()
