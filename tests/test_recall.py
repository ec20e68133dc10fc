"""The recall router with a real signed tagger, without Serve: the fast form, the cascade, tenant safety, and
the deployment classes called in process. tests/test_recall_serve.py runs them on Ray Serve."""

from __future__ import annotations

import asyncio
import json
import shutil
import tempfile
import zipfile

import numpy as np
import pytest
import recall_artifact
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from recall_helpers import REPO, TENANT_NAMESPACES

from kolm_ray.errors import ArtifactError
from kolm_ray.inference.fastpath import PROBES, EncoderParts, build_fast_tagger, measure_backends
from kolm_ray.serve.router import Router, load_tenants


@pytest.fixture
def signing_key(monkeypatch):
    monkeypatch.setenv("KOLM_SIGNING_KEY", recall_artifact.SIGNING_KEY)


@pytest.fixture(scope="module")
def served(tagger_artifact):
    """(predictor, fast tagger, report) built the way a replica builds them."""
    from kolm_ray.inference.predictors import open_predictor

    # One key set and put back (setenv), never patch.dict: its exit clears the whole environment and
    # rebuilds it, and a C library reading getenv() on another thread at that moment crashes (glibc).
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("KOLM_SIGNING_KEY", recall_artifact.SIGNING_KEY)
        predictor = open_predictor(tagger_artifact, device="cpu")
    fast, report = build_fast_tagger(EncoderParts.from_predictor(predictor), threads=1, repeat=3)
    predictor.cascade = "teacher"  # the fast form is the teacher stage: compare it with the teacher alone
    yield predictor, fast, report
    predictor.close()


@pytest.fixture(scope="module")
def cascade(tagger_artifact):
    """The artifact's Predictor as `kolm run` opens it: student first, the encoder for the rest."""
    from kolm_ray.inference.predictors import open_predictor

    # One key set and put back (setenv), never patch.dict: its exit clears the whole environment and
    # rebuilds it, and a C library reading getenv() on another thread at that moment crashes (glibc).
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("KOLM_SIGNING_KEY", recall_artifact.SIGNING_KEY)
        predictor = open_predictor(tagger_artifact, device="cpu")
    yield predictor
    predictor.close()


# --- the fast form -----------------------------------------------------------------------------------------


ALLOWED_CASES = [
    None,
    ["banking", "travel"],
    ["music"],
    ["kitchen", "music", "podcasts"],
    ["podcasts"],
]


@pytest.mark.parametrize("allowed", ALLOWED_CASES)
def test_served_form_answers_like_the_predictor(served, allowed):
    predictor, fast, _ = served
    queries = list(PROBES) + [r["input"] for r in recall_artifact.pairs()[:16]]
    labels = predictor.labels["namespace"]
    mine = [list(allowed if allowed is not None else labels)] * len(queries)
    got = fast.score(queries, mine)
    want = predictor.predict(queries, allowed=allowed)
    for g, w in zip(got, want, strict=True):
        assert g["namespace"] == w["namespace"]
        assert abs(g["confidence"] - w["confidence"]) <= 0.03


# --- the cascade: static-embedding student, then the encoder ---------------------------------------------


def test_compiled_router_ships_a_student_scored_in_the_manifest(cascade):
    report = cascade.manifest["metrics"]["student"]
    assert report["used"] is True and cascade.student is not None
    k = report["k_score"]
    # the bar the threshold was chosen for, and the shipped cascade scored through predict()
    assert k["cascade"] >= k["teacher"] - 0.005 and k["cascade"] >= cascade.manifest["k_floor"]
    assert 0.0 < report["student_share"] <= 1.0 and 0.7 <= report["threshold"] < 1.0
    assert (
        cascade.student.threshold == report["threshold"]
        and cascade.student.labels == cascade.labels["namespace"]
    )
    # measured (not computed from the share), all three; how they compare is benchmarks/ work, not a test's
    assert set(report["ms_per_query"]) == {"student", "teacher", "cascade"}
    assert all(v > 0 for v in report["ms_per_query"].values())
    assert report["held_out"]["n"] + report["fit"]["n"] == cascade.manifest["metrics"]["n_eval"]


HELD = recall_artifact.HELD_OUT  # not among the training phrases: other frames around the same topics


def test_cascade_answers_are_right_and_only_the_callers(cascade):
    pairs = recall_artifact.pairs()[:40]
    got = cascade.predict([r["input"] for r in pairs])
    assert [a["namespace"] for a in got] == [r["output"]["namespace"] for r in pairs]
    held = cascade.predict([q for q, _ in HELD])
    assert sum(a["namespace"] == want for a, (_, want) in zip(held, HELD, strict=True)) >= 3, held
    # tenant masking holds in both stages: the student's sure answers and the escalated ones
    for allowed in (["banking", "travel"], ["music"], ["kitchen", "podcasts"]):
        for answer in cascade.predict([r["input"] for r in pairs], allowed=allowed):
            assert answer["namespace"] in allowed
    assert cascade.predict(["book a flight"], allowed=["podcasts"])[0]["namespace"] is None


def test_cascade_answers_from_the_student_when_sure_and_escalates_the_rest(cascade):
    queries = [r["input"] for r in recall_artifact.pairs()[:30]] + [q for q, _ in HELD] + list(PROBES)
    threshold = cascade.student.threshold
    try:
        cascade.cascade = "student"
        student = cascade.predict(queries)
        cascade.cascade = "teacher"
        teacher = cascade.predict(queries)
        cascade.cascade = "cascade"
        both = cascade.predict(queries)
        for s, t, c in zip(student, teacher, both, strict=True):
            assert c == (s if s["confidence"] >= threshold else t)
        cascade.student.threshold = 1.01  # never sure: every query is the teacher's
        assert cascade.predict(queries) == teacher
    finally:
        cascade.cascade, cascade.student.threshold = "cascade", threshold


def test_fit_student_ships_one_only_when_the_cascade_holds_the_bar(tagger_artifact, signing_key, tmp_path):
    """fit_student on the compiled teacher, end to end (distillation included): with the floor at 0 it ships a
    student whose cascade is right; with a floor no cascade can reach, none, and the manifest says why."""
    from types import SimpleNamespace

    from kolm_ray.artifact.spec import validate_spec
    from kolm_ray.compile.evaluate import split_for_calibration
    from kolm_ray.compile.student_fit import fit_student
    from kolm_ray.inference.predictors import open_predictor

    rows = recall_artifact.pairs(seed=3)
    with open_predictor(tagger_artifact, device="cpu") as teacher:
        spec = validate_spec(teacher.manifest["spec"], "spec")
        plan = SimpleNamespace(
            train_rows=rows[:120],
            eval_rows=rows[120:],
            spec=spec,
            eval_negatives=[],
            training={},
            k_floor=0.0,
        )
        (tmp_path / "yes").mkdir()
        report = fit_student(teacher, plan, tmp_path / "yes")
        assert report["used"] is True and (tmp_path / "yes" / "student" / "student.json").is_file()
        assert report["k_score"]["cascade"] >= report["k_score"]["teacher"] - 0.005
        got = teacher.predict([r["input"] for r in plan.eval_rows])  # the cascade, with the new student
        assert [a["namespace"] for a in got] == [r["output"]["namespace"] for r in plan.eval_rows]

        # fitted on one half of eval, gated and reported on the other (held out from the fit)
        fit_idx, held_idx, disjoint = split_for_calibration(len(plan.eval_rows))
        assert disjoint and report["fit"]["n"] == len(fit_idx) and report["held_out"]["n"] == len(held_idx)
        clean = report

        # the held-out half's labels all wrong: the threshold (fitted on the other half) is the same, the
        # held-out gate sees the cascade miss the floor, and no student ships
        ns = recall_artifact.NAMESPACES
        wrong = {a: ns[(i + 1) % len(ns)] for i, a in enumerate(ns)}
        plan.eval_rows = [
            {**r, "output": {"namespace": wrong[r["output"]["namespace"]]}} if i in set(held_idx) else r
            for i, r in enumerate(plan.eval_rows)
        ]
        plan.k_floor = 0.5
        (tmp_path / "held").mkdir()
        report = fit_student(teacher, plan, tmp_path / "held")
        assert report["threshold"] == clean["threshold"] and report["fit"] == clean["fit"]
        assert (
            report["used"] is False
            and "held-out" in report["reason"]
            and "below the floor" in report["reason"]
        )
        assert report["k_score"]["cascade"] < 0.5 and not (tmp_path / "held" / "student").exists()
        assert teacher.student is None

        plan.k_floor = 1.01  # above any K-score
        (tmp_path / "no").mkdir()
        report = fit_student(teacher, plan, tmp_path / "no")
        assert report["used"] is False and "0.5 points" in report["reason"]
        assert not (tmp_path / "no" / "student").exists() and teacher.student is None

        plan.eval_rows = plan.eval_rows[:19]  # too few to hold half out: no student, and why
        report = fit_student(teacher, plan, tmp_path / "few")
        assert report["used"] is False and "19 eval pairs" in report["reason"]


def test_ingress_first_stage_is_the_predictors_student(cascade):
    """The Serve ingress answers with Student.sure and sends the rest to the tagger: the same split."""
    queries = [r["input"] for r in recall_artifact.pairs()[:30]] + [q for q, _ in HELD]
    for allowed in (list(recall_artifact.NAMESPACES), ["banking", "music"]):
        cascade.cascade = "student"
        student = cascade.predict(queries, allowed=allowed)
        cascade.cascade = "cascade"
        for q, s in zip(queries, student, strict=True):
            sure = cascade.student.sure(q, allowed)
            if s["confidence"] >= cascade.student.threshold:
                assert sure == {"namespace": s["namespace"], "confidence": pytest.approx(s["confidence"])}
            else:
                assert sure is None


def test_fastpath_measures_forms_and_serves_one_that_agrees(served):
    predictor, fast, report = served
    by = {r["backend"]: r for r in report}
    assert by["torch-eager"]["agrees"]
    assert by["onnx-fp32"]["agrees"] and by["onnx-fp32"]["max_prob_diff"] < 1e-3
    served_rows = [r for r in report if r["served"]]
    assert len(served_rows) == 1 and served_rows[0]["backend"] == fast.backend and served_rows[0]["agrees"]
    assert all(r["ms"]["1"]["p50"] > 0 for r in report if "ms" in r)


def test_measure_backends_reports_every_requested_form(served):
    predictor, _, _ = served
    rows = measure_backends(
        EncoderParts.from_predictor(predictor), ("torch-eager", "torch-inference", "onnx-fp32"), 1, repeat=2
    )
    assert [r["backend"] for r in rows] == ["torch-eager", "torch-inference", "onnx-fp32"]
    assert all(r["agrees"] and set(r["ms"]) == {"1", "8"} for r in rows)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    allowed=st.lists(
        st.sampled_from(recall_artifact.NAMESPACES + ["podcasts", "secret", "billing"]),
        max_size=7,
        unique=True,
    ),
    query=st.text(min_size=1, max_size=120).filter(lambda s: s.strip()),
)
def test_property_real_tagger_scores_only_the_callers_namespaces(served, allowed, query):
    predictor, fast, _ = served
    [answer] = fast.score([query], [allowed])
    [probs] = fast.probabilities([query], [allowed])
    known = [n for n in allowed if n in fast.labels]
    if not known:
        assert answer == {"namespace": None, "confidence": 0.0}
        return
    assert answer["namespace"] in known
    outside = [i for i, n in enumerate(fast.labels) if n not in allowed]
    assert np.all(probs[outside] == 0.0) and abs(probs.sum() - 1.0) < 1e-6


def test_router_with_the_real_tagger_answers_in_the_contract_shape(served, tenants_file):
    _, fast, _ = served
    router = Router(load_tenants(tenants_file), threshold=0.7, budget_ms=1000)

    async def tag(query, namespaces):
        return (await asyncio.to_thread(fast.score, [query], [namespaces]))[0]

    async def ask(key, query):
        return await router.route(f"Bearer {key}", json.dumps({"query": query}).encode(), tag)

    status, out = asyncio.run(ask("key-alpha", "how do i check my balance"))
    assert status == 200 and out["mode"] in ("narrow", "broad")
    if out["mode"] == "narrow":
        assert set(out) == {"mode", "namespace", "confidence", "fallback"} and out["namespace"] == "banking"
    status, out = asyncio.run(ask("key-beta", "how do i check my balance"))
    assert status == 200 and (
        out.get("namespace") in TENANT_NAMESPACES["beta"] or out["namespaces"] == TENANT_NAMESPACES["beta"]
    )
    assert asyncio.run(ask("key-gamma", "x"))[0] == 401


def test_tagger_deployment_refuses_a_tampered_or_wrongly_keyed_artifact(
    tagger_artifact, tmp_path, signing_key, monkeypatch
):
    from deployments.recall import NamespaceTagger

    tampered = tmp_path / "tampered.kolm"
    with zipfile.ZipFile(tagger_artifact) as src, zipfile.ZipFile(tampered, "w") as dst:
        for item in src.infolist():
            data = src.read(item.filename)
            if item.filename == "manifest.json":
                manifest = json.loads(data)
                manifest["description"] = "something else"
                data = json.dumps(manifest).encode()
            dst.writestr(item, data)
    with pytest.raises(ArtifactError):
        NamespaceTagger.func_or_class(str(tampered))
    # ... and so do `kolm serve` (before Ray starts) and the app builder `serve run` calls, at deploy time
    from deployments.recall import app_builder
    from kolm_ray.serve.router import check_serve_config

    config = tmp_path / "recall.yaml"
    data = yaml.safe_load((REPO / "deployments" / "recall.yaml").read_text())
    data["applications"][0]["args"].update(
        artifact=str(tampered), tenants=str(REPO / "configs" / "tenants.yaml")
    )
    config.write_text(yaml.safe_dump(data))
    with pytest.raises(ArtifactError, match="tampered"):
        check_serve_config(config)
    with pytest.raises(ArtifactError, match="tampered"):
        app_builder({"artifact": str(tampered), "tenants": str(REPO / "configs" / "tenants.yaml")})
    copy = tmp_path / "copy.kolm"
    shutil.copy(tagger_artifact, copy)
    monkeypatch.setenv("KOLM_SIGNING_KEY", "a-different-key-of-reasonable-length")
    with pytest.raises(ArtifactError):
        NamespaceTagger.func_or_class(str(copy))


def test_tagger_deployment_class_in_process(tagger_artifact, signing_key, monkeypatch, tmp_path):
    """The deployment class itself, called without Serve: verified load, fast form, batched scoring."""
    from deployments.recall import NamespaceTagger

    monkeypatch.setenv("KOLM_SERVE_THREADS", "1")
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    tagger = NamespaceTagger.func_or_class(str(tagger_artifact))
    assert not list(tmp_path.glob("kolm-artifact-*"))  # weights in memory; the extracted copy is gone
    assert tagger.device == "cpu" and tagger.backend in (
        "onnx-int8",
        "onnx-fp32",
        "torch-inference",
        "torch-eager",
    )
    out = tagger._score(["book a flight", "play a song"], [["travel", "banking"], ["music"]])
    assert out[0]["namespace"] in ("travel", "banking") and out[1]["namespace"] == "music"
    assert tagger.info()["backend"] == tagger.backend
    # the ingress's batched escalations: one call, each query against its own caller's namespaces
    many = asyncio.run(
        tagger.score_many(["book a flight", "play a song"], [["travel", "banking"], ["music"]])
    )
    assert many == out
    one = asyncio.run(tagger.score("play a song", ["music", "kitchen"]))
    assert one["namespace"] in ("music", "kitchen") and 0.0 <= one["confidence"] <= 1.0
