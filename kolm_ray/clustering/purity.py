"""How clean is a cluster? The share of its pairs whose output is consistent, estimated three ways:

1. the output fits the inferred schema (the caller drops those that do not, see shape.Shape.conforms);
2. near-duplicate inputs (same text after normalisation, or MiniLM cosine >= 0.97) carry the same output;
3. confident learning (Northcutt et al., 2021): out-of-fold class probabilities from a softmax regression
   on the input embeddings (the clustering's static MiniLM vectors, or MiniLM itself; centred on the
   cluster's mean), per-class thresholds t_j = mean p_j over the pairs labelled j, the confident
   joint C[given, likely] and its calibration to the label counts; its off-diagonal mass is the label noise
   rate, its off-diagonal pairs are the likely label errors (flagged, kept out of eval).

    report = estimate_purity(embeddings, labels_by_field, inputs, outputs)
    report.purity, report.flagged (index -> reason), report.method, report.details
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from typing import Any

import numpy as np

NEAR_DUP_COSINE = 0.97  # MiniLM cosine above which two inputs count as the same request
FOLDS = 5  # out-of-fold probabilities: each pair is scored by a model that never saw it
L2 = 1e-3  # ridge penalty of the softmax regression (embeddings are unit vectors)
MAX_ITER = 200


def normalize_text(text: str) -> str:
    """Lowercase, collapse whitespace: the key for exact duplicates."""
    return re.sub(r"\s+", " ", text.strip().lower())


# ---- a small softmax regression (numpy + L-BFGS): fast and deterministic on 2 cores ----------------------


def fit_softmax(x: np.ndarray, y: np.ndarray, k: int, l2: float = L2, max_iter: int = MAX_ITER) -> np.ndarray:
    """Multinomial logistic regression weights (d+1, k) by L-BFGS on mean cross-entropy + l2/2 |W|^2."""
    from scipy.optimize import minimize
    from scipy.special import log_softmax

    n, d = x.shape
    xb = np.hstack([x, np.ones((n, 1))]).astype(np.float64)
    onehot = np.zeros((n, k))
    onehot[np.arange(n), y] = 1.0

    def loss_grad(w: np.ndarray) -> tuple[float, np.ndarray]:
        wm = w.reshape(d + 1, k)
        logp = log_softmax(xb @ wm, axis=1)
        loss = -(onehot * logp).sum() / n + 0.5 * l2 * float((wm[:-1] ** 2).sum())
        grad = xb.T @ (np.exp(logp) - onehot) / n
        grad[:-1] += l2 * wm[:-1]
        return loss, grad.ravel()

    res = minimize(
        loss_grad, np.zeros((d + 1) * k), jac=True, method="L-BFGS-B", options={"maxiter": max_iter}
    )
    return res.x.reshape(d + 1, k)


def predict_proba(w: np.ndarray, x: np.ndarray) -> np.ndarray:
    from scipy.special import softmax

    return softmax(np.hstack([x, np.ones((len(x), 1))]) @ w, axis=1)


def out_of_fold_proba(x: np.ndarray, y: np.ndarray, k: int, folds: int = FOLDS, seed: int = 0) -> np.ndarray:
    """P[i] = class probabilities for pair i from a model trained on the other folds (stratified)."""
    rng = np.random.default_rng(seed)
    fold = np.empty(len(y), dtype=int)
    for c in range(k):  # stratified: deal each class's pairs round-robin over the folds
        idx = np.flatnonzero(y == c)
        fold[rng.permutation(idx)] = (np.arange(len(idx)) + rng.integers(folds)) % folds
    probs = np.zeros((len(y), k))
    # One BLAS thread: these products are small ([n x 385] @ [385 x k]), and OpenBLAS's threads cost more
    # than they save (the 7 benchmark clusters: 13.8 s with 2 threads, 4.3 s with 1, same estimates).
    from threadpoolctl import threadpool_limits

    with threadpool_limits(limits=1, user_api="blas"):
        for f in range(folds):
            test = fold == f
            if not test.any() or test.all():
                continue
            w = fit_softmax(x[~test], y[~test], k)
            probs[test] = predict_proba(w, x[test])
    return probs


@dataclass
class ConfidentJoint:
    noise_rate: float
    """Off-diagonal mass of the calibrated confident joint: the estimated share of wrong labels."""
    issues: np.ndarray
    """Boolean mask: pairs whose given label is confidently another class."""
    likely: np.ndarray
    """Index of the class each pair confidently belongs to (-1: none above its threshold)."""
    thresholds: np.ndarray
    oof_accuracy: float


def confident_joint(probs: np.ndarray, y: np.ndarray) -> ConfidentJoint:
    """Confident learning on out-of-fold probabilities (per-class thresholds, calibrated joint)."""
    n, k = probs.shape
    counts = np.bincount(y, minlength=k).astype(float)
    thresholds = np.array([probs[y == j, j].mean() if counts[j] else 1.0 for j in range(k)])
    above = probs >= thresholds[None, :] - 1e-12
    masked = np.where(above, probs, -1.0)
    likely = np.where(above.any(axis=1), masked.argmax(axis=1), -1)
    joint = np.zeros((k, k))
    has = likely >= 0
    np.add.at(joint, (y[has], likely[has]), 1.0)
    row = joint.sum(axis=1, keepdims=True)
    calibrated = np.divide(joint, row, out=np.zeros_like(joint), where=row > 0) * counts[:, None]
    total = calibrated.sum()
    noise = float((total - np.trace(calibrated)) / total) if total else 0.0
    return ConfidentJoint(
        noise_rate=noise,
        issues=has & (likely != y),
        likely=likely,
        thresholds=thresholds,
        oof_accuracy=float((probs.argmax(axis=1) == y).mean()),
    )


def centred(embeddings: np.ndarray) -> np.ndarray:
    """Rows minus the cluster's mean, back on the unit sphere. Within one cluster every input shares a large
    common direction (static token vectors most of all); without it the regression's penalty falls on what
    the rows have in common instead of on what tells them apart. Measured while choosing it, on the recipe
    benchmark's 7 tasks (true partitions): static vectors' largest purity error went from 0.039 to 0.028."""
    x = np.asarray(embeddings, dtype=np.float64)
    x = x - x.mean(axis=0, keepdims=True)
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


# ---- near-duplicates ----------------------------------------------------------------------------------------


def near_duplicate_groups(
    embeddings: np.ndarray, inputs: list[str], cosine: float = NEAR_DUP_COSINE
) -> np.ndarray:
    """Group id per pair: same normalised text, or MiniLM cosine >= `cosine` (union-find, chunked)."""
    n = len(inputs)
    parent = np.arange(n)

    def find(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    def union(a: int, b: int) -> None:
        ra, rb = find(a), find(b)
        if ra != rb:
            parent[max(ra, rb)] = min(ra, rb)

    first: dict[str, int] = {}
    for i, text in enumerate(inputs):
        key = normalize_text(text)
        if key in first:
            union(first[key], i)
        else:
            first[key] = i
    if embeddings is not None and len(embeddings) == n and n > 1:
        e = np.asarray(embeddings, dtype=np.float32)
        for start in range(0, n, 2048):
            sims = e[start : start + 2048] @ e.T
            rows, cols = np.nonzero(sims >= cosine)
            for r, c in zip(rows + start, cols, strict=True):
                if c > r:
                    union(int(r), int(c))
    return np.array([find(i) for i in range(n)])


def near_duplicate_disagreements(groups: np.ndarray, keys: list[str]) -> tuple[np.ndarray, int]:
    """Pairs whose output differs from their near-duplicate group's majority; and how many groups have >1 pair."""
    flagged = np.zeros(len(keys), dtype=bool)
    members: dict[int, list[int]] = {}
    for i, g in enumerate(groups):
        members.setdefault(int(g), []).append(i)
    multi = 0
    for idx in members.values():
        if len(idx) < 2:
            continue
        multi += 1
        votes: dict[str, int] = {}
        for i in idx:
            votes[keys[i]] = votes.get(keys[i], 0) + 1
        top = max(votes.values())
        winners = [k for k, v in votes.items() if v == top]
        if len(winners) > 1:  # a tie: nobody knows which is right, flag them all
            flagged[idx] = True
            continue
        for i in idx:
            flagged[i] = keys[i] != winners[0]
    return flagged, multi


# ---- the estimate -------------------------------------------------------------------------------------------


@dataclass
class PurityReport:
    purity: float
    method: str
    flagged: dict[int, str] = field(default_factory=dict)
    """Index (into the pairs given) -> why the pair looks inconsistent."""
    details: dict[str, Any] = field(default_factory=dict)


def estimate_purity(
    embeddings: np.ndarray | None,
    labels: dict[str, list[Any]],
    inputs: list[str],
    outputs: list[Any],
    conform_share: float = 1.0,
    seed: int = 0,
) -> PurityReport:
    """Purity of a cluster's (conforming) pairs, times the share that conformed to the schema.

    labels: field -> per-pair value for each categorical field a model can be cross-validated on
    (for text outputs with few distinct values, {"(text)": outputs}). Empty: no confident learning.
    """
    n = len(inputs)
    if labels:
        # Near-duplicates (same text or cosine >= 0.97) must agree on their labels ...
        keys = [json.dumps([vals[i] for vals in labels.values()], sort_keys=True) for i in range(n)]
        groups = near_duplicate_groups(embeddings, inputs)
    else:
        # ... but extracted spans and free text legitimately differ between similar inputs: only the
        # same text must get the same output.
        keys = [json.dumps(o, sort_keys=True, ensure_ascii=False) for o in outputs]
        groups = near_duplicate_groups(None, inputs)
    dup_flags, multi = near_duplicate_disagreements(groups, keys)
    flagged: dict[int, str] = {
        int(i): "disagrees with near-duplicate inputs" for i in np.flatnonzero(dup_flags)
    }
    details: dict[str, Any] = {
        "pairs": n,
        "schema_conforming_share": round(conform_share, 4),
        "near_duplicate_groups": multi,
        "near_duplicate_disagreements": int(dup_flags.sum()),
    }
    clean = 1.0
    methods = ["schema conformance"]
    if labels and embeddings is not None and n >= 2 * FOLDS:
        x = centred(embeddings)
        per_field = {}
        for name, values in labels.items():
            vkeys = [json.dumps(v, sort_keys=True) for v in values]
            classes = sorted(set(vkeys))
            if len(classes) < 2:
                per_field[name] = {"classes": len(classes), "noise_rate": 0.0}
                continue
            index = {c: j for j, c in enumerate(classes)}
            y = np.array([index[v] for v in vkeys])
            probs = out_of_fold_proba(x, y, len(classes), seed=seed)
            cj = confident_joint(probs, y)
            clean *= 1.0 - cj.noise_rate
            for i in np.flatnonzero(cj.issues):
                likely = json.loads(classes[cj.likely[i]])
                flagged.setdefault(
                    int(i), f"{name}: labelled {values[i]!r}, model confidently says {likely!r}"
                )
            per_field[name] = {
                "classes": len(classes),
                "noise_rate": round(cj.noise_rate, 4),
                "likely_label_errors": int(cj.issues.sum()),
                "out_of_fold_accuracy": round(cj.oof_accuracy, 4),
            }
        details["confident_learning"] = per_field
        methods.append(
            f"confident learning ({FOLDS}-fold softmax regression on the centred input embeddings, "
            "per-class thresholds, calibrated confident joint)"
        )
    else:
        # No categorical field to cross-validate: near-duplicate agreement is the consistency signal.
        clean = 1.0 - (dup_flags.sum() / n if n else 0.0)
        methods.append("near-duplicate agreement")
    purity = conform_share * clean
    details["flagged"] = len(flagged)
    return PurityReport(
        purity=round(float(purity), 4), method=" x ".join(methods), flagged=flagged, details=details
    )


def k_floor_from_purity(purity: float, margin: float = 0.03) -> float:
    """The K-floor: purity minus a margin (so a model as good as the data passes), clamped to [0.5, 0.95]."""
    return round(min(0.95, max(0.5, purity - margin)), 4)
