"""compile's phases for an encoder extractor: stage its files, then evaluate it (calibrate on half the eval
pairs, choose the local-answer threshold there, score everything, report calibration on the other half).

    kind = stage_extractor(plan, checkpoint_dir, staging, tokenizer)    # "encoder-extractor"
    metrics = evaluate_extractor(predictor, plan.eval_rows, plan.spec)  # K-score, span F1, Brier/ECE, threshold

The K-score is the contract's (every field equal, absent keys absent). Beside it: per-field accuracy (dotted
paths for nested fields), span precision/recall/F1 on exact values (CoNLL-style: a predicted span counts only
when its field and its text both match the gold), and the confidence's Brier and ECE on the rows it was not
fitted on.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from kolm_ray.artifact.kscore import field_correct, unwrap, values_equal
from kolm_ray.artifact.spec import CONFIDENCE_FIELD, Spec
from kolm_ray.artifact.verifiers import build, hard_failures
from kolm_ray.compile.evaluate import brier, ece, fit_temperature, split_for_calibration
from kolm_ray.models.extract_layout import ABSENT, EXTRACTOR_FILE, _get, classes, span_text, spans

LOCAL_PRECISION = 0.98  # the threshold keeps answers whose calibration rows were right at least this often
MIN_THRESHOLD = 0.5  # never answer locally below an even chance of being entirely right


def stage_extractor(plan, checkpoint_dir: Path, staging: Path, tokenizer) -> str:
    """Write weights, config, tokenizer and extractor.json into `staging`."""
    from safetensors.torch import save_file

    from kolm_ray.compile.train.checkpoint import WEIGHTS, load_trainable
    from kolm_ray.models.extractor import EncoderExtractor

    model = EncoderExtractor(plan.base.load_model(), plan.extract)
    load_trainable(model, Path(checkpoint_dir) / WEIGHTS)
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(staging / "model.safetensors"), metadata={"format": "pt"})
    model.encoder.config.save_pretrained(staging)
    tokenizer.save_pretrained(staging)
    meta = {"layout": plan.extract, "max_len": int(plan.training.get("max_len", 128))}
    (staging / EXTRACTOR_FILE).write_text(json.dumps(meta, indent=2))
    return "encoder-extractor"


# ---- calibration -------------------------------------------------------------------------------------------


def _logit_of_log(logps: torch.Tensor) -> torch.Tensor:
    """logit(p) from log p, stable near p = 1 (clamped to p <= 1 - 1e-9)."""
    lp = logps.clamp(max=math.log1p(-1e-9))
    return lp - torch.log(-torch.expm1(lp))


def fit_platt(logps: Sequence[float], right: Sequence[bool], l2: float = 1e-2) -> dict[str, float]:
    """logit P(answer right) = a * logit(p_model) + b, by L-BFGS on the log-loss plus l2 * ((a - 1)^2 + b^2):
    the penalty pulls toward the model's own probability (a = 1, b = 0), so a calibration half where every
    answer was right (a small or easy task) cannot flatten the map into one constant confidence."""
    x = _logit_of_log(torch.tensor(list(logps), dtype=torch.float64).clamp(min=-50.0))
    y = torch.tensor([float(r) for r in right], dtype=torch.float64)
    if len(x) == 0:
        return {"a": 1.0, "b": 0.0}
    a = torch.ones(1, dtype=torch.float64, requires_grad=True)
    b = torch.zeros(1, dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([a, b], max_iter=200, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = torch.nn.functional.binary_cross_entropy_with_logits(a * x + b, y)
        loss = loss + l2 * ((a - 1) ** 2 + b**2).sum()
        loss.backward()
        return loss

    with torch.enable_grad():
        opt.step(closure)
    return {"a": max(float(a.detach()), 0.0), "b": float(b.detach())}


def choose_threshold(
    confs: Sequence[float], right: Sequence[bool], precision: float = LOCAL_PRECISION
) -> float:
    """The lowest confidence t (>= MIN_THRESHOLD) such that the rows with confidence >= t were right at least
    `precision` of the time; 1.0 (answer nothing locally) when no t qualifies."""
    order = sorted(range(len(confs)), key=lambda i: -confs[i])
    best, ok = 1.0, 0
    for k, i in enumerate(order, start=1):
        ok += bool(right[i])
        if ok / k >= precision and confs[i] >= MIN_THRESHOLD:
            best = confs[i]
    return math.floor(float(best) * 1e6) / 1e6  # answers carry confidence rounded to 6 places


def _tag_targets(predictor, raw, gold) -> torch.Tensor:
    from kolm_ray.models.extractor import tag_targets

    return torch.tensor(
        tag_targets(raw.text, raw.offsets, gold, predictor.layout, raw.words), dtype=torch.long
    )


def calibrate_extractor(predictor, raws: list, golds: list[Any]) -> dict[str, Any]:
    """Fit the temperatures (tags, then each class head, by NLL), the Platt map of the answer's log-probability
    and the local-answer threshold, all on these rows; set them on the predictor."""
    from kolm_ray.models.extract_layout import class_index

    temps: dict[str, float] = {}
    if raws:
        logits = torch.cat([r.tags.float() for r in raws])
        targets = torch.cat([_tag_targets(predictor, r, g) for r, g in zip(raws, golds, strict=True)])
        keep = targets >= 0
        temps["__tags__"] = fit_temperature(logits[keep], targets[keep])
        start = 0
        for f in classes(predictor.layout):
            n = len(f["values"]) + int(f["absent"])
            lg = torch.stack([r.classes[start : start + n].float() for r in raws])
            tg = torch.tensor([class_index(f, _get(g, f["path"])) for g in golds], dtype=torch.long)
            temps[".".join(f["path"])] = fit_temperature(lg, tg)
            start += n
    predictor.temperature, predictor.platt = temps, None
    logps, right = [], []
    for r, g in zip(raws, golds, strict=True):
        fields, logp = predictor.answer(r)
        logps.append(logp)
        right.append(values_equal(fields, g, predictor.spec.tolerance))
    predictor.platt = fit_platt(logps, right)
    confs = [predictor.confidence_of(lp) for lp in logps]
    predictor.threshold = choose_threshold(confs, right)
    return {"temperature": temps, "platt": predictor.platt, "threshold": predictor.threshold}


# ---- scoring -----------------------------------------------------------------------------------------------


def span_counts(layout: dict[str, Any], pred: Any, gold: Any) -> tuple[int, int, int]:
    """(true positives, predicted, gold) span values: a hit needs the same field and the same exact text."""
    tp = n_pred = n_gold = 0
    for f in spans(layout):
        p, g = span_text(_get(pred, f["path"])), span_text(_get(gold, f["path"]))
        n_pred += p is not None
        n_gold += g is not None
        tp += p is not None and g is not None and p == g
    return tp, n_pred, n_gold


def _field_ok(layout: dict[str, Any], pred: Any, gold: Any, tol: float) -> dict[str, bool]:
    out = {}
    for f in layout["fields"]:
        p, g = _get(pred, f["path"]), _get(gold, f["path"])
        out[".".join(f["path"])] = (p is ABSENT and g is ABSENT) or (
            p is not ABSENT and g is not ABSENT and values_equal(p, g, tol)
        )
    return out


def _grounded(layout: dict[str, Any], pred: Any, text: str) -> bool:
    for f in spans(layout):
        v = _get(pred, f["path"])
        if isinstance(v, str) and v not in text:
            return False
    return True


def evaluate_extractor(
    predictor,
    pairs: Sequence[dict[str, Any]],
    spec: Spec,
    *,
    fit: bool = True,
    progress: bool = False,
    k_floor: float | None = None,
) -> dict[str, Any]:
    """Calibrate (when fit) on half the pairs, answer every pair, and score; metrics for the manifest. With
    `k_floor`: `selective`, the same gate the tagger and the loop use (compile/selective.py), at the threshold
    chosen on the calibration half and judged on the scored half."""
    inputs = [p["input"] for p in pairs]
    golds = [p["output"] for p in pairs]
    raws = predictor.raw(inputs)
    cal_idx, score_idx, disjoint = split_for_calibration(len(pairs))
    if not fit:
        cal_idx, score_idx, disjoint = [], list(range(len(pairs))), True
    fitted = (
        calibrate_extractor(predictor, [raws[i] for i in cal_idx], [golds[i] for i in cal_idx])
        if fit
        else predictor.calibration()
    )
    answers = predictor.answers(raws)
    verifiers = build(spec)
    passed, right, failures = [], [], []
    per_field: dict[str, list[bool]] = {}
    tp = n_pred = n_gold = 0
    grounded = []
    for inp, gold, ans in zip(inputs, golds, answers, strict=True):
        pred = unwrap(ans)
        reasons = hard_failures(verifiers, ans, inp)
        for k, ok in _field_ok(predictor.layout, pred, gold, spec.tolerance).items():
            per_field.setdefault(k, []).append(ok)
        fc = field_correct(ans, gold, spec.tolerance)
        ok_all = all(fc.values()) and values_equal(pred, gold, spec.tolerance)
        right.append(ok_all)
        passed.append(ok_all and not reasons)
        a, b, c = span_counts(predictor.layout, pred, gold)
        tp, n_pred, n_gold = tp + a, n_pred + b, n_gold + c
        grounded.append(_grounded(predictor.layout, pred, inp))
        if not passed[-1] and len(failures) < 5:
            failures.append({"input": inp, "gold": gold, "predicted": ans, "reasons": reasons})
    confs = [float(a.get(CONFIDENCE_FIELD, 0.0)) for a in answers]
    sc_conf = [confs[i] for i in score_idx]
    sc_right = [right[i] for i in score_idx]
    threshold = predictor.threshold if predictor.threshold is not None else 1.0
    local = [i for i in score_idx if confs[i] >= threshold]
    precision = tp / n_pred if n_pred else 0.0
    recall = tp / n_gold if n_gold else 0.0
    metrics: dict[str, Any] = {
        "k_score": sum(passed) / len(passed) if passed else 0.0,
        "n_eval": len(pairs),
        "accuracy": sum(right) / len(right) if right else 0.0,
        "field_accuracy": {k: sum(v) / len(v) for k, v in per_field.items()},
        "span_precision": precision,
        "span_recall": recall,
        "span_f1": 2 * precision * recall / (precision + recall) if precision + recall else 0.0,
        "grounded_share": sum(grounded) / len(grounded) if grounded else 1.0,
        "temperature": fitted.get("temperature", {}),
        "brier": brier(sc_conf, sc_right),
        "ece": ece(sc_conf, sc_right),
        "calibration": {
            "n_fit": len(cal_idx),
            "n_scored": len(score_idx),
            "disjoint": disjoint,
            "objective": "nll per head, then platt scaling of the logit of the answer's probability (exact match)",
            "platt": predictor.platt,
        },
        "local_threshold": threshold,
        "local_threshold_rule": (
            f"lowest confidence >= {MIN_THRESHOLD} at which the calibration rows answered were exactly right "
            f">= {LOCAL_PRECISION:.0%} of the time (chosen on the calibration half, not the scored half)"
        ),
        "local_share": len(local) / len(score_idx) if score_idx else 0.0,
        "local_accuracy": sum(right[i] for i in local) / len(local) if local else None,
        "failures": failures,
    }
    if k_floor is not None and fit:
        from kolm_ray.compile.selective import gate as selective_gate

        g = selective_gate(sc_conf, [passed[i] for i in score_idx], threshold, k_floor)
        metrics["selective"] = g.to_json() | {
            "threshold": threshold,
            "n_threshold_rows": len(cal_idx),
            "n_gate_rows": len(score_idx),
            "disjoint": disjoint,
            "reason": g.reason,
        }
        metrics["coverage"] = metrics["selective"]["coverage"]
        metrics["answered_accuracy"] = metrics["selective"]["answered_accuracy"]
    for v in verifiers:
        if not v.hard:
            value, ok = v.score(sc_conf, sc_right)
            metrics.setdefault("verifiers", {})[v.name] = {
                "value": value,
                "threshold": v.vspec.threshold,
                "passed": ok,
            }
    if not all(math.isfinite(x) for x in (metrics["brier"], metrics["ece"])):
        metrics["brier"] = metrics["ece"] = 1.0
    return metrics
