"""One app, one system prompt, the instruction in the user turn: clustering tells its tasks apart by what
they answer and how they are asked (kolm_ray/clustering/fit.py template_tasks), and never splits one task
whose rows merely open alike. The real traffic (CLINC150 + SNIPS, benchmarks/recipe_traffic.py) through the
Ray Data pipeline is the slow test."""

from __future__ import annotations

import random
import sys
from pathlib import Path

import numpy as np
import pytest

from kolm_ray.clustering import fit_clusters
from kolm_ray.clustering.featurize import template_prefixes, vocab_label

REPO = Path(__file__).resolve().parent.parent
WORDS = (
    "balance transfer card lost refund flight hotel visa rain snow play song book table rate novel".split()
)


def _rows(task: str, instructions: list[str], labels: list[str], n: int, rng: random.Random) -> list[dict]:
    out = []
    for i in range(n):
        text = " ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 8)))
        prompt = f"{rng.choice(instructions)}\n\n{text}"
        out.append({"task": task, "input": prompt, "output": {"label": labels[i % len(labels)]}})
    return out


def _columns(rows: list[dict], rng: np.random.Generator, fp: str = "f"):
    emb = rng.normal(size=(len(rows), 16)).astype(np.float32)  # inputs alone say nothing here
    emb /= np.linalg.norm(emb, axis=1, keepdims=True)
    labels = np.array([vocab_label(r["output"], r["input"]) for r in rows])
    prefixes = np.array([template_prefixes(r["input"]) for r in rows])
    return emb, np.array([fp] * len(rows)), labels, prefixes


def test_two_classifiers_behind_one_prompt_are_two_clusters_and_errors_follow_their_instruction():
    rng = random.Random(0)
    banking = _rows("banking", ["Which banking intent is this?", "Classify this banking request."],
                    ["balance", "transfer", "card_lost", "refund", "pin"], 300, rng)  # fmt: skip
    travel = _rows("travel", ["Which travel intent is this?", "Travel desk: tag the message."],
                   ["book_flight", "book_hotel", "visa", "lost_luggage"], 200, rng)  # fmt: skip
    rows = banking + travel
    random.Random(1).shuffle(rows)
    emb, fps, labels, prefixes = _columns(rows, np.random.default_rng(0))
    rfps = np.array(["r"] * len(rows))
    model = fit_clusters(emb, fps, labels, rfps=rfps, prefixes=prefixes)
    assert model.tasks == {"f": 2} and len(model.ids) == 2
    got = model.assign(emb, fps, rfps, labels, prefixes)
    for task in ("banking", "travel"):
        assert len({c for c, r in zip(got, rows, strict=True) if r["task"] == task}) == 1
    assert got[[r["task"] == "banking" for r in rows]][0] != got[[r["task"] == "travel" for r in rows]][0]
    # an upstream error (another output shape, no label): its instruction says which task it was
    err_in = "Which travel intent is this?\n\nlost my bag in rome"
    err = model.assign(emb[:1], np.array(["error-shape"]), rfps[:1], np.array([""]),
                       np.array([template_prefixes(err_in)]))  # fmt: skip
    assert err[0] == got[[r["task"] == "travel" for r in rows]][0]
    # an unseen label with a known instruction, likewise
    new = model.assign(emb[:1], fps[:1], rfps[:1], np.array(["never-seen"]),
                       np.array([template_prefixes("Classify this banking request.\n\nmy pin is blocked")]))  # fmt: skip
    assert new[0] == got[[r["task"] == "banking" for r in rows]][0]


def test_one_task_whose_labels_each_open_their_own_way_is_not_split():
    """Each label's rows start with their own frequent words ("translate ...", "play ..."): every label is
    its own island of templates, none a task of two labels or more, so the fingerprint stays one cluster."""
    rng = random.Random(2)
    rows = []
    for lab, opening in [("translate", "translate this into"), ("play", "play me some"), ("weather", "what is the weather"),
                         ("alarm", "set an alarm for"), ("timer", "start a timer of"), ("book", "book a table at")]:  # fmt: skip
        rows += _rows("one", [opening], [lab], 80, rng)
    emb, fps, labels, prefixes = _columns(rows, np.random.default_rng(1))
    model = fit_clusters(emb, fps, labels, prefixes=prefixes)
    assert model.tasks == {} and len(model.ids) == 1


def test_two_instructions_answered_from_one_vocabulary_are_one_task():
    rng = random.Random(3)
    labels6 = ["a1", "a2", "a3", "a4", "a5", "a6"]
    rows = _rows("x", ["Sentiment of this review?"], labels6, 200, rng)
    rows += _rows("x", ["Rate the tone of this tweet."], labels6, 200, rng)
    emb, fps, labels, prefixes = _columns(rows, np.random.default_rng(2))
    assert fit_clusters(emb, fps, labels, prefixes=prefixes).tasks == {}


def test_template_prefixes_normalise_and_leave_a_word_after():
    a = template_prefixes("Which  banking intent is this? 12\nmy card")
    b = template_prefixes("which banking intent is this? 7 my card")
    assert a == b and len(a.split(",")) == 7  # 8 words: prefixes of 1..7
    assert template_prefixes("one") == "" and template_prefixes("") == ""
    assert template_prefixes("\ud800 lone surrogate") != ""  # hostile text hashes, never raises


@pytest.mark.slow
def test_shared_prompt_traffic_through_the_ray_pipeline_clusters_by_task(tmp_path):
    """CLINC150 and SNIPS tasks behind one system prompt and response_format (benchmarks/recipe_traffic.py,
    150 calls per task): the Ray Data pipeline with the default static vectors finds each task."""
    import ray
    from sklearn.metrics import adjusted_rand_score

    sys.path.insert(0, str(REPO / "benchmarks"))
    from recipe_traffic import DATA, SNIPS, build_shared_prompt_traffic

    from kolm_ray.clustering import cluster_members, cluster_namespace
    from kolm_ray.observations.model import Observation

    if not (DATA / "data_full.json").exists() or not SNIPS.exists():
        pytest.fail(f"the shared datasets are missing: {DATA}, {SNIPS}")
    observations, truth = build_shared_prompt_traffic(150)
    rows = [Observation(**o) for o in observations]
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        result = cluster_namespace(rows, summarize=False)
        ids, pred = [], []
        for c in result.clusters:
            members, _ = cluster_members(result, c["id"])
            ids += [m["id"] for m in members]
            pred += [c["id"]] * len(members)
    finally:
        ray.shutdown()
    assert sorted(ids) == sorted(o["id"] for o in observations)  # every row, errors included, in one cluster
    assert adjusted_rand_score([truth[i][0] for i in ids], pred) >= 0.95
    assert len(result.clusters) == 6 and list(result.model.tasks.values()) == [4]
