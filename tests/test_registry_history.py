"""The registry remembers who did what: append-only promote/rollback events with actor and reason, written
in the promotion's own transaction; promoting into a namespace without traffic of the model's request shape
needs --force. Each test runs on SQLite and PostgreSQL (the store_url fixture).

The artifacts are real signed .kolm files (artifact.pack) holding a tagger's spec but no weights: the
registry verifies and reads manifests, it never loads a model.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from kolm_ray import registry
from kolm_ray.artifact import pack
from kolm_ray.cli import main
from kolm_ray.observations.model import Observation
from kolm_ray.observations.request_shape import EMPTY_SHAPE, shape_key
from kolm_ray.observations.store import open_store
from kolm_ray.registry.history import default_actor, history

NS = "support"
SPEC = {
    "output_kind": "json",
    "schema": {"type": "object", "properties": {"intent": {"enum": ["refund", "restart"]}}},
    "verifier": [{"name": "closed-vocab", "fields": {"intent": ["refund", "restart"]}}],
}
TRIAGE = {"system_prompt": "you are a triage bot.", "response_format": "", "turns": "single"}


def artifact(tmp: Path, name: str, k: float, shape: dict | None = None) -> Path:
    staging = tmp / f"staging-{name}"
    staging.mkdir(parents=True)
    (staging / "labels.json").write_text(json.dumps({"intent": ["refund", "restart"]}))
    manifest = {
        "name": name,
        "kind": "encoder-tagger",
        "spec": SPEC,
        "k_floor": 0.8,
        "metrics": {"k_score": k},
    }
    if shape is not None:
        manifest["request_shape"] = shape
    pack(staging, tmp / f"{name}.kolm", manifest)
    return tmp / f"{name}.kolm"


def traffic(namespace: str, n: int = 30, system: str | None = None) -> list[Observation]:
    """Upstream calls of one shape: a lone user turn, with `system` as the system prompt when given."""
    out = []
    for i in range(n):
        messages = [{"role": "user", "content": f"please refund order {i}"}]
        if system is not None:
            messages.insert(0, {"role": "system", "content": system})
        out.append(Observation(namespace=namespace, provider="openai", input=f"please refund order {i}",
                               output={"intent": "refund"},
                               request={"model": "m", "messages": messages}))  # fmt: skip
    return out


@pytest.fixture
def store(store_url, monkeypatch):
    monkeypatch.setenv("KOLM_SIGNING_KEY", "kolm-registry-history-tests-key")
    monkeypatch.delenv("KOLM_ACTOR", raising=False)
    s = open_store(store_url)
    yield s
    s.close()


def test_promote_rollback_promote_are_events_in_order_with_actor_and_reason(
    store, store_url, tmp_path, monkeypatch, capsys
):
    a, b = artifact(tmp_path, "intents", 0.91), artifact(tmp_path, "intents2", 0.95)
    store.append_many(traffic(NS) + traffic("billing"))
    url = store_url  # store.url has its password redacted
    monkeypatch.setenv("KOLM_ACTOR", "alice")
    assert (
        main(["models", "promote", str(a), "--namespace", NS, "--store", url, "--reason", "first model"]) == 0
    )
    assert main(["models", "promote", str(b), "--namespace", NS, "--store", url]) == 0
    monkeypatch.setenv("KOLM_ACTOR", "bob")
    assert (
        main(["models", "rollback", "--namespace", NS, "--store", url, "--reason", "v2 misroutes refunds"])
        == 0
    )
    monkeypatch.delenv("KOLM_ACTOR")
    registry.promote(store, b, NS, reason="fixed upstream")  # the Python API: actor user@host
    registry.promote(store, a, "billing", actor="carol")
    capsys.readouterr()

    assert main(["models", "history", "--namespace", NS, "--json", "--store", url]) == 0
    events = json.loads(capsys.readouterr().out)["events"]
    assert [(e["action"], e["name"], e["version"], e["actor"], e["reason"]) for e in events] == [
        ("promote", "intents", 1, "alice", "first model"),
        ("promote", "intents2", 2, "alice", None),
        ("rollback", "intents", 1, "bob", "v2 misroutes refunds"),
        ("promote", "intents2", 2, default_actor(), "fixed upstream"),
    ]
    assert set(events[0]) == {"namespace", "version", "name", "action", "actor", "reason", "at", "k_score",
                              "sha256"}  # fmt: skip
    assert [e["k_score"] for e in events] == [0.91, 0.95, 0.91, 0.95]
    assert events[1]["sha256"] == registry.live_models(store)[NS].sha256 != events[0]["sha256"]
    assert [e["at"] for e in events] == sorted(e["at"] for e in events)
    assert "@" in default_actor()

    # every namespace without --namespace, oldest first; and the readable table
    assert [(e.namespace, e.actor) for e in history(store)][-1] == ("billing", "carol")
    assert main(["models", "history", "--store", url]) == 0
    table = capsys.readouterr().out.splitlines()
    assert len(table) == 6 and table[0].split()[:4] == ["at", "namespace", "action", "model"]
    assert "rollback" in table[3] and "intents@1" in table[3] and "v2 misroutes refunds" in table[3]


def test_events_are_append_only(store, tmp_path):
    store.append_many(traffic(NS))
    registry.promote(store, artifact(tmp_path, "intents", 0.9), NS)
    for sql in ("UPDATE model_events SET actor = 'mallory'", "DELETE FROM model_events"):
        with pytest.raises(Exception, match="append-only"):
            store._write(lambda c, sql=sql: c.execute(sql))
    assert [(e.action, e.actor) for e in history(store)] == [("promote", default_actor())]


REFUSE = {  # a trigger that makes every event insert fail, as a full disk or a lost connection would
    "sqlite": ["CREATE TRIGGER no_events BEFORE INSERT ON model_events"
               " BEGIN SELECT RAISE(ABORT, 'no events today'); END"],
    "postgresql": ["CREATE FUNCTION no_events() RETURNS trigger LANGUAGE plpgsql AS $$"
                   " BEGIN RAISE EXCEPTION 'no events today'; END $$",
                   "CREATE TRIGGER no_events BEFORE INSERT ON model_events"
                   " FOR EACH ROW EXECUTE FUNCTION no_events()"],
}  # fmt: skip


def test_a_promotion_whose_event_cannot_be_written_does_not_happen(store, tmp_path, kolm_home):
    store.append_many(traffic(NS))
    a, b, c = (artifact(tmp_path, n, 0.9) for n in ("intents", "intents2", "intents3"))
    registry.promote(store, a, NS)
    registry.promote(store, b, NS)
    for sql in REFUSE[store.dialect]:
        store._write(lambda c, sql=sql: c.execute(sql))
    for attempt in (lambda: registry.promote(store, c, NS), lambda: registry.promote(store, a, NS),
                    lambda: registry.rollback(store, NS)):  # fmt: skip
        with pytest.raises(Exception, match="no events today"):
            attempt()
    # no new row, no live change, no copied file, no event: a change and its event are one transaction
    assert [(m.name, m.live) for m in registry.list_models(store, NS)] == [
        ("intents", False),
        ("intents2", True),
    ]
    assert sorted(p.name.split("-v")[0] for p in (kolm_home / "models" / NS).iterdir()) == [
        "intents",
        "intents2",
    ]
    assert [e.name for e in history(store)] == ["intents", "intents2"]


def test_promote_without_traffic_of_its_shape_needs_force(store, store_url, tmp_path, capsys):
    plain, triage = artifact(tmp_path, "plain", 0.9), artifact(tmp_path, "triage", 0.9, TRIAGE)
    url = store_url  # store.url has its password redacted
    # no observations at all
    assert main(["models", "promote", str(plain), "--namespace", NS, "--store", url]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith(
        "error: namespace 'support' has no observations of the model's"
    )
    assert "--force" in err
    # traffic, but of another shape (a system prompt the plain model never saw; plain calls for triage)
    store.append_many(traffic(NS, system="You are a travel agent."))
    assert main(["models", "promote", str(plain), "--namespace", NS, "--store", url]) == 2
    assert "no system prompt" in capsys.readouterr().err
    store.append_many(traffic("other"))
    assert main(["models", "promote", str(triage), "--namespace", "other", "--store", url]) == 2
    assert "'you are a triage bot.'" in capsys.readouterr().err
    assert registry.list_models(store) == [] and history(store) == []

    # --force promotes, and says so in the history
    assert main(["models", "promote", str(plain), "--namespace", NS, "--store", url, "--force",
                 "--reason", "warm start before the launch"]) == 0  # fmt: skip
    (event,) = history(store, NS)
    assert event.reason.startswith(
        "forced: namespace 'support' has no observations of the model's request shape"
    )
    assert event.reason.endswith("; warm start before the launch")

    # traffic of its shape (the system prompt modulo digits and spacing): no --force needed, no "forced"
    store.append_many(traffic("triage", n=5, system="You are  a triage bot."))
    assert main(["models", "promote", str(triage), "--namespace", "triage", "--store", url]) == 0
    assert history(store, "triage")[0].reason is None

    # past the first page of the newest rows too: one old plain call under more than a page of others
    plain_shape = {**EMPTY_SHAPE, "key": shape_key(EMPTY_SHAPE)}
    others = traffic("deep", n=registry.SHAPE_PAGE + 5, system="Other.")
    store.append_many(
        traffic("deep", n=1) + [o.model_copy(update={"id": f"d{i}"}) for i, o in enumerate(others)]
    )
    assert registry.shape_seen(store, "deep", plain_shape)
    store.append_many(
        [o.model_copy(update={"id": f"s{i}", "namespace": "shallow"}) for i, o in enumerate(others)]
    )
    assert not registry.shape_seen(store, "shallow", plain_shape)
