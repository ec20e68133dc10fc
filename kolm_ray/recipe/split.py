"""Train/eval split: grouped by near-duplicate input (no input lands in both), stratified by label for
categorical outputs, eval = max(100 pairs, 25%), pairs flagged as inconsistent never in eval."""

from __future__ import annotations

import math
from collections import defaultdict

import numpy as np

EVAL_MIN = 100  # enough eval pairs for a K-score to move in steps of at most 1%
EVAL_SHARE = 0.25


def eval_size(n: int) -> int:
    """max(100, 25% of the pairs), but never more than half of them (training needs the rest)."""
    return min(max(EVAL_MIN, math.ceil(EVAL_SHARE * n)), n // 2)


def split_pairs(groups: np.ndarray, strata: list[str] | None, flagged: set[int], seed: int = 0) -> list[str]:
    """'train' or 'eval' per pair.

    groups: near-duplicate group id per pair (a whole group goes to one side);
    strata: per-pair label for stratification (None: plain random);
    flagged: indices of pairs that must stay out of eval (their whole group goes to train).
    """
    n = len(groups)
    target = eval_size(n)
    rng = np.random.default_rng(seed)
    members: dict[int, list[int]] = defaultdict(list)
    for i, g in enumerate(groups):
        members[int(g)].append(i)
    eligible = [g for g, idx in members.items() if not any(i in flagged for i in idx)]
    split = ["train"] * n
    if not eligible:
        return split
    stratum_of = {g: (strata[members[g][0]] if strata else "") for g in eligible}
    by_stratum: dict[str, list[int]] = defaultdict(list)
    for g in eligible:
        by_stratum[stratum_of[g]].append(g)
    eligible_pairs = sum(len(members[g]) for g in eligible)
    share = min(1.0, target / eligible_pairs)
    # Largest remainder: each label gets its share of eval, rounded so the quotas sum to the target.
    quotas = {s: share * sum(len(members[g]) for g in gs) for s, gs in by_stratum.items()}
    want = {s: math.floor(q) for s, q in quotas.items()}
    short = target - sum(want.values())
    for s in sorted(quotas, key=lambda s: -(quotas[s] - want[s]))[: max(0, short)]:
        want[s] += 1
    for s in sorted(by_stratum):
        gs = by_stratum[s]
        order = [gs[i] for i in rng.permutation(len(gs))]
        got = 0
        for g in order[:-1]:  # leave at least one group of every label in train
            if got >= want[s]:
                break
            for i in members[g]:
                split[i] = "eval"
            got += len(members[g])
    return split
