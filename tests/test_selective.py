"""The selective gate (compile/selective.py): answered-accuracy and coverage at a threshold, the threshold
chosen on other rows than the gated ones, and the same verdicts `kolm compile` and `kolm loop` reach."""

from __future__ import annotations

import math
import random

import pytest

from kolm_ray.compile.selective import COVERAGE_FLOOR, choose_threshold, gate, select_and_gate, wilson_lower


def test_gate_counts_only_the_answered_rows():
    conf = [0.99, 0.95, 0.9, 0.6, 0.5]
    right = [True, True, False, False, True]
    g = gate(conf, right, 0.9, k_floor=0.6)
    assert (g.n, g.answered, g.right) == (5, 3, 2)
    assert g.coverage == 0.6 and g.answered_accuracy == pytest.approx(2 / 3) and g.passed
    g = gate(conf, right, 0.95, k_floor=0.9)  # the two most confident: both right
    assert g.answered_accuracy == 1.0 and g.coverage == 0.4 and g.passed
    assert gate(conf, right, 0.99, k_floor=0.9).passed  # one row of five: at the coverage floor, 0.2
    g = gate([*conf, 0.1], [*right, False], 0.99, k_floor=0.9)  # one row of six: under it
    assert not g.passed and g.coverage < COVERAGE_FLOOR and "coverage below the floor 0.20" in g.reason
    g = gate(conf, right, 1.01, k_floor=0.9)  # answers nothing
    assert g.answered_accuracy is None and not g.passed and "below k_floor 0.90" in g.reason
    with pytest.raises(ValueError):
        gate([0.9], [True, False], 0.5, 0.9)


def test_choose_threshold_is_the_lowest_that_holds_the_floor_with_a_margin():
    # 50 rows at 0.99 all right; 50 at 0.8, 40 right: answering all gives 0.9, the confident half 1.0
    conf = [0.99] * 50 + [0.8] * 50
    right = [True] * 50 + [True] * 40 + [False] * 10
    assert choose_threshold(conf, right, k_floor=0.95, minimum=0.7) == 0.99
    assert choose_threshold(conf, right, k_floor=0.85, minimum=0.7) == 0.7  # Wilson 0.866, confidence 0.895
    # 0.9 observed, but its lower bound (0.866) is below 0.88: the margin keeps the noisy tail out
    assert choose_threshold(conf, right, k_floor=0.88, minimum=0.7) == 0.99
    assert choose_threshold(conf, [False] * 100, k_floor=0.5, minimum=0.7) is None
    # never below the spec's own threshold, even when every row is right
    assert choose_threshold([0.6, 0.65, 0.9], [True] * 3, k_floor=0.5, minimum=0.7) == 0.7


def test_every_row_right_is_not_proof_enough():
    """57 of 57 threshold rows right from 0.7 up (what a small threshold half can show by chance): the mean
    confidence of the rows between 0.7 and 0.9 says they will not all be right, so the threshold rises."""
    conf = [0.99] * 40 + [0.75] * 17
    assert wilson_lower(57, 57) > 0.95  # the observed accuracy alone would answer everything
    assert choose_threshold(conf, [True] * 57, k_floor=0.95, minimum=0.7) == 0.99
    assert wilson_lower(18, 18) < 0.95 <= wilson_lower(19, 19)  # 19 right rows before a 0.95 floor is met
    assert choose_threshold([0.99] * 18, [True] * 18, k_floor=0.95, minimum=0.7) is None


def test_threshold_rows_and_gate_rows_are_different_rows():
    rng = random.Random(0)
    conf = [rng.random() for _ in range(400)]
    right = [rng.random() < c for c in conf]  # calibrated: right with probability = confidence
    idx = list(range(400))
    g, info = select_and_gate(conf, right, idx[:200], idx[200:], k_floor=0.9, minimum=0.5)
    assert info["disjoint"] and info["n_threshold_rows"] == 200 and info["n_gate_rows"] == 200
    assert info["threshold"] is not None and info["threshold"] >= 0.5
    # the verdict is the gate's on the gate rows at that threshold, nothing else
    again = gate([conf[i] for i in idx[200:]], [right[i] for i in idx[200:]], info["threshold"], 0.9)
    assert (g.answered, g.right, g.passed) == (again.answered, again.right, again.passed)
    assert info["coverage"] == round(again.coverage, 4)
    # nothing reaches the floor on the threshold rows: it would answer nothing, and says why
    g, info = select_and_gate(conf, [False] * 400, idx[:200], idx[200:], k_floor=0.9, minimum=0.5)
    assert not g.passed and info["threshold"] is None and "no threshold reaches k_floor" in info["reason"]
    assert g.threshold == math.inf
