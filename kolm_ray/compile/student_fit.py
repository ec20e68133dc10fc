"""How compile fits the static-embedding student (kolm_ray/inference/student.py), for encoder taggers with one
closed-vocab field (fit_student):
1. distil: model2vec runs every vocabulary token through the fine-tuned encoder once (PCA to <= 256 dims);
2. train, end to end: the distilled table (torch EmbeddingBag, mean) -> L2 normalisation -> ReLU layer ->
   logits, on the train pairs' labels and the teacher's calibrated soft labels (half each), the teacher's
   "none of these" mass spread over the labels (teacher_targets), negatives weighted up;
3. calibration: a temperature on the eval split's calibration slice, the "fit" half (with the negatives,
   when given, the same Brier-with-negatives objective as the teacher's);
4. threshold, on the same fit half: the lowest student confidence at which the cascade's K-score is within
   0.5 points of the teacher's (and at or above the floor, and, with negatives, its out-of-scope share
   routed broad within 0.5 points too);
5. the gate, on the other half (held out from 3 and 4, with the held-out negatives): the shipped cascade,
   scored through Predictor.predict, against the teacher alone on the same rows. The student ships only
   where it costs nothing measurable there: its K-score at or above the floor and within 0.5 points of the
   teacher's, out-of-scope -> broad within 0.5 points too. Its ms per query is measured, the cascade and
   the teacher alone interleaved on the same held-out queries. No threshold, too few eval pairs to hold
   half out (evaluate.MIN_CALIBRATION), or a held-out miss: the artifact ships without a student, and the
   manifest's metrics["student"] says why (the teacher alone still passed compile's gate).

On CLINC150 (benchmarks/student_variants.py, test): the first student (softmax regression on the distilled
vectors) answered 24.9% of queries at the bar, this one 55.9% (0.968 accurate alone); what bounds it is the
out-of-scope queries a bag of tokens is sure of.
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from kolm_ray.inference.student import STUDENT_DIR, Student

K_TOLERANCE = 0.005  # the cascade's K-score may trail the teacher's by at most 0.5 points on eval
SOFT_WEIGHT = 0.5  # share of the loss on the teacher's soft labels (the rest: the gold labels)
HIDDEN = 256  # units of the head's ReLU layer
EPOCHS = 10
MIN_STEPS = 300  # optimizer steps at least: a router with a few hundred pairs gets more passes over them
BATCH = 64
NEGATIVE_WEIGHT = 4.0  # per unlabelled (negative) row in the soft-label loss, as the teacher trains
TABLE_LR, HEAD_LR = 1e-2, 1e-3  # Adam, decayed linearly to 0
MAX_DIMS = 256  # PCA target for the token vectors (model2vec's default)
# Candidate thresholds, low to high: the first that holds the bar gives the largest student share.
# Finer from 0.95: there a step of 0.01 moves a router's student share by ~15 points.
_COARSE, _FINE = np.arange(0.50, 0.95, 0.01), np.arange(0.95, 0.9951, 0.0025)
THRESHOLDS = tuple(float(round(t, 4)) for t in (*_COARSE, *_FINE)) + (0.999,)


def distill(encoder, tokenizer):
    """model2vec's distillation of an in-memory encoder: each vocabulary token through it once."""
    from model2vec.distill import distill_from_model

    dims = min(MAX_DIMS, int(encoder.config.hidden_size))
    return distill_from_model(encoder, tokenizer, pca_dims=dims)


def token_ids(static, inputs: Sequence[str]) -> list[list[int]]:
    """The rows of static.embedding that encode() averages for each input (truncated as encode does)."""
    cap = static.max_length
    ids = static.tokenize(list(inputs))
    return ids if cap is None else [row[:cap] for row in ids]


class _Net(torch.nn.Module):
    """The student as one torch module for training: EmbeddingBag(mean) over the token table (= encode),
    L2 normalisation when the static model normalises, a ReLU layer, the output layer."""

    def __init__(self, table: np.ndarray, normalize: bool, hidden: int, n_labels: int):
        super().__init__()
        # sparse: a batch's gradient touches only its tokens' rows (a dense one would be the whole table)
        self.bag = torch.nn.EmbeddingBag.from_pretrained(
            torch.from_numpy(np.asarray(table, dtype=np.float32)), freeze=False, mode="mean", sparse=True
        )
        self.normalize = normalize
        self.hidden = torch.nn.Linear(table.shape[1], hidden)
        self.out = torch.nn.Linear(hidden, n_labels)

    def forward(self, flat: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
        x = self.bag(flat, offsets)  # an input with no known token averages nothing: zeros, as in encode
        if self.normalize:
            x = torch.nn.functional.normalize(x, dim=-1, eps=1e-32)
        return self.out(torch.relu(self.hidden(x)))


def _bags(rows: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
    lengths = torch.tensor([len(r) for r in rows], dtype=torch.long)
    offsets = torch.cat([torch.zeros(1, dtype=torch.long), lengths.cumsum(0)[:-1]])
    flat = torch.tensor([t for r in rows for t in r], dtype=torch.long)
    return flat, offsets


def _epochs(net, opts, scheds, rows, hard, soft, epochs: int, soft_weight: float, neg_weight: float, gen):
    """Mini-batch passes: (1 - w) * CE(gold) on labelled rows + w * CE(teacher's soft labels) on every row."""
    for _ in range(epochs):
        for idx in torch.randperm(len(rows), generator=gen).split(BATCH):
            logp = torch.log_softmax(net(*_bags([rows[i] for i in idx])), dim=-1)
            known = hard[idx] >= 0
            # rows with no label (a router's negatives) weigh more: they are few, and they teach "unsure"
            row_w = torch.where(known, 1.0, neg_weight)
            loss = -((soft[idx] * logp).sum(dim=-1) * row_w).sum() / row_w.sum() * soft_weight
            if known.any():
                loss = loss + (1 - soft_weight) * torch.nn.functional.nll_loss(logp[known], hard[idx][known])
            for o in opts:
                o.zero_grad()
            loss.backward()
            for o, sched in zip(opts, scheds, strict=True):
                o.step()
                sched.step()


def train_student(
    static,
    inputs: Sequence[str],
    hard: torch.Tensor,
    soft: torch.Tensor,
    *,
    hidden: int = HIDDEN,
    epochs: int = EPOCHS,
    soft_weight: float = SOFT_WEIGHT,
    negative_weight: float = NEGATIVE_WEIGHT,
    seed: int = 0,
):
    """Fine-tune the distilled token table end to end with a one-hidden-layer head (Adam, mini-batches):
    (1 - w) * CE(gold) on labelled rows + w * CE(teacher's soft labels) on every row. Returns (a StaticModel
    with the trained table, (hidden weight, hidden bias), (weight, bias))."""
    from model2vec import StaticModel

    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    rows = token_ids(static, inputs)
    if static.token_mapping is not None or static.weights is not None:
        raise ValueError("a vocabulary-quantized static model: distil without vocabulary_quantization")
    table = np.asarray(static.embedding, dtype=np.float32)
    net = _Net(table, static.normalize, hidden, soft.shape[1])
    opts = [
        torch.optim.SparseAdam(net.bag.parameters(), lr=TABLE_LR),  # lazy: untouched rows keep their moments
        torch.optim.Adam([*net.hidden.parameters(), *net.out.parameters()], lr=HEAD_LR),
    ]
    soft = soft.float()
    n = len(rows)
    per_epoch = -(-n // BATCH)
    epochs = max(epochs, -(-MIN_STEPS // per_epoch))
    steps = epochs * per_epoch
    scheds = [torch.optim.lr_scheduler.LambdaLR(o, lambda i: 1.0 - i / steps) for o in opts]  # linear decay
    net.train()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # batches of 64 short bags: more threads only wait on each other
    try:
        _epochs(net, opts, scheds, rows, hard, soft, epochs, soft_weight, negative_weight, gen)
    finally:
        torch.set_num_threads(threads)
    table = net.bag.weight.detach().numpy().copy()
    trained = StaticModel(
        vectors=table,
        tokenizer=static.tokenizer,
        config=static.config,
        normalize=static.normalize,
        base_model_name=static.base_model_name,
        language=static.language,
        max_length=static.max_length,
    )
    layer = (net.hidden.weight.detach().numpy(), net.hidden.bias.detach().numpy())
    return trained, layer, (net.out.weight.detach().numpy(), net.out.bias.detach().numpy())


def passed_flags(spec, inputs: Sequence[str], golds: Sequence[Any], answers: Sequence[dict]) -> list[bool]:
    """Per pair, what the K-score counts: every hard verifier passes and the answer equals the gold."""
    from kolm_ray.artifact.kscore import field_correct, unwrap
    from kolm_ray.artifact.verifiers import build, hard_failures

    verifiers = build(spec)
    out = []
    for inp, gold, ans in zip(inputs, golds, answers, strict=True):
        pred = unwrap(ans)
        reasons = hard_failures(verifiers, ans if isinstance(pred, dict) else pred, inp)
        out.append(all(field_correct(ans, gold, spec.tolerance).values()) and not reasons)
    return out


def choose_threshold(
    student_conf: np.ndarray,
    student_passed: np.ndarray,
    teacher_passed: np.ndarray,
    k_floor: float,
    negative_student_conf: np.ndarray | None = None,
    negative_teacher_broad: np.ndarray | None = None,
    broad_below: float = 0.7,
) -> tuple[float | None, dict[str, float]]:
    """The lowest threshold whose cascade holds the bar on eval, with (k_teacher, k_cascade, share);
    (None, ...) when none does. Never below `broad_below`: a query the student would send broad goes to
    the teacher instead, which may be sure of it."""
    k_teacher = float(teacher_passed.mean())
    nb_teacher = float(negative_teacher_broad.mean()) if negative_teacher_broad is not None else None
    for t in (t for t in THRESHOLDS if t >= broad_below):
        sure = student_conf >= t
        k = float(np.where(sure, student_passed, teacher_passed).mean())
        if k < k_teacher - K_TOLERANCE or k < k_floor:
            continue
        if negative_student_conf is not None and nb_teacher is not None:
            neg_sure = negative_student_conf >= t
            # a negative the student takes is broad only if its confidence is under the fallback threshold
            nb = float(np.where(neg_sure, negative_student_conf < broad_below, negative_teacher_broad).mean())
            if nb < nb_teacher - K_TOLERANCE:
                continue
        return t, {"k_teacher": k_teacher, "k_cascade": k, "share": float(sure.mean())}
    return None, {"k_teacher": k_teacher}


def _ms_per_query(fn, inputs: list[str], repeat: int = 64) -> float:
    """Median single-query latency of fn([q]) over up to `repeat` inputs (what a router pays per request)."""
    sample = inputs[:repeat] or ["?"]
    times = []
    for q in sample:
        t0 = time.perf_counter()
        fn([q])
        times.append(time.perf_counter() - t0)
    return round(float(np.median(times)) * 1000, 3)


def _ms_per_query_paired(predictor, inputs: list[str], repeat: int = 64) -> dict[str, float]:
    """Median single-query latency of predictor.predict([q]) as the cascade and as the teacher alone, the two
    interleaved query by query on the same inputs (so load on the machine falls on both alike)."""
    sample = inputs[:repeat] or ["?"]
    times: dict[str, list[float]] = {"cascade": [], "teacher": []}
    for q in sample:
        for mode in ("cascade", "teacher"):
            predictor.cascade = mode
            t0 = time.perf_counter()
            predictor.predict([q])
            times[mode].append(time.perf_counter() - t0)
    return {k: round(float(np.median(v)) * 1000, 3) for k, v in times.items()}


def soft_labels(logits: torch.Tensor, distances, temperature: float, outlier) -> torch.Tensor:
    """A teacher's calibrated answers as soft labels (n, n_labels): models.outlier_probs, with the mass it
    leaves for "none of these" (class distances) spread evenly over the labels, so the student learns to be
    unsure where the teacher thinks an input is out of scope, not only where two labels compete."""
    from kolm_ray.models.modeling import outlier_probs

    d = None if distances is None else distances.double()
    p = outlier_probs(logits.double(), temperature, d, outlier)
    return p + (1.0 - p.sum(dim=-1, keepdim=True)).clamp(min=0.0) / p.shape[1]


def teacher_targets(teacher, field: str, inputs: Sequence[str]) -> torch.Tensor:
    """soft_labels of the teacher (a calibrated encoder Predictor) on each input."""
    logits, dists = teacher.calibration_scores(list(inputs))
    return soft_labels(
        logits[field], dists.get(field), teacher.temperature.get(field, 1.0), teacher.outlier.get(field)
    )


def fit_student(teacher, plan, staging: Path) -> dict[str, Any]:
    """Distil, train, calibrate and place the student of a calibrated encoder `teacher` (a Predictor over
    the staged files); writes staging/student/ and attaches the student to `teacher` when the cascade
    holds the bar. Returns metrics["student"] for the manifest."""
    from kolm_ray.compile.evaluate import (
        MIN_CALIBRATION,
        NEGATIVE_CALIBRATION_WEIGHT,
        evaluate,
        fit_temperature,
        fit_temperature_with_negatives,
        split_for_calibration,
    )

    if teacher.kind != "encoder-tagger" or len(teacher.labels) != 1:
        return {"used": False, "reason": "a student is built for encoder routers with one closed-vocab field"}
    (field,) = teacher.labels
    labels = teacher.labels[field]
    t0 = time.perf_counter()
    static = distill(teacher.model.encoder, teacher.tokenizer)
    distill_s = time.perf_counter() - t0

    train_inputs = [r["input"] for r in plan.train_rows]
    index = {json.dumps(v): i for i, v in enumerate(labels)}
    hard = torch.tensor(
        [index.get(json.dumps((r["output"] or {}).get(field)), -1) for r in plan.train_rows], dtype=torch.long
    )
    soft = teacher_targets(teacher, field, train_inputs)
    t0 = time.perf_counter()
    static, hidden, (weight, bias) = train_student(static, train_inputs, hard, soft)
    train_s = time.perf_counter() - t0
    student = Student(static, weight, bias, field, labels, hidden=hidden)

    eval_inputs = [r["input"] for r in plan.eval_rows]
    golds = [r["output"] for r in plan.eval_rows]
    report: dict[str, Any] = {
        "distill_seconds": round(distill_s, 2),
        "train_seconds": round(train_s, 2),
        "dims": int(static.dim),
        "hidden": int(hidden[0].shape[0]),
    }
    # fit: temperature and threshold; held: the gate and every figure reported (evaluate's same split)
    fit_idx, held_idx, disjoint = split_for_calibration(len(eval_inputs))
    negatives = list(plan.eval_negatives)
    neg_fit, neg_held, _ = split_for_calibration(len(negatives), seed=1)
    if not disjoint:
        teacher.student, teacher.cascade = None, "teacher"
        return {
            "used": False,
            "reason": f"{len(eval_inputs)} eval pairs: a student needs {MIN_CALIBRATION} or more, to fit its "
            "threshold on one half and gate the cascade on the other",
            **report,
        }
    eval_logits = torch.from_numpy(student.logits(eval_inputs)).float()
    targets = teacher.calibration_targets(golds)[field]
    neg_weight = float(plan.training.get("calibration_negative_weight", NEGATIVE_CALIBRATION_WEIGHT))
    pick = torch.tensor(fit_idx, dtype=torch.long)
    if neg_fit:
        neg_logits = torch.from_numpy(student.logits([negatives[i] for i in neg_fit])).float()
        student.temperature = fit_temperature_with_negatives(
            eval_logits[pick], targets[pick], neg_logits, neg_weight
        )
    else:
        student.temperature = fit_temperature(eval_logits[pick], targets[pick])
    report["temperature"] = student.temperature

    # Per-pair outcomes of each stage alone on the fit half, then the threshold.
    fit_inputs, fit_golds = [eval_inputs[i] for i in fit_idx], [golds[i] for i in fit_idx]
    teacher.cascade = "teacher"
    teacher_answers = teacher.predict(fit_inputs)
    teacher.student, teacher.cascade = student, "student"
    student_answers = teacher.predict(fit_inputs)
    s_conf = np.array([a["confidence"] for a in student_answers])
    s_passed = np.array(passed_flags(plan.spec, fit_inputs, fit_golds, student_answers))
    t_passed = np.array(passed_flags(plan.spec, fit_inputs, fit_golds, teacher_answers))
    broad_below = teacher.fallback_threshold if teacher.fallback_threshold is not None else 0.7
    neg_s = neg_t = None
    if neg_fit:
        fit_negatives = [negatives[i] for i in neg_fit]
        neg_s = np.array([a["confidence"] for a in teacher.predict(fit_negatives)])
        teacher.cascade = "teacher"
        neg_t = np.array([a["confidence"] < broad_below for a in teacher.predict(fit_negatives)])
    threshold, bar = choose_threshold(s_conf, s_passed, t_passed, plan.k_floor, neg_s, neg_t, broad_below)
    report["fit"] = {"n": len(fit_idx), "n_negatives": len(neg_fit), **bar}
    if threshold is None:
        teacher.student, teacher.cascade = None, "teacher"
        return {
            "used": False,
            "reason": "no threshold keeps the cascade's K-score on the fit half of eval within 0.5 points of the "
            "teacher's and at or above the floor",
            **report,
        }
    student.threshold = threshold

    # The gate, on the held-out half: the shipped form (Predictor.predict -> the cascade) and the teacher
    # alone, each through evaluate (fit=False: nothing is refitted on these rows).
    held_rows = [plan.eval_rows[i] for i in held_idx]
    held_negatives = [negatives[i] for i in neg_held]
    held_inputs = [r["input"] for r in held_rows]
    teacher.cascade = "teacher"
    alone = evaluate(teacher, held_rows, plan.spec, fit=False, negatives=held_negatives)
    teacher.cascade = "cascade"
    cascade = evaluate(teacher, held_rows, plan.spec, fit=False, negatives=held_negatives)
    share = float((student.answer(held_inputs)[1] >= threshold).mean())  # the queries the student answers
    ms = _ms_per_query_paired(teacher, held_inputs)
    ms["student"] = _ms_per_query(lambda q: student.answer(q), held_inputs)
    teacher.cascade = "cascade"
    keys = ("k_score", "accuracy", "brier", "ece", "negatives_broad")
    report.update(
        threshold=threshold,
        student_share=share,
        held_out={"n": len(held_rows), "n_negatives": len(held_negatives)},
        k_score={"student": None, "teacher": alone["k_score"], "cascade": cascade["k_score"]},
        accuracy_student=None,
        teacher={k: alone[k] for k in keys if k in alone},
        cascade={k: cascade[k] for k in keys if k in cascade},
        ms_per_query=ms,  # measured, the cascade and the teacher alone interleaved on the same queries
    )
    teacher.cascade = "student"
    s_held = teacher.predict(held_inputs)
    teacher.cascade = "cascade"
    report["k_score"]["student"] = report["accuracy_student"] = float(
        np.mean(passed_flags(plan.spec, held_inputs, [r["output"] for r in held_rows], s_held))
    )
    misses = []
    if cascade["k_score"] < plan.k_floor:
        misses.append(f"K-score {cascade['k_score']:.3f} below the floor {plan.k_floor:.2f}")
    if cascade["k_score"] < alone["k_score"] - K_TOLERANCE:
        misses.append(f"K-score {cascade['k_score']:.3f} vs the teacher's {alone['k_score']:.3f}")
    if "negatives_broad" in alone and cascade["negatives_broad"] < alone["negatives_broad"] - K_TOLERANCE:
        misses.append(
            f"out-of-scope -> broad {cascade['negatives_broad']:.3f} vs the teacher's {alone['negatives_broad']:.3f}"
        )
    if misses:
        teacher.student, teacher.cascade = None, "teacher"
        return {
            "used": False,
            "reason": f"the cascade on {len(held_rows)} held-out eval pairs costs more than 0.5 points: "
            + "; ".join(misses),
            **report,
        }
    report["used"] = True
    out = staging / STUDENT_DIR
    out.mkdir()
    student.save(out)
    return report
