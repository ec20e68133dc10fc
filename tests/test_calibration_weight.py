"""benchmarks/calibration_weight.py: the rule that picks the default weight on val, and its held-out scoring."""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks import calibration_weight as cw  # noqa: E402


def test_rule_takes_the_most_out_of_scope_broad_within_the_brier_slack():
    val = {
        0.02: {"brier": 0.0160, "oos_broad": 0.80},
        0.04: {"brier": 0.0175, "oos_broad": 0.88},  # within 10% of 0.0160
        0.06: {"brier": 0.0185, "oos_broad": 0.89},  # 15.6% above: out
    }
    assert cw.choose(val, 0.10) == 0.04
    assert cw.choose(val, 0.20) == 0.06
    assert cw.choose(val, 0.0) == 0.02  # no slack: the lowest Brier
    tie = {0.02: {"brier": 0.0160, "oos_broad": 0.9}, 0.04: {"brier": 0.0170, "oos_broad": 0.9}}
    assert cw.choose(tie, 0.10) == 0.02  # equal broad: the lower Brier


def test_a_larger_weight_sends_more_held_out_negatives_broad():
    """fit + figures on synthetic scores: in-scope rows near their class, negatives far from every class."""
    g = torch.Generator().manual_seed(0)
    n, m, k = 400, 80, 4
    targets = torch.randint(0, k, (n,), generator=g)
    logits = torch.randn(n, k, generator=g, dtype=torch.float64) + 3.0 * torch.nn.functional.one_hot(
        targets, k
    )
    dists = 1.0 + torch.rand(n, k, generator=g, dtype=torch.float64)
    s = {"logits": logits, "targets": targets, "dists": dists}
    oos = {
        "logits": torch.randn(m, k, generator=g, dtype=torch.float64) * 2.0,
        "dists": 1.5 + 2.0 * torch.rand(m, k, generator=g, dtype=torch.float64),
    }
    half, other = list(range(0, n, 2)), list(range(1, n, 2))
    ohalf, oother = list(range(0, m, 2)), list(range(1, m, 2))
    out = {}
    for w in (0.01, 0.3):
        t, outlier = cw.fit(s, oos, half, ohalf, w)
        out[w] = cw.figures(s, oos, other, oother, t, outlier)
    assert out[0.3]["oos_broad"] > out[0.01]["oos_broad"]
    assert out[0.3]["brier"] >= out[0.01]["brier"] - 1e-9
    assert 0.0 < out[0.01]["brier"] < 0.25 and out[0.01]["oos_broad"] < 1.0
