"""kolm loop on a generated namespace: promote a better candidate, keep the live model over a weakened one,
skip a namespace with too few observations, never promote twice from two loops at once; the paired test.

The candidate builder is swapped for one that returns a prebuilt real tagger (a strong one, a weakened one:
8 vs 2 epochs, or the strong one relabelled to be wrong on a quarter of the rows), so these run in seconds;
everything after it (held-out selection, both models answering the held-out calls, McNemar, the lease, registry.promote) is the loop's own code. The full
recipe -> compile path runs in test_loop_compile_end_to_end (slow: Ray Data + Ray Train).
"""

from __future__ import annotations

import json
import shutil
import threading
from datetime import datetime, timezone
from pathlib import Path

import pytest
from local_helpers import SIGNING_KEY, build_tagger, truth
from recall_artifact import pairs

from kolm_ray import registry
from kolm_ray.cli import main
from kolm_ray.loop import loop
from kolm_ray.observations.keys import create_key
from kolm_ray.observations.model import Observation
from kolm_ray.observations.store import open_store

NS = "support"
TRAIN_KEY: dict[str, str] = {}  # the capture key this test's traffic came with (one whose rows may train)


@pytest.fixture(scope="module")
def taggers(tmp_path_factory) -> dict[str, Path]:
    mp = pytest.MonkeyPatch()
    mp.setenv("KOLM_SIGNING_KEY", SIGNING_KEY)
    try:
        d = tmp_path_factory.mktemp("taggers")
        strong = build_tagger(d / "s", seed=0, epochs=8, name="tagger")
        return {
            "strong": strong,
            "weak": build_tagger(d / "w", seed=0, epochs=2, name="weak"),
            "worse": relabelled(strong, d / "x", "music", "songs", name="worse"),
        }
    finally:
        mp.undo()


def relabelled(artifact: Path, tmp: Path, old: str, new: str, name: str) -> Path:
    """A copy of a tagger that answers `new` wherever it would answer `old` (re-signed): wrong on every `old`
    row, right elsewhere, so it passes a low floor but is clearly worse than the original."""
    from kolm_ray.artifact import pack, verify
    from kolm_ray.inference.predictors import TAGGER_FILE

    files = tmp / "files"
    files.mkdir(parents=True)
    manifest = verify(artifact, extract_to=files)
    meta = json.loads((files / TAGGER_FILE).read_text())
    meta["labels"] = {f: [new if lb == old else lb for lb in values] for f, values in meta["labels"].items()}
    (files / TAGGER_FILE).write_text(json.dumps(meta))
    student = files / "student" / "student.json"  # the cascade's first stage answers too: the same labels
    if student.is_file():
        sm = json.loads(student.read_text())
        sm["labels"] = [new if lb == old else lb for lb in sm["labels"]]
        student.write_text(json.dumps(sm))
    keep = {k: v for k, v in manifest.items() if k not in ("files", "sizes", "created_at", "signature_alg",
                                                           "key_id", "format")}  # fmt: skip
    out = tmp / f"{name}.kolm"
    pack(files, out, keep | {"name": name})
    return out


def traffic(n: int, seed: int = 3) -> list[Observation]:
    """n upstream calls of the namespace's one task (no system prompt, one user turn), now."""
    rows = pairs(seed)
    out = []
    for i in range(n):
        q = rows[i % len(rows)]["input"]
        out.append(Observation(
            namespace=NS, provider="openai", model="gpt-4o-mini-2024-07-18", input=q,
            output={"namespace": truth(q)}, status=200, created_at=datetime.now(timezone.utc),
            usage={"prompt_tokens": 40, "completion_tokens": 6},
            request={"model": "gpt-4o-mini", "messages": [{"role": "user", "content": q}]},
            key_id=TRAIN_KEY.get("id"),
        ))  # fmt: skip
    return out


@pytest.fixture
def store(store_url, monkeypatch):
    """Each loop test on each backend (SQLite; PostgreSQL, slow-marked): the lease, the queries, promote."""
    monkeypatch.setenv("KOLM_SIGNING_KEY", SIGNING_KEY)
    s = open_store(store_url)
    TRAIN_KEY["id"] = create_key(s, "acme", [NS])[0].id
    yield s
    s.close()


def builder(artifact: Path, calls: list | None = None):
    """A candidate builder returning a copy of a prebuilt artifact (what recipe_and_compile returns)."""

    def build(store, namespace, exclude, workdir, name, live):
        if calls is not None:
            calls.append(set(exclude))
        out = workdir / f"{artifact.stem}.kolm"
        shutil.copyfile(artifact, out)
        return out

    return build


def test_promotes_a_better_candidate(store, taggers, capsys):
    registry.promote(store, taggers["weak"], NS, force=True)
    store.append_many(traffic(300))
    seen: list = []
    lines = loop.loop_once(store, min_new=100, build=builder(taggers["strong"], seen))
    assert lines == [f"{NS}: promoted tagger@2 (k=" + lines[0].split("(k=")[1]]
    live = registry.live_models(store)[NS]
    assert (live.name, live.version) == ("tagger", 2)
    # the held-out calls are the newest upstream ones, and the candidate's recipe excludes them
    newest = [o.id for batch in store.iter_observations(NS) for o in batch][-75:]  # a quarter of 300
    assert seen == [set(newest)]
    err = capsys.readouterr().err
    assert "McNemar p=" in err and "on 75 held-out rows" in err
    # the registry's history: the loop as the actor, its decision line as the reason
    last = registry.history.history(store, NS)[-1]
    assert (last.action, last.version, last.actor) == ("promote", 2, "kolm loop")
    assert f"{NS}: {last.reason}" in err.splitlines() and "McNemar p=" in last.reason


def test_keeps_the_live_model_over_a_weakened_candidate(store, taggers):
    registry.promote(store, taggers["strong"], NS, force=True)
    store.append_many(traffic(300))
    (line,) = loop.loop_once(store, min_new=100, build=builder(taggers["worse"]))
    assert line.startswith(f"{NS}: kept tagger@1 (candidate ") and "candidate worse" in line
    assert registry.live_models(store)[NS].version == 1
    assert len(registry.list_models(store, NS)) == 1


def test_skips_too_few_new_observations(store, taggers, store_url):
    registry.promote(store, taggers["strong"], NS, force=True)
    store.append_many(traffic(30))
    calls: list = []
    assert main(["loop", "--once", "--min-new", "50", "--store", store_url]) == 0
    assert loop.loop_once(store, min_new=50, build=builder(taggers["weak"], calls)) == [
        f"{NS}: skipped (30 new usable observations, fewer than 50)"
    ]
    assert calls == []  # nothing compiled
    # a verified-false call is not usable; a local answer is not an observation to learn from
    bad = traffic(1)[0].model_copy(update={"verified": False})
    store.append_many([bad])
    assert loop.new_usable(store, NS, registry.live_models(store)[NS].created_at) == 30
    # an open proxy's and a --no-train key's calls are not usable either, unless --include-untrusted
    no_train = create_key(store, "acme", [NS], train=False)[0].id
    store.append_many([o.model_copy(update={"key_id": k}) for k in (None, no_train) for o in traffic(40)])
    after = registry.live_models(store)[NS].created_at
    assert loop.new_usable(store, NS, after) == 30 and loop.new_usable(store, NS, after, True) == 110
    assert len(loop.holdout_rows(store, NS, after, 500)) == 30


def test_drift_recompiles_below_min_new_from_the_new_answers_only(store, taggers):
    live = registry.promote(store, taggers["weak"], NS, force=True)
    old = [
        o.model_copy(update={"created_at": datetime(2020, 1, 1, tzinfo=timezone.utc)})
        for o in traffic(50, seed=9)
    ]
    store.append_many(old + traffic(120))
    for i in range(30):  # the upstream now disagrees with the live model
        registry.record_shadow(store, f"pair-{i}", None, NS, live.version, i < 3, {})
    seen: list = []
    (line,) = loop.loop_once(store, min_new=500, build=builder(taggers["strong"], seen))
    assert line.startswith(f"{NS}: promoted tagger@2 (k="), line  # 120 < 500 new, but drifting
    assert {o.id for o in old} <= seen[0]  # answers from before the live model's compile left out
    assert len(seen[0]) == 50 + 30  # and the held-out calls: the newest quarter of the 120


def test_two_loops_at_once_promote_at_most_once(tmp_path, store, taggers, store_url):
    registry.promote(store, taggers["weak"], NS, force=True)
    store.append_many(traffic(300))
    barrier, lines = threading.Barrier(2), []

    def run(owner: str) -> None:
        s = open_store(store_url)  # its own connections, like a second process
        try:
            barrier.wait()
            lines.extend(loop.loop_once(s, min_new=100, build=builder(taggers["strong"]), owner=owner))
        finally:
            s.close()

    threads = [threading.Thread(target=run, args=(f"loop-{i}",)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    promoted = [ln for ln in lines if ": promoted " in ln]
    assert len(lines) == 2 and len(promoted) == 1, lines
    other = next(ln for ln in lines if ln not in promoted)
    assert "another kolm loop" in other and "holds its lease" in other
    assert [m.version for m in registry.list_models(store, NS)] == [1, 2]
    # the lease is released after the pass: a later loop is not blocked
    assert loop.acquire(store, NS, "later") is None


def test_an_expired_lease_is_taken_over(store):
    assert loop.acquire(store, NS, "a", seconds=-1) is None  # already expired
    assert loop.acquire(store, NS, "b") is None
    assert "another kolm loop (b)" in loop.acquire(store, NS, "a")


def test_mcnemar_and_the_rule():
    assert loop.mcnemar_worse_p(5, 0) == 1 / 32
    assert loop.mcnemar_worse_p(0, 0) == 1.0
    assert loop.mcnemar_worse_p(3, 3) == pytest.approx(42 / 64)
    assert loop.mcnemar_worse_p(3, 1) == pytest.approx(5 / 16)
    right, wrong = [True] * 90 + [False] * 10, [True] * 80 + [False] * 20
    assert loop.decide(right, wrong, 0.8).promote  # better
    assert loop.decide(right, right, 0.8).promote  # equal: the newer one
    v = loop.decide(wrong, right, 0.7)
    assert not v.promote and (v.b, v.c) == (10, 0) and "candidate worse" in v.reason  # p = 1/1024
    assert not loop.decide(right, None, 0.95).promote  # below its own floor


def test_the_test_decides_a_worse_point_estimate_that_chance_explains():
    """b=3, c=1: the point estimate says the candidate is worse, McNemar (p = 5/16) says chance can explain
    it; the test decides, so the candidate (which saw the newer traffic) is promoted. The former rule
    (keep when b > c) kept the live model here, whatever the test said."""
    live = [True] * 90 + [True, True, True, False] + [False] * 6
    cand = [True] * 90 + [False, False, False, True] + [False] * 6
    v = loop.decide(cand, live, 0.8)
    assert (v.b, v.c) == (3, 1) and v.p == pytest.approx(5 / 16)
    assert v.promote, v.reason
    # ... and the same test keeps the live model once the difference is past chance: b=8, c=1, p = 10/512
    live = [True] * 80 + [True] * 8 + [False] + [False] * 11
    cand = [True] * 80 + [False] * 8 + [True] + [False] * 11
    v = loop.decide(cand, live, 0.7)
    assert (v.b, v.c) == (8, 1) and v.p < loop.ALPHA and not v.promote


def test_the_selective_gate_decides_on_what_the_model_would_answer():
    """Whole-set accuracy 0.85 under a k_floor of 0.95, but the confident 60% are all right: the candidate
    answers those locally and sends the rest upstream, so it passes; answering too few rows does not."""
    right = [True] * 60 + [True] * 25 + [False] * 15
    conf = [0.99] * 60 + [0.5] * 40
    v = loop.decide(right, None, 0.95, conf, threshold=0.9)
    assert v.promote and v.selective["coverage"] == 0.6 and v.selective["answered_accuracy"] == 1.0
    assert not loop.decide(right, None, 0.95).promote  # every row answered: 0.85 < 0.95
    few = [0.99] * 10 + [0.5] * 90
    v = loop.decide(right, None, 0.95, few, threshold=0.9)
    assert not v.promote and "coverage below the floor 0.20" in v.reason


def test_cli_bad_flags(capsys):
    assert main(["loop", "--once", "--min-new", "0"]) == 2
    assert capsys.readouterr().err.strip() == "error: --min-new must be at least 1, got 0"
    assert main(["loop", "--once", "--namespace", "bad name"]) == 2


@pytest.mark.slow
@pytest.mark.parametrize("store_url", ["postgresql"], indirect=True)
def test_loop_compile_end_to_end(store, taggers, capsys, store_url):
    """`kolm loop --once` through the real clustering, recipe and Ray Train compile, on a weak live model, on
    PostgreSQL (the store the contract names for a team; its Ray Data read is its own path). SQLite's pass
    runs in tests/test_session.py, the README's session after the demo."""
    registry.promote(store, taggers["weak"], NS, force=True)
    store.append_many(traffic(700, seed=5))
    assert main(["loop", "--once", "--min-new", "300", "--store", store_url]) == 0
    out = capsys.readouterr().out.strip().splitlines()
    assert len(out) == 1 and out[0].startswith(f"{NS}: promoted weak@2 (k="), out
    live = registry.live_models(store)[NS]
    manifest = json.loads(json.dumps(live.public()))
    assert live.version == 2 and manifest["k_score"] >= manifest["k_floor"]


def test_one_namespace_failing_does_not_end_the_pass(store, taggers):
    store.append_many(traffic(120))
    other = [o.model_copy(update={"namespace": "billing", "id": "b" + o.id}) for o in traffic(120)]
    store.append_many(other)

    def build(store, namespace, exclude, workdir, name, live):
        if namespace == "billing":
            raise RuntimeError("the Ray cluster went away")
        return builder(taggers["strong"])(store, namespace, exclude, workdir, name, live)

    lines = loop.loop_once(store, min_new=100, build=build)
    assert lines[0] == "billing: skipped (error: RuntimeError: the Ray cluster went away)"
    assert lines[1].startswith(f"{NS}: promoted tagger@1 (k=")
    assert loop.acquire(store, "billing", "later") is None  # its lease was released
