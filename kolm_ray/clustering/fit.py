"""Fit and assign: clusters per structural fingerprint, split by k-means only where the silhouette says the
inputs form clearly separate groups; then each row's nearest centroid within its fingerprint.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from threadpoolctl import threadpool_limits

from kolm_ray.clustering.featurize import EMBED_DIM, embed_rows

MAX_FIT = 20000  # the fit step sees at most this many rows (a random sample); assignment sees all
MAX_K = 6
SPLIT_SAMPLE = 1000  # rows per fingerprint the split search sees (k-means k = 2..MAX_K + silhouettes)
MIN_SILHOUETTE = 0.35  # within one fingerprint, split only clearly separate input groups (CLINC domains
# score 0.15-0.30 on their own, so one task is never split into its topics)
MIN_CLUSTER = 20
# Static vectors only say where a split is possible (best cosine silhouette over k, on the same sample).
# Measured: groups that MiniLM splits (its silhouette >= 0.35) scored 0.41-0.56 with static vectors; one-task
# fingerprints (CLINC domains, templated intents) 0.07-0.29, and 0.35 once where MiniLM said 0.31 (no split).
# Below the gate MiniLM is never asked; above it MiniLM decides.
STATIC_GATE = 0.30
CONFIRM_SAMPLE = 300  # rows per fingerprint MiniLM embeds when the static search finds a possible split
# One app, one system prompt, the instruction in the user turn: tasks told apart by what they answer and how
# they are asked (template_tasks). A word prefix at least TEMPLATE_SHARE of a fingerprint's rows share (and
# MIN_CLUSTER) is template text; a template and a label are linked when LINK_SHARE of the label's rows (and
# LINK_MIN) carry that template. A task is a linked set of >= 2 labels holding >= TASK_SHARE of the rows.
TEMPLATE_SHARE = 0.02
LINK_SHARE = 0.05
LINK_MIN = 3
TASK_SHARE = 0.05


@dataclass
class ClusterModel:
    """Centroids (unit vectors), the fingerprint each belongs to, and cluster ids (largest first)."""

    centroids: np.ndarray
    fingerprints: list[str]
    ids: list[int]
    silhouettes: dict[str, float] = field(default_factory=dict)
    confirmed: dict[str, float] = field(default_factory=dict)
    """Fingerprints whose split MiniLM decided, and its best silhouette there."""
    tasks: dict[str, int] = field(default_factory=dict)
    """Fingerprints template_tasks split, and into how many tasks."""
    minilm_rows: int = 0
    """Rows the split search embedded with MiniLM."""
    request_fps: list[str] = field(default_factory=list)
    """Per centroid, the request fingerprint (system prompt + response format) of its rows."""
    by_label: dict[str, int] = field(default_factory=dict)
    """fingerprint + "/" + label -> cluster id, where template_tasks split a fingerprint by task."""
    by_template: dict[str, int] = field(default_factory=dict)
    """fingerprint + "/" + template prefix hash -> cluster id, likewise (rows without a known label)."""

    def assign(
        self,
        emb: np.ndarray,
        fps: np.ndarray,
        rfps: np.ndarray | None = None,
        labels: np.ndarray | None = None,
        prefixes: np.ndarray | None = None,
    ) -> np.ndarray:
        out = self._nearest(emb, fps, rfps)
        if not (self.by_label or self.by_template):
            return out
        # A fingerprint split by task: the row's label says which, else its longest known template prefix
        # (an upstream error has no label, but the same instruction), else the nearest centroid.
        for i, fp in enumerate(np.asarray(fps).tolist()):
            lab = None if labels is None else self.by_label.get(f"{fp}/{labels[i]}")
            if lab is not None:
                out[i] = lab
                continue
            if prefixes is None:
                continue
            rfp = None if rfps is None else str(rfps[i])
            for h in reversed(str(prefixes[i]).split(",")):
                hit = self.by_template.get(f"{fp}/{h}")
                if hit is None and rfp is not None:
                    hit = self.by_template.get(f"r{rfp}/{h}")
                if hit is not None:
                    out[i] = hit
                    break
        return out

    def _nearest(self, emb: np.ndarray, fps: np.ndarray, rfps: np.ndarray | None) -> np.ndarray:
        sims = emb @ self.centroids.T
        same = np.array(self.fingerprints)[None, :] == np.asarray(fps)[:, None]
        known = same.any(axis=1)
        if rfps is not None and len(self.request_fps) == len(self.ids):
            # An unknown fingerprint (an upstream error's output shape): the clusters of the same request.
            same_request = np.array(self.request_fps)[None, :] == np.asarray(rfps)[:, None]
            use = ~known & same_request.any(axis=1)
            same[use] = same_request[use]
            known |= use
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


def template_tasks(
    prefixes: list[list[str]], labels: np.ndarray
) -> tuple[np.ndarray, dict[str, int], dict[str, int]] | None:
    """Tasks one fingerprint holds, told apart by what they answer and how they are asked, when the inputs
    alone do not separate them (one app, one system prompt, the instruction in the user turn; a banking and
    a travel classifier both answering {"label": ...}).

    Each row's template is its longest word prefix that TEMPLATE_SHARE of the rows share (an instruction, or
    a common opening such as "how do i"). Labels and templates form a graph, linked where LINK_SHARE of a
    label's rows carry the template: two phrasings of one instruction meet in the labels they answer with,
    and two tasks with their own vocabularies never meet. A task is a connected part with two or more labels
    and TASK_SHARE of the rows. Returns (task per row, -1 where none says; label -> task; template -> task)
    when there are two tasks or more, else None (the caller's silhouette search decides, as for inputs
    without templates, whose common openings link every label of a task)."""
    from collections import Counter

    n = len(labels)
    counts = Counter(h for p in prefixes for h in p)
    need = max(MIN_CLUSTER, TEMPLATE_SHARE * n)
    templates = [next((h for h in reversed(p) if counts[h] >= need), "") for p in prefixes]
    per_label = Counter(lab for lab in labels.tolist() if lab)
    if len(per_label) < 4:
        return None
    parent: dict[tuple[str, str], tuple[str, str]] = {}

    def find(x: tuple[str, str]) -> tuple[str, str]:
        parent.setdefault(x, x)
        while parent[x] != x:
            parent[x] = parent[parent[x]]
            x = parent[x]
        return x

    for lab in per_label:
        find(("l", lab))
    pairs = Counter((t, lab) for t, lab in zip(templates, labels.tolist(), strict=True) if lab)
    for (t, lab), c in pairs.items():
        if c >= max(LINK_MIN, LINK_SHARE * per_label[lab]):
            parent[find(("t", t))] = find(("l", lab))
    rows_in, labels_in = Counter(), Counter()
    for lab, c in per_label.items():
        root = find(("l", lab))
        rows_in[root] += c
        labels_in[root] += 1
    tasks = sorted(r for r in rows_in if labels_in[r] >= 2 and rows_in[r] >= max(MIN_CLUSTER, TASK_SHARE * n))
    if len(tasks) < 2:
        return None
    task_of = {r: i for i, r in enumerate(tasks)}
    by_label = {lab: task_of[find(("l", lab))] for lab in per_label if find(("l", lab)) in task_of}
    by_template = {t: task_of[find(("t", t))] for t in set(templates) - {""} if ("t", t) in parent
                   and find(("t", t)) in task_of}  # fmt: skip
    row_task = np.array(
        [by_label.get(lab, by_template.get(t, -1)) for lab, t in zip(labels.tolist(), templates, strict=True)]
    )
    return row_task, by_label, by_template


def _split_search(
    sample: np.ndarray, sample_lab: np.ndarray, threshold: float, seed: int
) -> tuple[int, float, Any]:
    """k-means over k = 2..MAX_K on the sample: (best k, its cosine silhouette, the k-means), -1.0 when no k
    qualifies. A k whose silhouette reaches `threshold` but whose parts share their output labels is skipped
    (separate-looking inputs answered from one vocabulary: one task)."""
    from sklearn.cluster import KMeans
    from sklearn.metrics import silhouette_score

    best_k, best_s, best_km = 1, -1.0, None
    for k in range(2, MAX_K + 1):
        if len(sample) < k * MIN_CLUSTER:
            break
        # One k-means++ start: a split that needs several starts to be found is not "clearly separate".
        km = KMeans(n_clusters=k, n_init=1, random_state=seed).fit(sample)
        sizes = np.bincount(km.labels_, minlength=k)
        if sizes.min() < max(MIN_CLUSTER, 0.05 * len(sample)):
            continue
        s = float(silhouette_score(sample, km.labels_, metric="cosine"))
        if s >= threshold and shared_label_share(sample_lab, km.labels_) >= 0.5:
            continue
        if s > best_s:
            best_k, best_s, best_km = k, s, km
    return best_k, best_s, best_km


def fit_clusters(
    emb: np.ndarray,
    fps: np.ndarray,
    labels: np.ndarray | None = None,
    seed: int = 0,
    confirm: Callable[[np.ndarray], np.ndarray] | None = None,
    rfps: np.ndarray | None = None,
    prefixes: np.ndarray | None = None,
) -> ClusterModel:
    """Choose the clusters from the data: one per fingerprint, split by task where template_tasks finds two
    or more (with `prefixes`, template_prefixes per row), else further by k-means only when the
    silhouette over k = 2..6 is at least MIN_SILHOUETTE, every part has MIN_CLUSTER rows, and the parts do
    not share their output labels (parts answered from one vocabulary are one task).

    With `confirm` (emb are static vectors; confirm(row indices into emb) -> their MiniLM embeddings), the
    static search only says where a split is possible (silhouette >= STATIC_GATE); there the decision is
    made as above on MiniLM embeddings of CONFIRM_SAMPLE of the rows, and the parts it finds become static
    centroids (their rows' mean static vector), which assign every row."""
    # One thread for k-means and the silhouettes: on [1000 x 256] samples threads save little, and on a
    # busy machine they cost a lot (the benchmark's 7 fingerprints at load 5 on 2 cores: 11.8 s with
    # OpenMP's and BLAS's default threads, 1.5 s with one).
    with threadpool_limits(limits=1):
        return _fit(emb, fps, labels, seed, confirm, rfps, prefixes)


def _fit(
    emb: np.ndarray,
    fps: np.ndarray,
    labels: np.ndarray | None,
    seed: int,
    confirm: Callable[[np.ndarray], np.ndarray] | None,
    rfps: np.ndarray | None,
    prefixes: np.ndarray | None = None,
) -> ClusterModel:
    rng = np.random.default_rng(seed)
    # (size, fingerprint, centroid, {label key: part}, {template key: part}) per part
    found: list[tuple[int, str, np.ndarray, list[str], list[str]]] = []
    request_of: dict[str, str] = {}
    silhouettes: dict[str, float] = {}
    confirmed: dict[str, float] = {}
    tasks: dict[str, int] = {}
    minilm_rows = 0
    labels = np.full(len(fps), "") if labels is None else np.asarray(labels)
    for fp in sorted(set(fps.tolist())):
        rows = np.flatnonzero(fps == fp)
        x, lab = emb[rows], labels[rows]
        if rfps is not None:
            values, counts = np.unique(np.asarray(rfps)[rows], return_counts=True)
            request_of[fp] = str(values[counts.argmax()])
        centroids = [x.mean(axis=0)]
        split = None
        if prefixes is not None and len(x) >= 2 * MIN_CLUSTER:
            split = template_tasks([str(p).split(",") if p else [] for p in prefixes[rows]], lab)
        if split is not None:
            row_task, by_label, by_template = split
            k = int(row_task.max()) + 1
            units = np.stack([_unit(x[row_task == c].mean(axis=0)) for c in range(k)])
            # rows no label or template places: their nearest task centroid
            part = np.where(row_task >= 0, row_task, (x @ units.T).argmax(axis=1))
            tasks[fp] = k  # no silhouette search: the tasks were told apart by labels and templates
            rkey = f"r{request_of[fp]}" if rfps is not None else None
            for c in range(k):
                keys_l = [f"{fp}/{lab}" for lab, t in by_label.items() if t == c]
                keys_t = [f"{fp}/{h}" for h, t in by_template.items() if t == c]
                keys_t += [f"{rkey}/{h}" for h, t in by_template.items() if t == c and rkey]
                found.append((int((part == c).sum()), fp, units[c], keys_l, keys_t))
            continue
        if len(x) >= 2 * MIN_CLUSTER:
            pick = rng.choice(len(x), min(len(x), SPLIT_SAMPLE), replace=False)
            gate = MIN_SILHOUETTE if confirm is None else STATIC_GATE
            k, s, km = _split_search(x[pick], lab[pick], gate, seed)
            silhouettes[fp] = round(s, 4)
            if k > 1 and s >= gate and confirm is None:
                parts = km.predict(x)
                centroids = [x[parts == c].mean(axis=0) for c in range(k)]
            elif k > 1 and s >= gate:
                sub = pick[:CONFIRM_SAMPLE]  # pick is a random order: its head is a uniform sample
                minilm = confirm(rows[sub])
                minilm_rows += len(sub)
                k, s, km = _split_search(minilm, lab[sub], MIN_SILHOUETTE, seed)
                confirmed[fp] = round(s, 4)
                if k > 1 and s >= MIN_SILHOUETTE:
                    centroids = [x[sub][km.labels_ == c].mean(axis=0) for c in range(k)]
        units = np.stack([_unit(c) for c in centroids])
        sizes = np.bincount((x @ units.T).argmax(axis=1), minlength=len(units))
        # a MiniLM part that no row's static vector is nearest to is no cluster
        found += [(int(n), fp, u, [], []) for n, u in zip(sizes, units, strict=True) if n > 0]
    found.sort(key=lambda t: (-t[0], t[1]))
    if not found:
        return ClusterModel(np.zeros((0, emb.shape[1] if emb.ndim == 2 else EMBED_DIM), np.float32), [], [])
    return ClusterModel(
        centroids=np.stack([c for _, _, c, _, _ in found]).astype(np.float32),
        fingerprints=[fp for _, fp, *_ in found],
        ids=list(range(len(found))),
        silhouettes=silhouettes,
        confirmed=confirmed,
        tasks=tasks,
        minilm_rows=minilm_rows,
        request_fps=[request_of[fp] for _, fp, *_ in found] if rfps is not None else [],
        by_label={key: i for i, (*_, keys, _) in enumerate(found) for key in keys},
        by_template={key: i for i, (*_, keys) in enumerate(found) for key in keys},
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
        rfps = batch["rfp"][rows] if "rfp" in batch else None
        labels = batch["label"][rows] if "label" in batch else None
        prefixes = batch["prefixes"][rows] if "prefixes" in batch else None
        cluster[rows] = models[str(ns)].assign(emb[rows], batch["fp"][rows], rfps, labels, prefixes)
    batch["cluster"] = cluster
    return batch


def _fit_samples(ds: Any, counts: dict[str, int], seed: int) -> dict[str, dict[str, list[np.ndarray]]]:
    """Each namespace's fit rows (at most ~MAX_FIT, a uniform sample), rejected rows left out, in one pass
    over the embeddings, fingerprints and labels (never the text)."""
    rng = np.random.default_rng(seed)
    out: dict[str, dict[str, list[np.ndarray]]] = {}
    cols = ["id", "namespace", "embedding", "fp", "rfp", "label", "prefixes", "rejected"]
    for b in ds.select_columns(cols).iter_batches(batch_size=4096, batch_format="numpy"):
        names = b["namespace"].astype(str)
        # rejected calls (errors) never shape the clusters
        keep = ~np.asarray(b["rejected"], dtype=bool)
        share = np.array([min(1.0, MAX_FIT / max(1, counts.get(n, 1))) for n in names])
        keep &= rng.random(len(names)) < share
        for ns in np.unique(names[keep]):
            rows = keep & (names == ns)
            part = out.setdefault(
                str(ns), {"id": [], "emb": [], "fp": [], "rfp": [], "label": [], "prefixes": []}
            )
            part["prefixes"].append(np.asarray(b["prefixes"])[rows])
            part["rfp"].append(np.asarray(b["rfp"])[rows])
            part["id"].append(np.asarray(b["id"]).astype(str)[rows])
            part["emb"].append(np.asarray(b["embedding"], dtype=np.float32)[rows])
            part["fp"].append(np.asarray(b["fp"])[rows])
            part["label"].append(np.asarray(b["label"])[rows])
    return out


def _fit_namespace(
    sample: dict[str, list[np.ndarray]] | None,
    ds: Any,
    namespace: str,
    seed: int,
    embedder: str,
    workers: int,
) -> ClusterModel:
    if sample is not None:
        ids = np.concatenate(sample["id"])
        # Static vectors: where they say a split is possible, MiniLM decides, on the sampled rows' text
        # (embedded in Ray: the driver gets their vectors, never the text).
        confirm = None if embedder == "minilm" else (lambda idx: embed_rows(ds, ids[idx].tolist(), workers))
        model = fit_clusters(
            np.concatenate(sample["emb"]),
            np.concatenate(sample["fp"]),
            np.concatenate(sample["label"]),
            seed,
            confirm=confirm,
            rfps=np.concatenate(sample["rfp"]),
            prefixes=np.concatenate(sample["prefixes"]),
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
    ds: Any, namespaces: list[str], seed: int, embedder: str = "static", workers: int = 1
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
        models[ns] = _fit_namespace(samples.get(ns), ds, ns, seed, embedder, workers) if counts[ns] else None
        seconds[ns] = time.perf_counter() - t
    return models, counts, seconds


def assign(ds: Any, models: dict[str, ClusterModel]):
    """The assign phase: a `cluster` column, each row's nearest centroid within its namespace."""
    if not models:
        return ds
    return ds.map_batches(
        _assign_batch, fn_kwargs={"models": models}, batch_format="numpy", batch_size=1024
    ).materialize()
