"""K-score equality rules, Brier/ECE arithmetic, temperature fitting."""

from __future__ import annotations

import pytest
import torch

from kolm_ray.compile.evaluate import (
    brier,
    ece,
    field_correct,
    fit_outlier_calibration,
    fit_temperature,
    fit_temperature_with_negatives,
    split_for_calibration,
    unwrap,
    values_equal,
)


def test_values_equal_rules() -> None:
    assert values_equal("  hello   world ", "hello world", 1e-6)
    assert values_equal(1.0000001, 1.0, 1e-3) and not values_equal(1.1, 1.0, 1e-3)
    assert values_equal(3, 3, 0) and not values_equal(3, 4, 0)
    assert not values_equal(True, 1, 0) and values_equal(False, False, 0)
    assert values_equal({"a": [1, "x"]}, {"a": [1, "x"]}, 0) and not values_equal(
        {"a": 1}, {"a": 1, "b": 2}, 0
    )


def test_confidence_and_fallback_never_compared() -> None:
    answer = {"namespace": "billing", "confidence": 0.2, "fallback": "broad"}
    assert unwrap(answer) == {"namespace": "billing"}
    assert field_correct(answer, {"namespace": "billing"}, 0) == {"namespace": True}
    assert field_correct({"output": "hi", "confidence": 1.0}, "hi", 0) == {"output": True}


def test_brier_and_ece_by_hand() -> None:
    conf, right = [0.9, 0.8, 0.3, 0.6], [True, True, False, False]
    assert brier(conf, right) == pytest.approx((0.01 + 0.04 + 0.09 + 0.36) / 4)
    # bins: 0.3 -> acc 0 conf .3; 0.6 -> acc 0 conf .6; 0.8 -> 1 vs .8; 0.9 -> 1 vs .9
    assert ece(conf, right) == pytest.approx((0.3 + 0.6 + 0.2 + 0.1) / 4)
    assert brier([], []) == 0.0 and ece([], []) == 0.0


def test_fit_temperature_recovers_true_temperature() -> None:
    g = torch.Generator().manual_seed(0)
    true_logits = torch.randn(4000, 5, generator=g) * 2.0
    targets = torch.multinomial(torch.softmax(true_logits, -1), 1, generator=g).squeeze(1)
    t = fit_temperature(true_logits * 3.0, targets)  # overconfident by 3x
    assert t == pytest.approx(3.0, rel=0.1)


def test_fit_temperature_ignores_unknown_targets_and_masked_rows() -> None:
    logits = torch.tensor([[2.0, 0.0], [0.0, 2.0], [float("-inf"), 1.0]])
    assert 0.01 <= fit_temperature(logits, torch.tensor([0, -1, 1])) <= 100


def test_calibration_split_is_disjoint_when_large() -> None:
    cal, score, disjoint = split_for_calibration(100)
    assert disjoint and not set(cal) & set(score) and len(cal) + len(score) == 100
    cal, score, disjoint = split_for_calibration(10)
    assert not disjoint and cal == score


def test_temperature_with_negatives_trades_labelled_brier_for_low_negative_confidence() -> None:
    g = torch.Generator().manual_seed(0)
    true_logits = torch.randn(2000, 5, generator=g) * 2.0
    targets = torch.multinomial(torch.softmax(true_logits, -1), 1, generator=g).squeeze(1)
    negatives = torch.randn(500, 5, generator=g) * 2.0  # out-of-scope rows the model is as sure about

    def neg_conf(t: float) -> float:
        return float(torch.softmax(negatives / t, -1).amax(-1).mean())

    nll_t = fit_temperature(true_logits, targets)
    low, high = (fit_temperature_with_negatives(true_logits, targets, negatives, w) for w in (0.1, 0.5))
    assert nll_t < low < high  # more weight on negatives: a flatter softmax
    assert neg_conf(high) < neg_conf(low) < neg_conf(nll_t)
    # no negatives: the NLL fit
    assert fit_temperature_with_negatives(true_logits, targets, torch.empty(0, 5)) == pytest.approx(nll_t)


def test_outlier_calibration_lowers_far_negatives_that_temperature_alone_cannot() -> None:
    from kolm_ray.models.modeling import outlier_probs

    g = torch.Generator().manual_seed(0)
    logits = torch.randn(1000, 4, generator=g) * 3.0
    targets = logits.argmax(-1)  # in scope: confident and right
    dist = 1.0 + 0.3 * torch.rand(1000, 4, generator=g)  # near the classes
    neg_logits = torch.randn(200, 4, generator=g) * 3.0  # out of scope: just as confident...
    neg_dist = 6.0 + torch.rand(200, 4, generator=g)  # ...but far from every class
    t, outlier = fit_outlier_calibration(logits, targets, dist, neg_logits, neg_dist, weight=0.1)
    assert outlier["weight"] > 0
    plain_t = fit_temperature_with_negatives(logits, targets, neg_logits, weight=0.1)
    neg_conf = outlier_probs(neg_logits, t, neg_dist, outlier).amax(-1).mean()
    assert neg_conf < 0.5 * torch.softmax(neg_logits / plain_t, -1).amax(-1).mean()
    in_conf = outlier_probs(logits, t, dist, outlier).amax(-1)
    assert float(((in_conf - 1.0) ** 2).mean()) < 0.05  # in scope stays confident
