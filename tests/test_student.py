"""The static-embedding student: its training, its masking, its files, and how compile picks its threshold."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from kolm_ray.compile.student_fit import THRESHOLDS, choose_threshold, distill, teacher_targets, train_student
from kolm_ray.inference.student import Student

WORDS = ["pay", "bill", "card", "fly", "hotel", "trip", "cook", "recipe", "oven", "the", "my", "a", "please"]
GROUPS = [["pay", "bill", "card"], ["fly", "hotel", "trip"], ["cook", "recipe", "oven"]]
LABELS = ["bank", "travel", "food"]


STUDENT_FILES = [  # safetensors and JSON only
    "config.json",
    "head.safetensors",
    "model.safetensors",
    "modules.json",
    "student.json",
    "tokenizer.json",
]


def _static(dims: int = 16):
    """A real model2vec StaticModel over a word-level vocabulary with random vectors (no distillation)."""
    from model2vec import StaticModel
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {"[UNK]": 0, **{w: i + 1 for i, w in enumerate(WORDS)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    vectors = np.random.default_rng(0).normal(size=(len(vocab), dims)).astype(np.float32)
    return StaticModel(vectors, tok, normalize=True)


def _queries(n: int, seed: int) -> tuple[list[str], list[int]]:
    """Two words of the label's group among three filler words, shuffled."""
    rng = np.random.default_rng(seed)
    texts, labels = [], []
    for _ in range(n):
        y = int(rng.integers(3))
        words = [*rng.choice(GROUPS[y], 2), *rng.choice(["the", "my", "a", "please"], 3)]
        rng.shuffle(words)
        texts.append(" ".join(words))
        labels.append(y)
    return texts, labels


@pytest.fixture(scope="module")
def trained() -> Student:
    """train_student on 300 labelled queries (a fifth of them unlabelled: soft labels alone)."""
    texts, y = _queries(300, seed=1)
    hard = torch.tensor(y)
    soft = torch.nn.functional.one_hot(hard, 3).double() * 0.9 + 0.1 / 3
    hard[::5] = -1
    static, hidden, (w, b) = train_student(_static(), texts, hard, soft, hidden=32)
    return Student(static, w, b, "namespace", LABELS, 1.0, 0.9, hidden=hidden)


def test_trained_student_answers_held_out_queries_right(trained):
    texts, y = _queries(200, seed=2)
    best, conf = trained.answer(texts)
    assert (best == np.array(y)).mean() >= 0.97
    assert trained.sure("please book a hotel for my trip", LABELS)["namespace"] == "travel"
    # no word it knows: the mean of nothing is the zero vector, an answer it must not be sure of
    _, unknown = trained.answer(["zzz qqq"])
    assert unknown[0] < 0.9 and trained.sure("zzz qqq", LABELS) is None


def test_training_forward_is_the_served_forward(trained):
    """The torch module compile trains (EmbeddingBag mean -> normalise -> MLP) and the numpy path Student
    serves (model2vec encode -> MLP) give the same logits for the trained table."""
    from kolm_ray.compile.student_fit import _bags, _Net, token_ids

    texts, _ = _queries(20, seed=3)
    texts.append("zzz")  # no known token
    net = _Net(trained.static.embedding, True, trained.hidden[0].shape[0], 3)
    with torch.no_grad():
        net.hidden.weight.copy_(torch.from_numpy(trained.hidden[0]))
        net.hidden.bias.copy_(torch.from_numpy(trained.hidden[1]))
        net.out.weight.copy_(torch.from_numpy(trained.weight))
        net.out.bias.copy_(torch.from_numpy(trained.bias))
        want = net(*_bags(token_ids(trained.static, texts))).numpy()
    np.testing.assert_allclose(trained.logits(texts), want, rtol=1e-4, atol=1e-5)


def test_trained_student_round_trips_through_its_files(trained, tmp_path):
    trained.save(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == STUDENT_FILES
    back = Student.load(tmp_path)
    texts, _ = _queries(50, seed=4)
    assert (back.labels, back.threshold, back.hidden[0].shape) == (LABELS, 0.9, (32, 16))
    np.testing.assert_allclose(back.logits(texts), trained.logits(texts), rtol=1e-5, atol=1e-5)
    assert [back.sure(q, ["travel", "food"]) for q in texts] == [
        trained.sure(q, ["travel", "food"]) for q in texts
    ]


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
    from kolm_ray.models.bases import resolve_base

    base = resolve_base("tiny-encoder")
    static = distill(base.load_model(), base.load_tokenizer())
    rng = np.random.default_rng(1)
    dims = static.embedding.shape[1]
    s = Student(static, rng.normal(size=(4, dims)), rng.normal(size=4), "namespace", list("abcd"), 0.7, 0.85)
    s.save(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == STUDENT_FILES
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


class _Scores:
    """A teacher's calibrated parts as fit_student reads them (logits and class distances per input)."""

    temperature = {"namespace": 1.0}
    outlier = {"namespace": {"weight": 4.0, "offset": 2.0}}

    def calibration_scores(self, inputs):
        logits = torch.tensor([[4.0, 0.0, 0.0]] * len(inputs))
        near = {"in scope": 1.0, "far away": 9.0}
        dists = torch.tensor([[near[q], near[q] + 2, near[q] + 2] for q in inputs])
        return {"namespace": logits}, {"namespace": dists}


def test_teacher_targets_spread_the_none_of_these_mass_over_the_labels():
    from kolm_ray.models.modeling import outlier_probs

    t = teacher_targets(_Scores(), "namespace", ["in scope", "far away"])
    assert torch.allclose(t.sum(dim=1), torch.ones(2, dtype=t.dtype))
    lg, ds = _Scores().calibration_scores(["in scope", "far away"])
    p = outlier_probs(lg["namespace"].double(), 1.0, ds["namespace"].double(), _Scores.outlier["namespace"])
    # near its class the teacher's answer stands; far from every class it is nearly uniform
    assert torch.allclose(t[0], p[0] + (1 - p[0].sum()) / 3) and t[0].argmax() == 0 and t[0, 0] > 0.9
    assert float(t[1].max() - t[1].min()) < 0.01
    without = _Scores()
    without.outlier = {}
    assert torch.allclose(
        teacher_targets(without, "namespace", ["far away"])[0],
        torch.softmax(torch.tensor([4.0, 0, 0]), 0).double(),
    )
