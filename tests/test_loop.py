"""kolm loop on a generated namespace: promote a better candidate, keep the live model over a weakened one,
skip a namespace with too few observations, never promote twice from two loops at once; the paired test.

The candidate builder is swapped for one that returns a prebuilt real tagger (a strong one or a deliberately
weakened one: 8 vs 2 epochs), so these run in seconds; everything after it (held-out selection, both models
answering the held-out calls, McNemar, the lease, registry.promote) is the loop's own code. The full
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
from kolm_ray.observations.model import Observation
from kolm_ray.observations.store import open_store

NS = "support"


@pytest.fixture(scope="module")
def taggers(tmp_path_factory) -> dict[str, Path]:
    mp = pytest.MonkeyPatch()
    mp.setenv("KOLM_SIGNING_KEY", SIGNING_KEY)
    try:
        d = tmp_path_factory.mktemp("taggers")
        return {
            "strong": build_tagger(d / "s", seed=0, epochs=8, name="tagger"),
            "weak": build_tagger(d / "w", seed=0, epochs=2, name="weak"),
        }
    finally:
        mp.undo()


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
        ))  # fmt: skip
    return out


@pytest.fixture
def store(store_url, monkeypatch):
    """Each loop test on each backend (SQLite; PostgreSQL, slow-marked): the lease, the queries, promote."""
    monkeypatch.setenv("KOLM_SIGNING_KEY", SIGNING_KEY)
    s = open_store(store_url)
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
    registry.promote(store, taggers["weak"], NS)
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


def test_keeps_the_live_model_over_a_weakened_candidate(store, taggers):
    registry.promote(store, taggers["strong"], NS)
    store.append_many(traffic(300))
    (line,) = loop.loop_once(store, min_new=100, build=builder(taggers["weak"]))
    assert line.startswith(f"{NS}: kept tagger@1 (candidate ") and "candidate worse" in line
    assert registry.live_models(store)[NS].version == 1
    assert len(registry.list_models(store, NS)) == 1


def test_skips_too_few_new_observations(store, taggers, store_url):
    registry.promote(store, taggers["strong"], NS)
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


def test_drift_recompiles_below_min_new_from_the_new_answers_only(store, taggers):
    live = registry.promote(store, taggers["weak"], NS)
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
    registry.promote(store, taggers["weak"], NS)
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
    right, wrong = [True] * 90 + [False] * 10, [True] * 80 + [False] * 20
    assert loop.decide(right, wrong, 0.8).promote  # better
    assert loop.decide(right, right, 0.8).promote  # equal: the newer one
    assert not loop.decide(wrong, right, 0.7).promote  # worse (b=10, c=0)
    assert not loop.decide(right, None, 0.95).promote  # below its own floor
    one_worse = [True] * 89 + [False] * 11
    v = loop.decide(one_worse, right, 0.8)
    assert not v.promote and (v.b, v.c) == (1, 0)  # the point estimate is worse: keep


def test_cli_bad_flags(capsys):
    assert main(["loop", "--once", "--min-new", "0"]) == 2
    assert capsys.readouterr().err.strip() == "error: --min-new must be at least 1, got 0"
    assert main(["loop", "--once", "--namespace", "bad name"]) == 2


@pytest.mark.slow
def test_loop_compile_end_to_end(store, taggers, capsys, store_url, request):
    """`kolm loop --once` through the real clustering, recipe and Ray Train compile, on a weak live model: on
    SQLite and on PostgreSQL (the store the contract names for a team; its Ray Data read is its own path)."""
    if store_url.startswith("postgresql"):  # no longer skipped: it fails, and says why (issue 28)
        request.applymarker(
            pytest.mark.xfail(
                strict=True,
                reason="loop.recipe_and_compile clusters store.url, which PostgresStore redacts (password ***): "
                "the candidate's Ray Data read fails 'password authentication failed'",
            )
        )
    registry.promote(store, taggers["weak"], NS)
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
