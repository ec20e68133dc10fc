"""The recall router's logic without Serve: tenants, 401/422, budget, fallback, tenant safety (property)."""

from __future__ import annotations

import asyncio
import hashlib
import json
import os

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kolm_ray.errors import KolmError
from kolm_ray.inference.fastpath import masked_softmax
from kolm_ray.serve.router import (
    MAX_BODY_BYTES,
    MAX_QUERY_CHARS,
    Router,
    TaggerHealth,
    Tenants,
    TenantsFile,
    load_tenants,
    parse_query,
)


def sha(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def tenants(**spec: list[str]) -> Tenants:
    return Tenants(
        TenantsFile.model_validate(
            {"tenants": {n: {"key_sha256": sha(f"key-{n}"), "namespaces": ns} for n, ns in spec.items()}}
        )
    )


def route(router: Router, auth: str | None, body, tag) -> tuple[int, dict]:
    raw = body if isinstance(body, bytes) else json.dumps(body).encode()
    return asyncio.run(router.route(auth, raw, tag))


def confident(namespace: str | None = None, confidence: float = 0.95):
    async def tag(query: str, namespaces: list[str]) -> dict:
        return {"namespace": namespace or namespaces[0], "confidence": confidence}

    return tag


# --- tenants -----------------------------------------------------------------------------------------------


def test_demo_tenants_file_loads_and_demo_keys_authenticate():
    t = load_tenants("configs/tenants.yaml")
    acme = t.authenticate("Bearer demo-acme-key")
    assert acme is not None and acme.name == "acme" and acme.namespaces == ("runbooks", "incidents")
    assert t.authenticate("bearer demo-globex-key").name == "globex"  # the scheme is case-insensitive
    assert t.authenticate("Bearer demo-acme-key-x") is None
    assert t.authenticate("Basic demo-acme-key") is None
    assert t.authenticate("Bearer ") is None
    assert t.authenticate(None) is None


@pytest.mark.parametrize(
    "text, problem",
    [
        ("tenants: {a: {key_sha256: nothex, namespaces: [x]}}", "64 lowercase hex"),
        (f"tenants: {{a: {{key_sha256: '{'a' * 64}', namespaces: []}}}}", "namespaces"),
        (f"tenants: {{a: {{key_sha256: '{'a' * 64}', namespaces: [x, x]}}}}", "must not repeat"),
        (f"tenants: {{a: {{key_sha256: '{'a' * 64}', namespaces: [x], extra: 1}}}}", "extra"),
        ("tenants: {}", "tenants"),
        ("- just a list", "tenants"),
        ("tenants: {a: [unclosed", "not YAML"),
    ],
)
def test_bad_tenants_files_are_refused_with_the_reason(tmp_path, text, problem):
    path = tmp_path / "tenants.yaml"
    path.write_text(text)
    with pytest.raises(KolmError, match=problem):
        load_tenants(path)


def test_two_tenants_with_one_key_are_refused(tmp_path):
    path = tmp_path / "tenants.yaml"
    path.write_text(
        f"tenants: {{a: {{key_sha256: '{'a' * 64}', namespaces: [x]}}, b: {{key_sha256: '{'a' * 64}', namespaces: [y]}}}}"
    )
    with pytest.raises(KolmError, match="share a key_sha256"):
        load_tenants(path)


@pytest.mark.parametrize(
    "text, problem",
    [
        (  # two tenants named alike: PyYAML alone would keep the second and drop acme's first key
            f"tenants:\n  acme: {{key_sha256: '{'a' * 64}', namespaces: [x]}}\n"
            f"  acme: {{key_sha256: '{'b' * 64}', namespaces: [y]}}\n",
            "duplicate key 'acme' at line 3",
        ),
        (
            f"tenants:\n  acme:\n    key_sha256: '{'a' * 64}'\n    namespaces: [x]\n    namespaces: [x, y]\n",
            "duplicate key 'namespaces' at line 5",
        ),
        ("tenants: {}\ntenants: {}\n", "duplicate key 'tenants' at line 2"),
    ],
)
def test_duplicate_keys_in_the_tenants_file_are_refused(tmp_path, text, problem):
    path = tmp_path / "tenants.yaml"
    path.write_text(text)
    with pytest.raises(KolmError, match=problem):
        load_tenants(path)


def test_yaml_merge_keys_still_work(tmp_path):
    path = tmp_path / "tenants.yaml"
    path.write_text(f"base: &b {{namespaces: [x, y]}}\ntenants:\n  a: {{<<: *b, key_sha256: '{'a' * 64}'}}\n")
    with pytest.raises(KolmError, match="base"):  # the anchor's home is an unknown top-level key...
        load_tenants(path)
    from kolm_ray.serve.router import load_yaml

    assert load_yaml(path.read_text())["tenants"]["a"]["namespaces"] == ["x", "y"]  # ...but it merges


# --- edge: 401 and 422 -------------------------------------------------------------------------------------


@pytest.mark.parametrize("auth", [None, "", "Bearer nope", "Token key-acme", "key-acme", "Bearer"])
def test_missing_or_unknown_key_is_401(auth):
    status, body = route(Router(tenants(acme=["a", "b"])), auth, {"query": "hi"}, confident())
    assert status == 401 and "error" in body


@pytest.mark.parametrize(
    "body, reason",
    [
        (b"", "missing body"),
        (b"   ", "missing body"),
        (b"{not json", "not JSON"),
        (b"\xff\xfe", "not JSON"),
        (b"[1, 2]", "JSON object"),
        (b'"query"', "JSON object"),
        ({}, "missing field 'query'"),
        ({"q": "x"}, "missing field 'query'"),
        ({"query": None}, "must be a string"),
        ({"query": 42}, "must be a string"),
        ({"query": ["a"]}, "must be a string"),
        ({"query": ""}, "empty"),
        ({"query": " \n\t"}, "empty"),
        ({"query": "x" * (MAX_QUERY_CHARS + 1)}, "longer than"),
        (b"x" * (MAX_BODY_BYTES + 1), "larger than"),
        (b'{"query": ' + b"[" * 5000 + b"]" * 5000 + b"}", "nested too deeply"),
        (b"[" * 8000, "not JSON"),  # unclosed: the parser's own error, or the depth one
    ],
)
def test_bad_bodies_are_422_with_a_reason(body, reason):
    status, out = route(Router(tenants(acme=["a", "b"])), "Bearer key-acme", body, confident())
    assert status == 422
    assert reason in out["error"]


def test_parse_query_accepts_a_query_at_the_limit():
    q = "é" * MAX_QUERY_CHARS  # 2 bytes each in UTF-8: still within the body limit
    assert parse_query(json.dumps({"query": q}, ensure_ascii=False).encode()) == q


# --- decisions ---------------------------------------------------------------------------------------------


def test_confident_answer_is_narrow_and_low_confidence_is_broad():
    r = Router(tenants(acme=["runbooks", "incidents"]), threshold=0.7)
    status, out = route(r, "Bearer key-acme", {"query": "restart"}, confident("incidents", 0.94))
    assert status == 200 and out == {
        "mode": "narrow",
        "namespace": "incidents",
        "confidence": 0.94,
        "fallback": "narrow",
    }
    status, out = route(r, "Bearer key-acme", {"query": "restart"}, confident("incidents", 0.41))
    assert out == {
        "mode": "broad",
        "namespaces": ["runbooks", "incidents"],
        "confidence": 0.41,
        "fallback": "broad",
    }
    # exactly at the threshold stays narrow: "below the threshold" routes broad
    assert route(r, "Bearer key-acme", {"query": "x"}, confident("runbooks", 0.7))[1]["mode"] == "narrow"


@pytest.mark.parametrize(
    "confidence, reason",
    [
        (
            float("nan"),
            "tagger returned an invalid confidence",
        ),  # NaN < threshold is False: unchecked, this went narrow
        (float("inf"), "tagger returned an invalid confidence"),
        (float("-inf"), "tagger returned an invalid confidence"),
        (1.5, "tagger returned an invalid confidence"),
        (-0.1, "tagger returned an invalid confidence"),
        (None, "tagger returned no numeric confidence"),
        ("0.99", "tagger returned no numeric confidence"),
        (True, "tagger returned no numeric confidence"),
    ],
)
def test_invalid_tagger_confidence_routes_broad_with_a_reason(confidence, reason):
    r = Router(tenants(acme=["runbooks", "incidents"]), threshold=0.7)
    status, out = route(r, "Bearer key-acme", {"query": "restart"}, confident("incidents", confidence))
    assert status == 200 and out == {
        "mode": "broad",
        "namespaces": ["runbooks", "incidents"],
        "confidence": 0.0,
        "fallback": "broad",
        "reason": reason,
    }
    json.dumps(out, allow_nan=False)  # the answer is valid JSON


def test_numpy_confidence_is_a_number():
    r = Router(tenants(acme=["runbooks", "incidents"]), threshold=0.7)
    out = route(r, "Bearer key-acme", {"query": "x"}, confident("incidents", np.float32(0.9)))[1]
    assert out["mode"] == "narrow" and out["confidence"] == 0.9


@settings(max_examples=200, deadline=None)
@given(
    body=st.binary(max_size=64)
    | st.text(alphabet='[]{}":,0123456789.eE-+ aqueryNIfinty', max_size=200).map(str.encode)
)
def test_property_any_body_is_an_answer_or_a_422(body):
    status, out = route(Router(tenants(acme=["a", "b"])), "Bearer key-acme", body, confident("a", 0.9))
    assert (status, sorted(out)) in [(422, ["error"]), (200, ["confidence", "fallback", "mode", "namespace"])]


def test_slow_tagger_exceeds_budget_and_routes_broad_with_reason():
    finished = []

    async def slow(query, namespaces):
        await asyncio.sleep(1.0)
        finished.append(query)
        return {"namespace": namespaces[0], "confidence": 0.99}

    r = Router(tenants(acme=["a", "b"]), budget_ms=50)
    loop = asyncio.new_event_loop()
    try:
        status, out = loop.run_until_complete(r.route("Bearer key-acme", b'{"query": "q"}', slow))
    finally:
        loop.close()
    assert status == 200 and out["mode"] == "broad" and out["namespaces"] == ["a", "b"]
    assert "budget" in out["reason"] and out["fallback"] == "broad"
    assert finished == []  # the budget cut it off: the answer came before the tagger's


@pytest.mark.parametrize("exc", [RuntimeError("replica died"), ConnectionError("gone"), KeyError("x")])
def test_failing_tagger_routes_broad_with_reason_never_an_error(exc):
    async def broken(query, namespaces):
        raise exc

    status, out = route(Router(tenants(acme=["a", "b"])), "Bearer key-acme", {"query": "q"}, broken)
    assert status == 200 and out["mode"] == "broad" and "unavailable" in out["reason"]


def test_answer_outside_the_tenant_is_never_returned():
    """Defence in depth: a (broken) tagger naming another tenant's namespace becomes broad."""
    r = Router(tenants(acme=["a", "b"], globex=["secret"]))
    status, out = route(r, "Bearer key-acme", {"query": "q"}, confident("secret", 0.99))
    assert status == 200 and out["mode"] == "broad" and out["namespaces"] == ["a", "b"]
    assert "tenant-authorized" in out["reason"] and "secret" not in json.dumps(out)


def test_no_namespace_known_to_the_tagger_routes_broad():
    async def knows_none(query, namespaces):
        return {"namespace": None, "confidence": 0.0}

    status, out = route(Router(tenants(acme=["a"])), "Bearer key-acme", {"query": "q"}, knows_none)
    assert status == 200 and out["mode"] == "broad" and "known to the tagger" in out["reason"]


def test_router_refuses_bad_settings():
    with pytest.raises(KolmError):
        Router(tenants(acme=["a"]), threshold=1.5)
    with pytest.raises(KolmError):
        Router(tenants(acme=["a"]), budget_ms=0)


# --- masking -----------------------------------------------------------------------------------------------


def test_masked_softmax_gives_zero_to_masked_labels_even_with_huge_logits():
    logits = np.array([[100.0, 1.0, 0.0], [0.0, 0.0, 0.0], [5.0, 5.0, 5.0]], dtype=np.float32)
    allowed = np.array([[False, True, True], [False, False, False], [True, False, True]])
    p = masked_softmax(logits, allowed, temperature=2.0)
    assert p[0, 0] == 0.0 and abs(p[0].sum() - 1) < 1e-9 and p[0, 1] > p[0, 2]
    assert (p[1] == 0).all()  # nothing allowed: no probability anywhere
    assert p[2, 1] == 0.0 and abs(p[2, 0] - 0.5) < 1e-9


def test_masked_softmax_with_distances_matches_the_predictors_torch_form():
    import torch

    from kolm_ray.models.modeling import outlier_probs

    rng = np.random.default_rng(0)
    logits = rng.normal(size=(64, 5)) * 3
    dist = rng.uniform(0.5, 8, size=(64, 5))
    allowed = rng.random((64, 5)) < 0.6
    allowed[:, 0] = True
    outlier = {"weight": 0.7, "offset": 1.5}
    fast = masked_softmax(logits, allowed, 1.3, dist, outlier)
    ref = outlier_probs(
        torch.from_numpy(np.where(allowed, logits, -np.inf)),
        1.3,
        torch.from_numpy(np.where(allowed, dist, np.inf)),
        outlier,
    ).numpy()
    assert np.allclose(fast, ref, atol=1e-9) and (fast[~allowed] == 0).all()
    assert (fast.sum(1) < 1).all()  # the "none of these" share is dropped, never given to a namespace
    nothing = masked_softmax(logits[:1], np.zeros((1, 5), bool), 1.0, dist[:1], outlier)
    assert (nothing == 0).all()


# --- property: the answer never leaves the caller's namespaces ---------------------------------------------

NAMES = st.text(alphabet="abcdefghijklmnopqrstuvwxyz_", min_size=1, max_size=8)


@st.composite
def worlds(draw):
    universe = draw(st.lists(NAMES, min_size=1, max_size=12, unique=True))
    n = draw(st.integers(1, 5))
    spec = {
        f"t{i}": draw(st.lists(st.sampled_from(universe), min_size=1, max_size=len(universe), unique=True))
        for i in range(n)
    }
    caller = draw(st.sampled_from(sorted(spec)))
    query = draw(st.text(min_size=1, max_size=200).filter(lambda s: s.strip()))
    # the tagger's answer: any namespace in the universe (possibly another tenant's), any confidence
    answer = draw(st.one_of(st.none(), st.sampled_from(universe)))
    confidence = draw(st.floats(0.0, 1.0))
    threshold = draw(st.floats(0.0, 1.0))
    return spec, caller, query, answer, confidence, threshold


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(worlds())
def test_property_answers_never_name_a_namespace_outside_the_callers(world):
    spec, caller, query, answer, confidence, threshold = world
    router = Router(tenants(**spec), threshold=threshold)
    seen: list[list[str]] = []

    async def tag(q, namespaces):
        seen.append(list(namespaces))
        return {"namespace": answer, "confidence": confidence}

    status, out = route(router, f"Bearer key-{caller}", {"query": query}, tag)
    mine = spec[caller]
    assert status == 200
    assert seen == [mine]  # the tagger is only ever shown the caller's own namespaces
    assert set(out) >= {"mode", "confidence", "fallback"} and out["fallback"] == out["mode"]
    if out["mode"] == "narrow":
        assert out["namespace"] in mine and out["confidence"] >= threshold - 1e-4  # answers round to 4 places
        assert "namespaces" not in out
    else:
        assert out["namespaces"] == mine  # exactly the caller's, in its order
        assert "namespace" not in out


def test_fast_serve_env_for_a_ray_started_here(monkeypatch):
    import shutil

    from kolm_ray.serve.router import fast_serve_env

    for var in (
        "RAY_SERVE_THROUGHPUT_OPTIMIZED",
        "RAY_SERVE_ENABLE_HA_PROXY",
        "RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S",
    ):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setattr(shutil, "which", lambda name: "/usr/sbin/haproxy")
    monkeypatch.setenv("RAY_SERVE_THROUGHPUT_OPTIMIZED", "0")  # what the user set wins
    applied = fast_serve_env()
    # HAProxy, and a short drain window: one node, its HAProxy stops first (30 s was every shutdown's wait)
    assert applied == {
        "RAY_SERVE_ENABLE_HA_PROXY": "1",
        "RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S": "2",
    }
    assert os.environ["RAY_SERVE_THROUGHPUT_OPTIMIZED"] == "0"


# --- readiness ---------------------------------------------------------------------------------------------


def test_tagger_health_is_starting_then_ok_then_degraded():
    h = TaggerHealth()
    assert (h.status, h.ready, h.healthz()) == ("starting", False, (503, {"status": "starting"}))
    assert h.update(0) == "starting"  # never ready yet: still starting, not degraded
    assert h.update(2) == "ok" and h.healthz() == (200, {"status": "ok"})
    assert h.update(1) == "ok"
    assert h.update(0) == "degraded" and h.healthz() == (503, {"status": "degraded"})
    assert h.update(1) == "ok"


def test_no_ready_tagger_routes_broad_at_once_without_asking_it():
    asked = []

    async def tag(query, namespaces):
        asked.append(query)
        await asyncio.sleep(10)  # a tagger that would never answer within the budget

    health = TaggerHealth()
    r = Router(tenants(acme=["runbooks", "incidents"]), budget_ms=5000, health=health)
    for state in ("starting", "degraded"):
        health.status = state
        status, out = route(r, "Bearer key-acme", b'{"query": "disk full on db-1"}', tag)
        assert status == 200
        assert out == {
            "mode": "broad",
            "namespaces": ["runbooks", "incidents"],
            "confidence": 0.0,
            "fallback": "broad",
            "reason": "tagger unavailable",
        }
    assert asked == []  # answered without waiting on the tagger, let alone for the 5 s budget
    # Auth and validation come first, whatever the tagger's state.
    assert route(r, "Bearer nope", b'{"query": "q"}', tag)[0] == 401
    assert route(r, "Bearer key-acme", b'{"query": ""}', tag)[0] == 422
    health.update(1)
    status, out = route(r, "Bearer key-acme", b'{"query": "q"}', confident("runbooks"))
    assert out["mode"] == "narrow" and out["namespace"] == "runbooks"
