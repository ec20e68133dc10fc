"""The selective gate: what users get from a model that answers only when it is confident.

A promoted model answers a call locally when its calibrated confidence is at least its threshold, and
sends the rest upstream. So the question a gate asks is not "how accurate is it on every row" but

- answered-accuracy: of the rows it would answer (confidence >= threshold), the share it gets right
  (the K-score's rules: every field equal to the upstream's and no hard verifier failed), and
- coverage: the share of rows it would answer at all.

A model passes when answered-accuracy >= its k_floor AND coverage >= COVERAGE_FLOOR (0.2). The floor on
coverage exists because a threshold can always be raised until only a handful of easy rows are answered:
a model answering under a fifth of its traffic saves too little to be worth serving (and its
answered-accuracy rests on too few rows to trust), so it is refused and the traffic keeps going upstream.

The threshold is chosen on other rows than the ones gated on: `choose_threshold` picks, on the threshold
rows, the lowest threshold (at least the spec's own fallback threshold, `minimum`) whose answered-accuracy
minus one standard error (sqrt(a (1 - a) / n)) reaches k_floor, so that the gate rows, scored at that
threshold, are not simply the same noise it was fitted on. `kolm compile` uses its eval split: the
calibration half (temperatures and threshold) and the scoring half (gate). `kolm loop` gates the candidate
at the threshold in its manifest on the newest held-out traffic, which neither the compile nor the
threshold saw. Both call `gate` below, so one cannot pass what the other refuses.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

COVERAGE_FLOOR = 0.2  # below a fifth of the traffic answered locally: refused (see the module docstring)


@dataclass(frozen=True)
class Selective:
    """The gate's verdict on one set of rows at one threshold."""

    threshold: float
    k_floor: float
    n: int
    answered: int
    right: int
    coverage_floor: float = COVERAGE_FLOOR

    @property
    def coverage(self) -> float:
        return self.answered / self.n if self.n else 0.0

    @property
    def answered_accuracy(self) -> float | None:
        return self.right / self.answered if self.answered else None

    @property
    def passed(self) -> bool:
        acc = self.answered_accuracy
        return acc is not None and acc >= self.k_floor and self.coverage >= self.coverage_floor

    @property
    def reason(self) -> str:
        """One line: what it would answer and how well; why it fails when it does."""
        acc = self.answered_accuracy
        where = f"at threshold {self.threshold:.3f}: answers {self.answered} of {self.n} rows"
        head = (
            f"answered-accuracy {'-' if acc is None else f'{acc:.3f}'}, coverage {self.coverage:.2f} {where}"
        )
        if acc is None or acc < self.k_floor:
            return f"{head}; answered-accuracy below k_floor {self.k_floor:.2f}"
        if self.coverage < self.coverage_floor:
            return f"{head}; coverage below the floor {self.coverage_floor:.2f}"
        return head

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        acc = self.answered_accuracy
        return d | {
            "coverage": round(self.coverage, 4),
            "answered_accuracy": None if acc is None else round(acc, 4),
            "passed": self.passed,
        }


def gate(
    confidences: Sequence[float], right: Sequence[bool], threshold: float, k_floor: float,
    coverage_floor: float = COVERAGE_FLOOR,
) -> Selective:  # fmt: skip
    """Answered-accuracy and coverage of these rows at `threshold`, judged against k_floor and the floor."""
    if len(confidences) != len(right):
        raise ValueError(f"{len(confidences)} confidences for {len(right)} rows")
    answered = [r for c, r in zip(confidences, right, strict=True) if c >= threshold]
    return Selective(float(threshold), float(k_floor), len(right), len(answered), sum(map(bool, answered)),
                     coverage_floor)  # fmt: skip


def choose_threshold(
    confidences: Sequence[float], right: Sequence[bool], k_floor: float, minimum: float
) -> float | None:
    """The lowest threshold >= minimum (the most coverage) whose answered-accuracy on these rows, minus one
    standard error, is at least k_floor; None when no threshold gets there."""
    rows = sorted(zip(confidences, right, strict=True), key=lambda r: -r[0])
    best, n, hits = None, 0, 0
    i = 0
    while i < len(rows):
        c = rows[i][0]
        if c < minimum:
            break
        while i < len(rows) and rows[i][0] == c:  # every row at this confidence is answered together
            n, hits, i = n + 1, hits + bool(rows[i][1]), i + 1
        acc = hits / n
        if acc - math.sqrt(acc * (1 - acc) / n) >= k_floor:
            best = c
    if best is None:
        return None
    # Rows between `minimum` and the chosen confidence would not change the answer set: say `minimum`
    # when it gives the same rows, so a spec's explicit threshold survives as the served one.
    if all(not (minimum <= c < best) for c in confidences):
        return float(minimum)
    return float(best)


def select_and_gate(
    confidences: Sequence[float], right: Sequence[bool], threshold_idx: Sequence[int], gate_idx: Sequence[int],
    k_floor: float, minimum: float, coverage_floor: float = COVERAGE_FLOOR,
) -> tuple[Selective, dict[str, Any]]:  # fmt: skip
    """Compile's use: choose the threshold on `threshold_idx` rows, gate on `gate_idx` rows. Returns the
    gate's verdict and the manifest's `metrics.selective` (threshold, coverage, answered_accuracy, ...)."""
    t = choose_threshold([confidences[i] for i in threshold_idx], [right[i] for i in threshold_idx],
                         k_floor, minimum)  # fmt: skip
    chosen = t if t is not None else math.inf  # nothing reaches the floor: it would answer nothing
    g = gate(
        [confidences[i] for i in gate_idx], [right[i] for i in gate_idx], chosen, k_floor, coverage_floor
    )
    info = g.to_json() | {
        "threshold": None if t is None else round(chosen, 6),
        "minimum_threshold": minimum,
        "n_threshold_rows": len(threshold_idx),
        "n_gate_rows": len(gate_idx),
        "disjoint": not set(threshold_idx) & set(gate_idx),
        "reason": g.reason
        if t is not None
        else f"no threshold reaches k_floor {k_floor:.2f} on the threshold rows",
    }
    return g, info
