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
rows, the lowest threshold (at least the spec's own fallback threshold, `minimum`) at which both estimates
of the answered-accuracy reach k_floor: the observed one's Wilson lower bound (z = 1, one standard error;
unlike `a - sqrt(a (1 - a) / n)` it is below 1 when every answered row is right, so 19 right rows are
needed for a 0.95 floor), and the mean calibrated confidence of the answered rows (what the calibration
expects; it still sees the risk when a small threshold half happens to hold no errors above a threshold).
Either estimate alone chose thresholds the gate half then refused on CLINC150's 30 banking + credit_cards
intents (benchmarks/loop.py --task cards30: 57 of 57 threshold rows right at 0.7, 53 of 56 gate rows). `kolm compile` uses its eval split: the
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


def wilson_lower(hits: int, n: int, z: float = 1.0) -> float:
    """Wilson score interval's lower bound for hits / n."""
    if n == 0:
        return 0.0
    p = hits / n
    centre = p + z * z / (2 * n)
    spread = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    return (centre - spread) / (1 + z * z / n)


def choose_threshold(
    confidences: Sequence[float], right: Sequence[bool], k_floor: float, minimum: float
) -> float | None:
    """The lowest threshold >= minimum (the most coverage) at which, on these rows, the answered rows'
    Wilson lower bound (z = 1) and their mean confidence both reach k_floor; None when none does."""
    rows = sorted(zip(confidences, right, strict=True), key=lambda r: -r[0])
    best, n, hits, conf = None, 0, 0, 0.0
    i = 0
    while i < len(rows):
        c = rows[i][0]
        if c < minimum:
            break
        while i < len(rows) and rows[i][0] == c:  # every row at this confidence is answered together
            n, hits, conf, i = n + 1, hits + bool(rows[i][1]), conf + float(rows[i][0]), i + 1
        if wilson_lower(hits, n) >= k_floor and conf / n >= k_floor:
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
