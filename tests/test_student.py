"""The static-embedding student: its head, its masking, its files, and how compile picks its threshold."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from kolm_ray.student import THRESHOLDS, Student, choose_threshold, distill, fit_head


def test_fit_head_learns_separable_classes_from_labels_and_soft_labels():
    rng = np.random.default_rng(0)
    centers = rng.normal(size=(3, 8))
    y = rng.integers(0, 3, size=300)
    x = centers[y] + 0.3 * rng.normal(size=(300, 8))
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    soft = torch.nn.functional.one_hot(torch.tensor(y), 3).double() * 0.9 + 0.1 / 3
    hard = torch.tensor(y)
    hard[::5] = -1  # unlabelled rows learn from the soft labels alone
    w, b = fit_head(torch.tensor(x, dtype=torch.float32), hard, soft)
    assert w.shape == (3, 8) and b.shape == (3,)
    assert ((x @ w.T + b).argmax(axis=1) == y).mean() > 0.97


class _Table:
    """A stand-in for model2vec's StaticModel with a fixed vector per word (what encode computes)."""

    def __init__(self, vectors: dict[str, np.ndarray]):
        self.vectors = vectors

    def encode(self, texts, use_multiprocessing=True):
        return np.stack([np.mean([self.vectors[w] for w in t.split()], axis=0) for t in texts])


def _student(threshold=0.9) -> Student:
    eye = np.eye(3, dtype=np.float32)
    table = _Table({"pay": eye[0], "fly": eye[1], "cook": eye[2], "um": np.zeros(3, dtype=np.float32)})
    return Student(table, 10 * eye, np.zeros(3), "namespace", ["bank", "travel", "food"], 1.0, threshold)


def test_student_masks_every_label_outside_the_caller():
    s = _student()
    p = s.probs(s.logits(["pay pay", "fly"]), s.mask_for(["travel", "food"]))
    assert np.all(p[:, 0] == 0.0) and np.allclose(p.sum(axis=1), 1.0)
    assert s.sure("fly", ["travel", "food"]) == {
        "namespace": "travel",
        "confidence": pytest.approx(1.0, abs=1e-3),
    }
    assert s.sure("pay", ["travel", "food"]) is None  # its own answer is masked: the rest is a coin toss
    assert s.sure("fly", ["podcasts"]) is None  # nothing this caller may see
    assert s.sure("um", ["bank", "travel", "food"]) is None  # 1/3 each: below the threshold -> escalate


@pytest.mark.slow  # a real distillation (every vocabulary token through the tiny encoder): up to minutes on a busy CPU
def test_student_files_round_trip_through_model2vec(tmp_path):
    from kolm_ray.bases import resolve_base

    base = resolve_base("tiny-encoder")
    static = distill(base.load_model(), base.load_tokenizer())
    rng = np.random.default_rng(1)
    dims = static.embedding.shape[1]
    s = Student(static, rng.normal(size=(4, dims)), rng.normal(size=4), "namespace", list("abcd"), 0.7, 0.85)
    s.save(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "config.json",
        "head.safetensors",
        "model.safetensors",
        "modules.json",
        "student.json",
        "tokenizer.json",
    ]  # safetensors and JSON only
    back = Student.load(tmp_path)
    queries = ["how do i check my balance", "book a flight to paris", "zzz"]
    assert (back.labels, back.temperature, back.threshold) == (list("abcd"), 0.7, 0.85)
    np.testing.assert_allclose(back.logits(queries), s.logits(queries), rtol=1e-5, atol=1e-5)


def test_threshold_is_the_lowest_that_keeps_the_cascade_within_half_a_point():
    rng = np.random.default_rng(0)
    n = 2000
    conf = rng.uniform(0.5, 1.0, size=n)
    student_right = rng.uniform(size=n) < conf  # calibrated: right with probability = confidence
    teacher_right = rng.uniform(size=n) < 0.95
    t, bar = choose_threshold(conf, student_right, teacher_right, k_floor=0.0)
    assert t is not None and t >= 0.7
    assert bar["k_cascade"] >= bar["k_teacher"] - 0.005
    lower = [x for x in THRESHOLDS if 0.7 <= x < t]
    for x in lower:  # every lower threshold misses the bar
        k = np.where(conf >= x, student_right, teacher_right).mean()
        assert k < bar["k_teacher"] - 0.005
    assert bar["share"] == pytest.approx((conf >= t).mean())


def test_no_threshold_when_the_student_is_sure_and_wrong():
    n = 500
    conf = np.full(n, 0.9995)  # sure of everything at every threshold ...
    student_right = np.zeros(n, dtype=bool)  # ... and always wrong
    teacher_right = np.ones(n, dtype=bool)
    t, bar = choose_threshold(conf, student_right, teacher_right, k_floor=0.0)
    assert t is None and bar["k_teacher"] == 1.0


def test_threshold_keeps_out_of_scope_queries_broad():
    n = 400
    conf = np.full(n, 0.95)
    right = np.ones(n, dtype=bool)
    neg_conf = np.full(n, 0.9999)  # the student is sure of every out-of-scope query
    teacher_broad = np.ones(n, dtype=bool)  # the teacher sends every one broad
    t, _ = choose_threshold(conf, right, right, 0.0, neg_conf, teacher_broad)
    assert t is None  # at every threshold the student would answer all of them narrow
    t, _ = choose_threshold(conf, right, right, 0.0, np.full(n, 0.6), teacher_broad)
    assert t == 0.7  # none of them reaches 0.7: the student may take every in-scope query
