"""K-score, per-field accuracy and calibration (temperature, Brier, ECE), all through the Predictor.

K-score (CONTRACT.md): the fraction of eval pairs whose predicted output passes every hard verifier of
the spec AND equals the gold output field by field (exact for enums, booleans, integers and strings
after whitespace normalisation; numbers within spec.tolerance). `confidence` is judged by calibration,
never by equality; `fallback` is derived from confidence and never compared.

Calibration: one temperature per calibration key (field, or the joint answer of a causal LM), fitted by
LBFGS on the negative log-likelihood of a calibration slice of the eval pairs; Brier (the contract's
confidence Brier: mean (confidence - 1[right])^2) and ECE are reported on the rest, so they are honest.
When the eval has negative rows (inputs no value answers), the calibration instead minimises the
confidence Brier over both populations: (1 - w) * Brier on labelled pairs + w * mean confidence^2 on
negatives (on a negative every answer is wrong, so its ideal confidence is 0). NLL on labelled pairs alone
never sees those inputs and leaves them confident, and the fallback threshold exists for them. For an
encoder router with class distances (models.ClassGaussians), it fits a "none of these" logit beside the
temperature (fit_outlier_calibration); otherwise the temperature alone. Half the negatives fit, the other
half score `negatives_broad`. w (training setting `calibration_negative_weight`, default 0.04) moves along a
trade-off: a larger w routes more out-of-scope queries broad at a higher in-scope Brier. The default is
chosen on CLINC150 val, never on test (benchmarks/calibration_weight.py, from one compiled router's scores:
fitted on half of val and oos_val, scored on the other half, cross-fitted; the rule: the most
out-of-scope -> broad whose held-out Brier is within 10% of the lowest). Val Brier / out-of-scope -> broad,
w = 0.02 / 0.04 / 0.06 / 0.08: 0.0164 / 0.815, 0.0175 / 0.880, 0.0185 / 0.890, 0.0194 / 0.920; reported on
test (not used to choose): 0.0148 / 0.754, 0.0158 / 0.790, 0.0168 / 0.818, 0.0180 / 0.830.
"""

from __future__ import annotations

import math
import random
from collections.abc import Sequence
from typing import Any

import torch

from kolm_ray.artifact.kscore import field_correct, unwrap, values_equal  # noqa: F401 (compile's callers use them here)
from kolm_ray.artifact.spec import CONFIDENCE_FIELD, FALLBACK_FIELD, Spec
from kolm_ray.artifact.verifiers import build, hard_failures

CALIBRATION_FRACTION = 0.5  # of the eval pairs, used to fit temperatures (the rest scores calibration)
MIN_CALIBRATION = 20  # below this many eval pairs, fit and score on all of them (and say so)
NEGATIVE_CALIBRATION_WEIGHT = 0.04  # share of the calibration objective given to negative rows


def brier(confidences: Sequence[float], correct: Sequence[bool]) -> float:
    """The contract's confidence Brier: mean (confidence - 1[right])^2."""
    if not confidences:
        return 0.0
    return sum((c - float(r)) ** 2 for c, r in zip(confidences, correct, strict=True)) / len(confidences)


def ece(confidences: Sequence[float], correct: Sequence[bool], bins: int = 10) -> float:
    """Expected calibration error over `bins` equal-width confidence bins."""
    n = len(confidences)
    if n == 0:
        return 0.0
    total = 0.0
    for b in range(bins):
        lo, hi = b / bins, (b + 1) / bins
        idx = [i for i, c in enumerate(confidences) if (lo < c <= hi) or (b == 0 and c == 0.0)]
        if idx:
            acc = sum(correct[i] for i in idx) / len(idx)
            conf = sum(confidences[i] for i in idx) / len(idx)
            total += len(idx) / n * abs(acc - conf)
    return total


def _labelled(logits: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The rows with a known target and no masked (-inf) value, as float32."""
    keep = (targets >= 0) & torch.isfinite(logits).all(dim=-1)
    return logits[keep].float(), targets[keep]


def fit_temperature(logits: torch.Tensor, targets: torch.Tensor, max_iter: int = 100) -> float:
    """Temperature T minimising NLL of softmax(logits / T) on rows with a known target (LBFGS on log T)."""
    logits, targets = _labelled(logits, targets)
    if len(targets) == 0 or logits.shape[-1] < 2:
        return 1.0
    log_t = torch.zeros(1, requires_grad=True)
    opt = torch.optim.LBFGS([log_t], lr=0.1, max_iter=max_iter, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(logits / log_t.exp(), targets)
        loss.backward()
        return loss

    opt.step(closure)
    t = float(log_t.detach().exp())
    return t if math.isfinite(t) and 0.01 <= t <= 100 else 1.0


def fit_temperature_with_negatives(
    logits: torch.Tensor,
    targets: torch.Tensor,
    negative_logits: torch.Tensor,
    weight: float = NEGATIVE_CALIBRATION_WEIGHT,
) -> float:
    """Temperature minimising (1 - weight) * Brier(confidence, right) on labelled rows + weight *
    mean(confidence^2) on negative rows, confidence being the top softmax probability (a 1-D search
    over log T)."""
    logits, targets = _labelled(logits, targets)
    negative_logits = negative_logits.float()
    if len(targets) == 0 or len(negative_logits) == 0 or logits.shape[-1] < 2:
        return fit_temperature(logits, targets)
    right = (logits.argmax(dim=-1) == targets).float()

    def loss(temps: torch.Tensor) -> torch.Tensor:  # (m,) candidate temperatures -> (m,) losses
        out = []
        for t in temps.split(8):  # 8 at a time: (8, rows, values) stays small for 512-answer scorers
            conf = torch.softmax(logits[None] / t[:, None, None], dim=-1).amax(dim=-1)
            neg = torch.softmax(negative_logits[None] / t[:, None, None], dim=-1).amax(dim=-1)
            out.append((1 - weight) * ((conf - right) ** 2).mean(dim=-1) + weight * (neg**2).mean(dim=-1))
        return torch.cat(out)

    grid = torch.logspace(-2, 2, 401)  # T in [0.01, 100], 1% steps; then one finer pass around the best
    best = float(grid[int(loss(grid).argmin())])
    fine = torch.linspace(best * 0.98, best * 1.02, 81)
    return float(fine[int(loss(fine).argmin())])


def fit_outlier_calibration(
    logits: torch.Tensor,
    targets: torch.Tensor,
    distances: torch.Tensor,
    negative_logits: torch.Tensor,
    negative_distances: torch.Tensor,
    weight: float = NEGATIVE_CALIBRATION_WEIGHT,
) -> tuple[float, dict[str, float]]:
    """Temperature T and the "none of these" logit weight * (nearest class distance - offset) minimising
    the same objective as fit_temperature_with_negatives, with confidence from models.outlier_probs.

    Three parameters, bounded (T in [0.05, 20], weight in [0, 10], offset in [0, 20], distances being in
    units of a typical in-scope distance), fitted by L-BFGS-B from a small grid of starts: with few
    negatives the objective has flat stretches and a single start can stall on one. weight 0 is plain
    temperature scaling, so the fit can only do as well or better on this objective.
    """
    from scipy.optimize import minimize

    from kolm_ray.models.modeling import outlier_probs

    keep = (targets >= 0) & torch.isfinite(logits).all(dim=-1)
    logits, targets, distances = logits[keep].double(), targets[keep], distances[keep].double()
    negative_logits, negative_distances = negative_logits.double(), negative_distances.double()
    right = (logits.argmax(dim=-1) == targets).double()

    def objective(p) -> float:
        t, outlier = math.exp(p[0]), {"weight": float(p[1]), "offset": float(p[2])}
        conf = outlier_probs(logits, t, distances, outlier).amax(dim=-1).double()
        neg = outlier_probs(negative_logits, t, negative_distances, outlier).amax(dim=-1).double()
        return float((1 - weight) * ((conf - right) ** 2).mean() + weight * (neg**2).mean())

    t0 = fit_temperature_with_negatives(logits, targets, negative_logits, weight)
    starts = [(math.log(t0), 0.0, 0.0)] + [
        (math.log(t0), w, c) for w in (0.5, 2.0, 8.0) for c in (1.0, 2.0, 4.0)
    ]
    bounds = [(math.log(0.05), math.log(20.0)), (0.0, 10.0), (0.0, 20.0)]
    best = min(
        (minimize(objective, s, method="L-BFGS-B", bounds=bounds) for s in starts), key=lambda r: r.fun
    )
    return float(math.exp(best.x[0])), {"weight": float(best.x[1]), "offset": float(best.x[2])}


def split_for_calibration(n: int, seed: int = 0) -> tuple[list[int], list[int], bool]:
    """(calibration indices, scoring indices, disjoint?) for n eval pairs."""
    idx = list(range(n))
    random.Random(seed).shuffle(idx)
    if n < MIN_CALIBRATION:
        return idx, idx, False
    k = int(n * CALIBRATION_FRACTION)
    return sorted(idx[:k]), sorted(idx[k:]), True


def calibrate(
    predictor,
    scores: tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]],
    outputs: Sequence[Any],
    negative_scores: tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]] = ({}, {}),
    negative_weight: float = NEGATIVE_CALIBRATION_WEIGHT,
) -> dict[str, float]:
    """Fit and set predictor.temperature (and predictor.outlier, for keys with class distances and given
    negatives) from predictor.calibration_scores of the pairs' inputs (and of the negatives) and the pairs'
    outputs; returns the temperatures."""
    logits, dists = scores
    targets = predictor.calibration_targets(list(outputs))
    neg, neg_dists = negative_scores
    temps, outliers = {}, {}
    for k, lg in logits.items():
        if k not in targets:
            continue
        if k in neg and k in dists and k in neg_dists:
            temps[k], outliers[k] = fit_outlier_calibration(
                lg, targets[k], dists[k], neg[k], neg_dists[k], negative_weight
            )
        elif k in neg:
            temps[k] = fit_temperature_with_negatives(lg, targets[k], neg[k], negative_weight)
        else:
            temps[k] = fit_temperature(lg, targets[k])
    predictor.temperature = temps
    predictor.outlier = outliers
    return temps


def _scores(predictor, inputs: list[str], batch_size: int, bar) -> tuple[dict, dict]:
    """calibration_scores over every input, in batches (the progress bar counts them when they decide the
    answers)."""
    logits: dict[str, list[torch.Tensor]] = {}
    dists: dict[str, list[torch.Tensor]] = {}
    for i in range(0, len(inputs), batch_size):
        lg, d = predictor.calibration_scores(inputs[i : i + batch_size])
        if not lg:  # this predictor has no scores (it generates): nothing to keep
            return {}, {}
        for k, v in lg.items():
            logits.setdefault(k, []).append(v)
        for k, v in d.items():
            dists.setdefault(k, []).append(v)
        if bar is not None:
            bar.update(min(batch_size, len(inputs) - i))
    return {k: torch.cat(v) for k, v in logits.items()}, {k: torch.cat(v) for k, v in dists.items()}


def _rows(scores: tuple[dict, dict], idx: list[int]) -> tuple[dict, dict]:
    pick = torch.tensor(idx, dtype=torch.long)
    return tuple({k: v[pick] for k, v in part.items()} for part in scores)


def evaluate(
    predictor,
    pairs: Sequence[dict[str, Any]],
    spec: Spec,
    *,
    fit: bool = True,
    negatives: Sequence[str] = (),
    negative_weight: float = NEGATIVE_CALIBRATION_WEIGHT,
    batch_size: int = 256,
    progress: bool = False,
) -> dict[str, Any]:
    """Calibrate (when fit), predict every eval pair through the predictor, and score it.

    Returns metrics for the manifest: k_score, n_eval, field_accuracy, temperature, brier, ece, the
    set-level verifier scores, fallback_rate (on eval), negatives_broad (share of `negatives` routed
    broad, when given), and up to 5 failure examples.
    """
    inputs = [p["input"] for p in pairs]
    golds = [p["output"] for p in pairs]
    cal_idx, score_idx, disjoint = split_for_calibration(len(pairs))
    neg_cal, neg_score, _ = split_for_calibration(len(negatives), seed=1)
    if not fit:  # temperatures already fixed (a finished artifact): score calibration on every pair
        cal_idx, score_idx, disjoint = [], list(range(len(pairs))), True
        neg_cal, neg_score = [], list(range(len(negatives)))
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(inputs), desc="evaluate", unit="pair", leave=False)
    # One forward pass over every eval pair: calibration fits on its slice of these scores, and the answers
    # come from the same scores under the fitted temperatures (predict() would run the model again).
    scores = _scores(predictor, inputs, batch_size, bar)
    temps = predictor.temperature
    if fit:
        temps = calibrate(
            predictor,
            _rows(scores, cal_idx),
            [golds[i] for i in cal_idx],
            predictor.calibration_scores([negatives[i] for i in neg_cal]) if neg_cal else ({}, {}),
            negative_weight,
        )
    answers = predictor.answers_from_scores(scores)
    if answers is None:  # generated answers: the scores were not the model's answer
        answers = []
        for i in range(0, len(inputs), batch_size):
            answers.extend(predictor.predict(inputs[i : i + batch_size]))
            if bar is not None:
                bar.update(min(batch_size, len(inputs) - i))
    if bar is not None:
        bar.close()
    verifiers = build(spec)
    passed, right, failures = [], [], []
    per_field: dict[str, list[bool]] = {}
    for inp, gold, ans in zip(inputs, golds, answers, strict=True):
        pred = unwrap(ans)
        reasons = hard_failures(verifiers, ans if isinstance(pred, dict) else pred, inp)
        fc = field_correct(ans, gold, spec.tolerance)
        for k, ok in fc.items():
            per_field.setdefault(k, []).append(ok)
        ok_all = all(fc.values())
        right.append(ok_all)
        passed.append(ok_all and not reasons)
        if not passed[-1] and len(failures) < 5:
            failures.append({"input": inp, "gold": gold, "predicted": ans, "reasons": reasons})
    confs = [float(a.get(CONFIDENCE_FIELD, 0.0)) for a in answers]
    sc_conf = [confs[i] for i in score_idx]
    sc_right = [right[i] for i in score_idx]
    metrics: dict[str, Any] = {
        "k_score": sum(passed) / len(passed) if passed else 0.0,
        "n_eval": len(pairs),
        "accuracy": sum(right) / len(right) if right else 0.0,
        "field_accuracy": {k: sum(v) / len(v) for k, v in per_field.items()},
        "temperature": temps,
        "brier": brier(sc_conf, sc_right),
        "ece": ece(sc_conf, sc_right),
        "calibration": {
            "n_fit": len(cal_idx),
            "n_scored": len(score_idx),
            "disjoint": disjoint,
            "n_negatives_fit": len(neg_cal),
            "objective": f"brier-with-negatives (weight {negative_weight})" if neg_cal else "nll",
            "outlier": predictor.outlier,
        },
        "failures": failures,
    }
    if predictor.fallback_threshold is not None:
        metrics["fallback_rate"] = sum(a.get(FALLBACK_FIELD) == "broad" for a in answers) / max(
            len(answers), 1
        )
    for v in verifiers:
        if not v.hard:
            value, ok = v.score(sc_conf, sc_right)
            metrics.setdefault("verifiers", {})[v.name] = {
                "value": value,
                "threshold": v.vspec.threshold,
                "passed": ok,
            }
    if negatives:
        scored = [negatives[i] for i in neg_score]
        neg = []
        for i in range(0, len(scored), batch_size):
            neg.extend(predictor.predict(scored[i : i + batch_size]))
        threshold = predictor.fallback_threshold or 0.7
        metrics["negatives_broad"] = sum(a.get(CONFIDENCE_FIELD, 0.0) < threshold for a in neg) / len(neg)
    return metrics
