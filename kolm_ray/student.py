"""The static-embedding student in front of an encoder router, and how compile fits it.

A query's answer costs a MiniLM forward (~9 ms of CPU) in the teacher; the student answers from a table of
token vectors (model2vec: the mean of the query's token vectors, ~0.1 ms) and a linear head. The cascade
answers from the student when its calibrated confidence is at or above `threshold` and escalates the rest
to the teacher; tenant masking applies to both (a masked namespace gets -inf before either softmax).

Compile (fit_student, for encoder taggers with one closed-vocab field):
1. distil: model2vec runs every vocabulary token through the fine-tuned encoder once (PCA to <= 256 dims);
2. head: softmax regression on the train pairs' static vectors, against their labels and the teacher's
   calibrated soft labels (half each);
3. calibration: a temperature on the eval split's calibration slice (with the negatives, when given, the
   same Brier-with-negatives objective as the teacher's);
4. threshold: the lowest student confidence at which the cascade's K-score on the eval split is within
   0.5 points of the teacher's (and at or above the floor, and, with negatives, its out-of-scope share
   routed broad within 0.5 points too). No such threshold: the artifact ships without a student, and the
   manifest's metrics["student"] says why.

Files, under student/ in the artifact (safetensors and JSON only): model2vec's model.safetensors,
tokenizer.json, config.json and modules.json; head.safetensors (weight, bias); student.json (field, labels,
temperature, threshold).
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

STUDENT_DIR = "student"
HEAD_FILE = "head.safetensors"
META_FILE = "student.json"
K_TOLERANCE = 0.005  # the cascade's K-score may trail the teacher's by at most 0.5 points on eval
SOFT_WEIGHT = 0.5  # share of the head's loss on the teacher's soft labels (the rest: the gold labels)
L2 = 1e-4  # on the head's weights; the static vectors are unit length
MAX_DIMS = 256  # PCA target for the token vectors (model2vec's default)
# Candidate thresholds, low to high: the first that holds the bar gives the largest student share.
THRESHOLDS = tuple(round(t, 3) for t in np.arange(0.50, 0.99, 0.01)) + (0.99, 0.995, 0.999)


class Student:
    """Static token vectors + softmax regression for one field, with its own temperature and threshold."""

    def __init__(
        self,
        static,
        weight: np.ndarray,
        bias: np.ndarray,
        field: str,
        labels: list[Any],
        temperature: float = 1.0,
        threshold: float = 1.0,
    ):
        self.static = static  # model2vec.StaticModel
        self.weight = np.ascontiguousarray(weight, dtype=np.float32)  # (n_labels, dims)
        self.bias = np.ascontiguousarray(bias, dtype=np.float32)  # (n_labels,)
        self.field = field
        self.labels = list(labels)
        self.temperature = float(temperature)
        self.threshold = float(threshold)

    @classmethod
    def load(cls, directory: str | Path) -> Student:
        from model2vec import StaticModel
        from safetensors.numpy import load_file

        directory = Path(directory)
        meta = json.loads((directory / META_FILE).read_text())
        head = load_file(str(directory / HEAD_FILE))
        return cls(
            StaticModel.from_pretrained(str(directory)),
            head["weight"],
            head["bias"],
            meta["field"],
            meta["labels"],
            meta["temperature"],
            meta["threshold"],
        )

    def save(self, directory: str | Path) -> None:
        from safetensors.numpy import save_file

        directory = Path(directory)
        self.static.save_pretrained(str(directory))
        (directory / "README.md").unlink(missing_ok=True)  # model2vec's model card: not part of the model
        save_file({"weight": self.weight, "bias": self.bias}, str(directory / HEAD_FILE))
        meta = {
            "field": self.field,
            "labels": self.labels,
            "temperature": self.temperature,
            "threshold": self.threshold,
            "dims": int(self.weight.shape[1]),
        }
        (directory / META_FILE).write_text(json.dumps(meta, indent=2))

    def embed(self, inputs: Sequence[str]) -> np.ndarray:
        # One process: a router's batches are small, and a worker pool per call costs more than it saves.
        return self.static.encode(list(inputs), use_multiprocessing=False)

    def logits(self, inputs: Sequence[str]) -> np.ndarray:
        """Un-tempered logits (len(inputs), n_labels)."""
        if not inputs:
            return np.zeros((0, len(self.labels)), dtype=np.float32)
        return self.embed(inputs) @ self.weight.T + self.bias

    def probs(self, logits: np.ndarray, mask: np.ndarray | None = None) -> np.ndarray:
        """Calibrated probabilities; masked labels (mask False) get exactly 0."""
        z = logits.astype(np.float64) / self.temperature
        if mask is not None:
            z = np.where(mask[None, :], z, -np.inf)
        z = z - z.max(axis=-1, keepdims=True)
        e = np.exp(z)
        return e / e.sum(axis=-1, keepdims=True)

    def answer(self, inputs: Sequence[str], mask: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        """(label index, confidence) per input."""
        p = self.probs(self.logits(inputs), mask)
        best = p.argmax(axis=-1)
        return best, p[np.arange(len(best)), best]

    def mask_for(self, allowed: Sequence[str]) -> np.ndarray:
        """Which labels a caller may be answered with (the tenant's namespaces)."""
        ok = set(allowed)
        return np.array([v in ok for v in self.labels], dtype=bool)

    def sure(self, query: str, allowed: Sequence[str]) -> dict[str, Any] | None:
        """The cascade's first stage for one query: {field: value, "confidence": c} when the student is
        sure (c >= threshold) under the caller's mask, else None (escalate to the teacher)."""
        mask = self.mask_for(allowed)
        if not mask.any():
            return None
        best, conf = self.answer([query], mask)
        if conf[0] < self.threshold:
            return None
        return {self.field: self.labels[int(best[0])], "confidence": float(conf[0])}


# ---- compile ----------------------------------------------------------------------------------------------


def distill(encoder, tokenizer):
    """model2vec's distillation of an in-memory encoder: each vocabulary token through it once."""
    from model2vec.distill import distill_from_model

    dims = min(MAX_DIMS, int(encoder.config.hidden_size))
    return distill_from_model(encoder, tokenizer, pca_dims=dims)


def fit_head(
    x: torch.Tensor, hard: torch.Tensor, soft: torch.Tensor, soft_weight: float = SOFT_WEIGHT, l2: float = L2
) -> tuple[np.ndarray, np.ndarray]:
    """Softmax regression (LBFGS, full batch): (1 - w) * CE(gold) + w * CE(teacher's soft labels) + L2."""
    n_labels = soft.shape[1]
    weight = torch.zeros(n_labels, x.shape[1], dtype=torch.float64, requires_grad=True)
    bias = torch.zeros(n_labels, dtype=torch.float64, requires_grad=True)
    x, soft = x.double(), soft.double()
    known = hard >= 0
    opt = torch.optim.LBFGS([weight, bias], lr=1.0, max_iter=500, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        logp = torch.log_softmax(x @ weight.T + bias, dim=-1)
        loss = -(soft * logp).sum(dim=-1).mean() * soft_weight + l2 * (weight**2).sum()
        if known.any():
            loss = loss + (1 - soft_weight) * torch.nn.functional.nll_loss(logp[known], hard[known])
        loss.backward()
        return loss

    opt.step(closure)
    return weight.detach().float().numpy(), bias.detach().float().numpy()


def passed_flags(spec, inputs: Sequence[str], golds: Sequence[Any], answers: Sequence[dict]) -> list[bool]:
    """Per pair, what the K-score counts: every hard verifier passes and the answer equals the gold."""
    from kolm_ray.evaluate import field_correct, unwrap
    from kolm_ray.verifiers import build, hard_failures

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


def fit_student(teacher, plan, staging: Path) -> dict[str, Any]:
    """Distil, train, calibrate and place the student of a calibrated encoder `teacher` (a Predictor over
    the staged files); writes staging/student/ and attaches the student to `teacher` when the cascade
    holds the bar. Returns metrics["student"] for the manifest."""
    from kolm_ray.evaluate import (
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
    teacher_logits = teacher.calibration_scores(train_inputs)[0][field]
    soft = torch.softmax(teacher_logits.double() / teacher.temperature.get(field, 1.0), dim=-1)
    student = Student(static, np.zeros((len(labels), 1)), np.zeros(len(labels)), field, labels)
    x = torch.from_numpy(student.embed(train_inputs).astype(np.float32))
    student.weight, student.bias = fit_head(x, hard, soft)

    eval_inputs = [r["input"] for r in plan.eval_rows]
    golds = [r["output"] for r in plan.eval_rows]
    eval_logits = torch.from_numpy(student.logits(eval_inputs)).float()
    targets = teacher.calibration_targets(golds)[field]
    cal_idx, _, _ = split_for_calibration(len(eval_inputs))
    negatives = list(plan.eval_negatives)
    neg_cal, _, _ = split_for_calibration(len(negatives), seed=1)
    weight = float(plan.training.get("calibration_negative_weight", NEGATIVE_CALIBRATION_WEIGHT))
    pick = torch.tensor(cal_idx, dtype=torch.long)
    if neg_cal:
        neg_logits = torch.from_numpy(student.logits([negatives[i] for i in neg_cal])).float()
        student.temperature = fit_temperature_with_negatives(
            eval_logits[pick], targets[pick], neg_logits, weight
        )
    else:
        student.temperature = fit_temperature(eval_logits[pick], targets[pick])

    # Per-pair outcomes of each stage alone, then the threshold.
    teacher.cascade = "teacher"
    teacher_answers = teacher.predict(eval_inputs)
    teacher.student, teacher.cascade = student, "student"
    student_answers = teacher.predict(eval_inputs)
    s_conf = np.array([a["confidence"] for a in student_answers])
    s_passed = np.array(passed_flags(plan.spec, eval_inputs, golds, student_answers))
    t_passed = np.array(passed_flags(plan.spec, eval_inputs, golds, teacher_answers))
    broad_below = teacher.fallback_threshold if teacher.fallback_threshold is not None else 0.7
    neg_s = neg_t = None
    if negatives:
        neg_s = np.array([a["confidence"] for a in teacher.predict(negatives)])
        teacher.cascade = "teacher"
        neg_t = np.array([a["confidence"] < broad_below for a in teacher.predict(negatives)])
    threshold, bar = choose_threshold(s_conf, s_passed, t_passed, plan.k_floor, neg_s, neg_t, broad_below)
    report: dict[str, Any] = {
        "distill_seconds": round(distill_s, 2),
        "dims": int(student.weight.shape[1]),
        "temperature": student.temperature,
        "k_score": {"student": float(s_passed.mean()), "teacher": float(t_passed.mean())},
        "accuracy_student": float(s_passed.mean()),
    }
    if threshold is None:
        teacher.student, teacher.cascade = None, "teacher"
        return {
            "used": False,
            "reason": "no threshold keeps the cascade's K-score on eval within 0.5 points of the teacher's and at or above the floor",
            **report,
        }
    student.threshold = threshold
    teacher.cascade = "cascade"
    # The shipped form, scored through the one inference path (Predictor.predict -> the cascade).
    cascade = evaluate(teacher, plan.eval_rows, plan.spec, fit=False, negatives=negatives)
    student_ms = _ms_per_query(lambda q: student.answer(q), eval_inputs)
    teacher.cascade = "teacher"
    teacher_ms = _ms_per_query(teacher.predict, eval_inputs)
    teacher.cascade = "cascade"
    share = bar["share"]
    report["k_score"]["cascade"] = cascade["k_score"]
    report.update(
        used=True,
        threshold=threshold,
        student_share=share,
        cascade={k: cascade[k] for k in ("k_score", "accuracy", "brier", "ece") if k in cascade}
        | ({"negatives_broad": cascade["negatives_broad"]} if "negatives_broad" in cascade else {}),
        ms_per_query={
            "student": student_ms,
            "teacher": teacher_ms,
            # every query pays the student; the escalated ones pay the teacher too
            "cascade": round(student_ms + (1 - share) * teacher_ms, 3),
        },
    )
    out = staging / STUDENT_DIR
    out.mkdir()
    student.save(out)
    return report
