"""configs/examples/order-extractor compiled into an encoder extractor (tiny encoder; compile's phases, the
per-worker training function run plainly), then answered by `kolm run` and by the capture proxy's local
answers through the official SDKs.

Every grounded value in every answer must be the exact substring of its input, and the answers right.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import anthropic
import httpx
import openai
import pytest

from kolm_ray import registry
from kolm_ray.capture.app import create_app
from kolm_ray.cli import main
from kolm_ray.demo.simulate import serve_in_thread, start_upstream_in_thread
from kolm_ray.observations.store import open_store

pytestmark = pytest.mark.slow  # trains, starts the proxy and an upstream (in-process threads)

EXAMPLE = Path(__file__).resolve().parents[1] / "configs" / "examples" / "order-extractor"
SIGNING_KEY = "kolm-extract-tests-signing-key"
NS = "orders"
OPENAI_KEY = "sk-extract-test-0123456789abcdef0123"
ANTHROPIC_KEY = "sk-ant-extract-test-0123456789abcdef"
QUERIES = [
    "URGENT!! status for ORD-52445?",
    "please look up order ORD-10001, it is late",
    "my package ORD-99871 never arrived",
    "URGENT!! cancel ORD-31337 right away please",
]


def truth(text: str) -> dict:
    """What the stand-in frontier answers (and what the example's pairs hold): the ORD id, urgent or not."""
    import re

    oid = re.search(r"ORD-\d+", text)
    return {"order_id": oid.group() if oid else None, "priority": "high" if "URGENT" in text else "low"}


def eval_pairs() -> list[dict]:
    rows = [json.loads(line) for line in (EXAMPLE / "pairs.jsonl").read_text().splitlines()]
    return [r for r in rows if r["split"] == "eval"]


COMPILE = ["--recipe", str(EXAMPLE), "--base", "tiny-encoder", "--lr", "3e-3", "--epochs", "6"]
# the recipe's base is minilm-l6; the tiny encoder starts from random weights, so it learns at a higher rate


@pytest.fixture(scope="module")
def artifact(tmp_path_factory) -> Path:
    """compile's phases on the example recipe: validate -> the Ray Train per-worker function (run plainly: a
    local Ray on a loaded shared box can time out starting) -> stage, evaluate, gate, sign."""
    from dataclasses import replace

    from kolm_ray.compile.args import compile_args
    from kolm_ray.compile.compile import build_artifact, train_config
    from kolm_ray.compile.plan import validate
    from kolm_ray.compile.train.loop import train_loop_per_worker

    mp = pytest.MonkeyPatch()
    mp.setenv("KOLM_SIGNING_KEY", SIGNING_KEY)
    tmp = tmp_path_factory.mktemp("extractor")
    try:
        plan = validate(compile_args([*COMPILE, "--output", str(tmp / "order-extractor.kolm")]))
        assert plan.kind == "extractor"
        cfg = replace(train_config(plan), output_dir=str(tmp / "run"), progress=False)
        metrics = train_loop_per_worker(cfg.to_dict())
        build_artifact(plan, Path(metrics["checkpoint"]), {"losses": metrics["losses"]}, tmp)
    finally:
        mp.undo()
    assert plan.output.is_file()
    return plan.output


def test_kolm_compile_dry_run_on_the_example(capsys):
    assert main(["compile", *COMPILE, "--output", "unused.kolm", "--dry-run"]) == 0
    assert "ok dry run: base tiny-encoder (extractor)" in capsys.readouterr().out


def test_compiled_manifest_reports_spans_and_calibration(artifact, monkeypatch):
    monkeypatch.setenv("KOLM_SIGNING_KEY", SIGNING_KEY)
    from kolm_ray.artifact import open_artifact

    with open_artifact(artifact) as opened:
        m = opened.manifest
    assert m["kind"] == "encoder-extractor" and m["base"]["name"] == "tiny-encoder"
    metrics = m["metrics"]
    assert metrics["k_score"] >= m["k_floor"] == 0.95
    assert metrics["span_f1"] >= 0.95 and metrics["field_accuracy"]["priority"] >= 0.95
    assert metrics["grounded_share"] == 1.0
    assert 0.0 <= metrics["brier"] <= 0.1 and 0.0 <= metrics["ece"] <= 0.2
    cal = metrics["calibration"]
    assert cal["disjoint"] and cal["n_fit"] == 50 and cal["n_scored"] == 50  # fitted apart from where scored
    assert 0.5 <= metrics["local_threshold"] <= 1.0
    assert registry.threshold_of(m) == metrics["local_threshold"]


def test_kolm_run_answers_exact_substrings_and_right(artifact, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("KOLM_SIGNING_KEY", SIGNING_KEY)
    pairs = eval_pairs()
    (tmp_path / "in.jsonl").write_text("".join(json.dumps({"input": p["input"]}) + "\n" for p in pairs))
    capsys.readouterr()
    assert main(["run", str(artifact), "--input-file", str(tmp_path / "in.jsonl")]) == 0
    answers = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert len(answers) == len(pairs)
    right = 0
    for p, a in zip(pairs, answers, strict=True):
        assert list(a)[:2] == ["order_id", "priority"] and 0.0 <= a["confidence"] <= 1.0
        if a.get("order_id") is not None:
            start = p["input"].find(a["order_id"])
            assert start >= 0 and p["input"][start : start + len(a["order_id"])] == a["order_id"]
        right += a["order_id"] == p["output"]["order_id"] and a["priority"] == p["output"]["priority"]
    assert right / len(pairs) >= 0.95
    # one input, the plain form
    assert main(["run", str(artifact), QUERIES[0]]) == 0
    one = json.loads(capsys.readouterr().out)
    assert {k: one[k] for k in ("order_id", "priority")} == truth(QUERIES[0])


def test_onnx_form_answers_as_the_eager_model(artifact, monkeypatch):
    monkeypatch.setenv("KOLM_SIGNING_KEY", SIGNING_KEY)
    from kolm_ray.inference.predictors import open_predictor

    texts = [p["input"] for p in eval_pairs()]
    with open_predictor(artifact) as fast:
        assert fast.backend == "onnx-fp32"
        a = fast.predict(texts)
    monkeypatch.setenv("KOLM_EXTRACTOR_BACKEND", "torch")
    with open_predictor(artifact) as eager:
        assert eager.backend == "torch"
        b = eager.predict(texts)
    for x, y in zip(a, b, strict=True):
        assert {k: v for k, v in x.items() if k != "confidence"} == {
            k: v for k, v in y.items() if k != "confidence"
        }
        assert x["confidence"] == pytest.approx(y["confidence"], abs=1e-3)


@pytest.fixture(scope="module")
def upstream():
    url, stop = start_upstream_in_thread(answer=lambda q: json.dumps(truth(q)))
    yield url
    stop()


@pytest.fixture
def proxy(tmp_path, upstream, artifact, monkeypatch):
    monkeypatch.setenv("KOLM_SIGNING_KEY", SIGNING_KEY)
    monkeypatch.setenv("KOLM_SHADOW_RATE", "0")
    store = open_store(f"sqlite:///{tmp_path / 'obs.db'}")
    registry.promote(store, artifact, NS, force=True)  # an empty store: the calls come after
    app = create_app(store, openai_upstream=upstream, anthropic_upstream=upstream)
    url, stop = serve_in_thread(app)
    try:
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline:
            if httpx.get(f"{url}/healthz").json().get("local", {}).get("models", {}).get(NS):
                break
            time.sleep(0.1)
        else:
            raise AssertionError("the proxy never loaded the extractor")
        yield url
    finally:
        stop()
        store.close()


def _check(text: str, query: str) -> None:
    answer = json.loads(text)
    assert answer == truth(query) and list(answer) == ["order_id", "priority"]  # schema order, no confidence
    assert answer["order_id"] in query


def test_proxy_answers_locally_through_the_official_sdks(proxy):
    url = proxy
    oai = openai.OpenAI(base_url=f"{url}/v1/capture/openai", api_key=OPENAI_KEY, max_retries=0,
                        default_headers={"X-Kolm-Namespace": NS})  # fmt: skip
    ant = anthropic.Anthropic(base_url=f"{url}/v1/capture/anthropic", api_key=ANTHROPIC_KEY, max_retries=0,
                              default_headers={"X-Kolm-Namespace": NS})  # fmt: skip
    for q in QUERIES:
        msgs = [{"role": "user", "content": q}]
        raw = oai.chat.completions.with_raw_response.create(model="gpt-4o-mini", messages=msgs)
        assert raw.headers["x-kolm-served-by"] == "local", q
        assert raw.headers["x-kolm-model"].startswith("order-extractor@")
        _check(raw.parse().choices[0].message.content, q)

        stream = oai.chat.completions.create(model="gpt-4o-mini", messages=msgs, stream=True)
        _check("".join(c.choices[0].delta.content or "" for c in stream if c.choices), q)

        raw = ant.messages.with_raw_response.create(
            model="claude-3-5-haiku-latest", max_tokens=64, messages=msgs
        )
        assert raw.headers["x-kolm-served-by"] == "local"
        _check(raw.parse().content[0].text, q)

        with ant.messages.stream(model="claude-3-5-haiku-latest", max_tokens=64, messages=msgs) as s:
            _check(s.get_final_text(), q)

    # forced upstream: the stand-in answers the same JSON, and says so in the header
    raw = oai.chat.completions.with_raw_response.create(
        model="gpt-4o-mini",
        messages=[{"role": "user", "content": QUERIES[0]}],
        extra_headers={"X-Kolm-Local": "off"},
    )
    assert raw.headers["x-kolm-served-by"] == "upstream"
    _check(raw.parse().choices[0].message.content, QUERIES[0])
