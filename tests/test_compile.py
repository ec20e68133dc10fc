"""kolm compile end to end: validation errors (exit 2, nothing written), dry runs, a real Ray Train compile
(exit 0), the K-score gate (exit 3, no file), a LoRA compile of a local tiny Qwen2 directory, subprocesses."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from compile_helpers import (
    WORDS,
    build_artifact_without_ray,
    compile_argv,
    write_eval_with_negatives,
    write_namespaces,
    write_pairs,
)

from kolm_ray.cli import main

KEY = "compile-tests-signing-key-0123456789"


@pytest.fixture(autouse=True)
def signing_key(monkeypatch) -> None:
    monkeypatch.setenv("KOLM_SIGNING_KEY", KEY)
    monkeypatch.setenv("KOLM_TORCH_THREADS", "1")


def _err(capsys) -> str:
    return capsys.readouterr().err


def test_dry_run_validates_and_writes_nothing(tmp_path: Path, capsys) -> None:
    assert main(compile_argv(tmp_path, "--dry-run")) == 0
    assert "ok dry run" in capsys.readouterr().out
    assert not (tmp_path / "tagger.kolm").exists()


def test_string_outputs_with_namespaces_are_accepted(tmp_path: Path, capsys) -> None:
    argv = compile_argv(tmp_path, "--dry-run")
    write_pairs(tmp_path / "pairs.jsonl", 60, as_string=True)
    assert main(argv) == 0


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (
            lambda a, t: a.__setitem__(a.index("--base") + 1, "gpt-9"),
            "'gpt-9' is not a supported base; known:",
        ),
        (
            lambda a, t: a.__setitem__(a.index("--verifier") + 1, "closed-vocab,vibes"),
            "unknown verifier 'vibes'; known:",
        ),
        (
            lambda a, t: a.__setitem__(a.index("--pairs") + 1, str(t / "nope.jsonl")),
            "nope.jsonl: no such file",
        ),
        (lambda a, t: a.__setitem__(a.index("--namespaces") + 1, str(t / "nope.json")), "no such file"),
        (lambda a, t: a.__setitem__(a.index("--k-floor") + 1, "1.5"), "--k-floor must be a number in [0, 1]"),
        (lambda a, t: a.remove("query namespace router"), "a DESCRIPTION is required"),
        (lambda a, t: a.extend(["--deepspeed", str(t / "ds.json")]), "--deepspeed"),
        (lambda a, t: a.extend(["--epochs", "0"]), "--epochs must be at least 1"),
    ],
)
def test_bad_flags_exit_2(tmp_path: Path, capsys, change, message: str) -> None:
    argv = compile_argv(tmp_path)
    change(argv, tmp_path)
    assert main(argv) == 2
    err = _err(capsys)
    assert err.strip().splitlines()[-1].startswith("error: ") and message in err and "Traceback" not in err
    assert not (tmp_path / "tagger.kolm").exists()


def test_malformed_pairs_named_by_line(tmp_path: Path, capsys) -> None:
    argv = compile_argv(tmp_path)
    lines = (tmp_path / "pairs.jsonl").read_text().splitlines()
    lines[2] = "{not json"
    lines[6] = json.dumps({"output": {"namespace": "billing"}})
    (tmp_path / "pairs.jsonl").write_text("\n".join(lines) + "\n")
    assert main(argv) == 2
    err = _err(capsys)
    assert "line 3: not JSON" in err and "line 7: 'input' must be a non-empty string" in err


def test_pairs_breaking_the_spec(tmp_path: Path, capsys) -> None:
    argv = compile_argv(tmp_path)
    with (tmp_path / "pairs.jsonl").open("a") as f:
        f.write(json.dumps({"input": "x", "output": {"namespace": "payroll"}}) + "\n")
    assert main(argv) == 2
    assert "line 91: closed-vocab: namespace='payroll' not in the closed vocabulary" in _err(capsys)


def test_too_few_pairs(tmp_path: Path, capsys) -> None:
    argv = compile_argv(tmp_path)
    write_pairs(tmp_path / "pairs.jsonl", 10)
    assert main(argv) == 2
    assert "too few pairs: 10" in _err(capsys)


def test_encoder_base_needs_closed_outputs(tmp_path: Path, capsys) -> None:
    argv = compile_argv(tmp_path)
    rows = [{"input": f"q{i}", "output": {"namespace": "billing", "summary": f"s{i}"}} for i in range(30)]
    (tmp_path / "pairs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert main(argv) == 2
    assert "no closed vocabulary" in _err(capsys)


def test_recipe_dir_dry_run(tmp_path: Path, capsys) -> None:
    recipe = tmp_path / "recipe"
    recipe.mkdir()
    write_pairs(recipe / "pairs.jsonl", 240)
    rows = [json.loads(x) for x in (recipe / "pairs.jsonl").read_text().splitlines()]
    for i, r in enumerate(rows):
        r["split"] = "eval" if i % 5 == 0 else "train"
        r["input"] += f" (ticket {i})"  # recipes never hold one input in both splits
    (recipe / "pairs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    spec = {
        "output_kind": "json",
        "schema": {
            "type": "object",
            "properties": {"namespace": {"enum": list(WORDS)}},
            "required": ["namespace"],
        },
        "verifier": [{"name": "json-schema"}, {"name": "closed-vocab", "fields": {"namespace": list(WORDS)}}],
    }
    (recipe / "spec.json").write_text(json.dumps(spec))
    (recipe / "recipe.yaml").write_text(
        'description: "router"\nbase: tiny-encoder\nk_floor: 0.8\nverifiers: [json-schema, closed-vocab]\n'
        "training:\n  epochs: 2\n  lr: 0.003\n"
    )
    out = tmp_path / "r.kolm"
    assert main(["compile", "--recipe", str(recipe), "--output", str(out), "--dry-run"]) == 0
    assert "192 train / 48 eval" in capsys.readouterr().out and not out.exists()
    other = write_pairs(tmp_path / "other.jsonl", 120, seed=3)  # --pairs overrides the recipe's pairs
    assert (
        main(["compile", "--recipe", str(recipe), "--pairs", str(other), "--output", str(out), "--dry-run"])
        == 0
    )
    assert "96 train / 24 eval" in capsys.readouterr().out
    (recipe / "spec.json").write_text(json.dumps({**spec, "verifier": [{"name": "nope"}]}))
    assert main(["compile", "--recipe", str(recipe), "--output", str(out), "--dry-run"]) == 2
    assert "nope" in _err(capsys)


def test_subprocess_exit_code_for_bad_pairs(tmp_path: Path) -> None:
    argv = compile_argv(tmp_path)
    with (tmp_path / "pairs.jsonl").open("a") as f:
        f.write("[1, 2]\n")
    env = {**os.environ, "KOLM_SIGNING_KEY": KEY}
    r = subprocess.run(
        [sys.executable, "-m", "kolm_ray.cli", *argv], capture_output=True, text=True, env=env, timeout=300
    )
    assert r.returncode == 2 and "line 91: expected an object" in r.stderr and "Traceback" not in r.stderr
    assert not (tmp_path / "tagger.kolm").exists()


# ---- real compiles on Ray Train (one local Ray for the module) ---------------------------------------------


@pytest.fixture(scope="module")
def ray_local():
    import ray

    ray.init(address="local", num_cpus=2, include_dashboard=False)
    yield
    ray.shutdown()


@pytest.mark.slow
def test_compile_writes_signed_artifact_that_runs(ray_local, tmp_path: Path, capsys) -> None:
    argv = compile_argv(tmp_path, "--epochs", "6")
    assert main(argv) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0] == f"ok wrote {tmp_path / 'tagger.kolm'}"
    assert out[1].startswith("   k_score=") and out[1].endswith("  signature=hmac-sha256")
    assert main(["verify", str(tmp_path / "tagger.kolm")]) == 0
    m = json.loads(zip_read(tmp_path / "tagger.kolm", "manifest.json"))
    assert m["kind"] == "encoder-tagger"
    # the words decide the namespace: the compile learns it, and its K is what its answers on eval give
    metrics = m["metrics"]
    assert metrics["k_score"] >= 0.9 and metrics["accuracy"] >= 0.9, metrics
    assert metrics["field_accuracy"]["namespace"] == metrics["accuracy"]
    assert {"brier", "ece", "field_accuracy", "temperature"} <= set(m["metrics"])
    losses = m["metrics"]["training"]["losses"]
    assert len(losses) == 6 and losses[-1] < losses[0]
    # the selective gate: threshold chosen on the calibration half, gated on the other half
    sel = m["metrics"]["selective"]
    from kolm_ray.compile.evaluate import MIN_CALIBRATION

    assert sel["passed"]
    if m["metrics"]["n_eval"] >= MIN_CALIBRATION:  # enough eval rows: two disjoint halves
        assert sel["disjoint"] and sel["n_threshold_rows"] + sel["n_gate_rows"] == m["metrics"]["n_eval"]
    else:  # too few to split (evaluate.MIN_CALIBRATION): chosen and gated on all of them, and it says so
        assert not sel["disjoint"] and sel["n_threshold_rows"] == sel["n_gate_rows"] == m["metrics"]["n_eval"]
    assert sel["answered_accuracy"] >= m["k_floor"] and sel["coverage"] >= 0.2
    assert (
        m["metrics"]["coverage"] == sel["coverage"] and sel["threshold"] >= 0.7
    )  # the spec's fallback floor
    # measured compute: the driver and the Ray Train worker both spent CPU; no GPU here
    c = m["metrics"]["compute"]
    assert c["driver_cpu_s"] > 0 and c["worker_cpu_s"] > 0 and c["gpus"] == 0 and c["gpu_s"] == 0
    assert c["cpu_s"] == pytest.approx(c["driver_cpu_s"] + c["worker_cpu_s"], abs=0.01) and c["wall_s"] > 0
    student = m["metrics"]["student"]  # an encoder router: a student either holds the bar or is left out
    if student["used"]:
        assert student["k_score"]["cascade"] >= student["k_score"]["teacher"] - 0.005
        assert zip_read(tmp_path / "tagger.kolm", "student/student.json")
    else:
        assert student["reason"]
    # phrases it never saw (another seed), each namespace's: the shipped artifact answers them right
    from kolm_ray.inference.predictors import open_predictor

    fresh = [
        json.loads(x) for x in write_pairs(tmp_path / "fresh.jsonl", 30, seed=11).read_text().splitlines()
    ]
    with open_predictor(tmp_path / "tagger.kolm") as p:
        answers = p.predict([r["input"] for r in fresh])
    right = [a["namespace"] == r["output"]["namespace"] for a, r in zip(answers, fresh, strict=True)]
    assert sum(right) >= 27, [(r["input"], a) for r, a in zip(fresh, answers, strict=True)]
    capsys.readouterr()
    assert main(["run", str(tmp_path / "tagger.kolm"), "how do i refund invoice charge"]) == 0
    assert json.loads(capsys.readouterr().out)["namespace"] == "billing"


@pytest.mark.slow
def test_gate_below_floor_exits_3_and_writes_nothing(ray_local, tmp_path: Path, capsys) -> None:
    argv = compile_argv(tmp_path, "--epochs", "1", floor="0.95")
    write_pairs(tmp_path / "pairs.jsonl", 90, shuffle_labels=True)  # labels carry no signal: K ~ 1/3
    assert main(argv) == 3
    err = capsys.readouterr().err
    last = err.strip().splitlines()[-1]  # the selective gate's line: no threshold answers well enough
    assert last.startswith("error: ") and "k_floor 0.95" in last and "K-score " in last, last
    assert not (tmp_path / "tagger.kolm").exists() and not list(tmp_path.glob(".tagger.kolm*"))


@pytest.mark.slow
def test_lora_compile_of_local_qwen2_dir(ray_local, tmp_path: Path, capsys) -> None:
    from kolm_ray.models.bases import resolve_base

    local = tmp_path / "my-qwen2"
    shutil.copytree(resolve_base("tiny-causal-lm").source, local)
    argv = compile_argv(tmp_path, "--epochs", "4", "--lr", "0.01", base=str(local), n=45, floor="0.3")
    assert main(argv) == 0, capsys.readouterr().err
    capsys.readouterr()
    m = json.loads(zip_read(tmp_path / "tagger.kolm", "manifest.json"))
    assert m["kind"] == "causal-lm-lora" and m["base"]["source"] == str(local)
    assert "adapter_model.safetensors" in m["files"] and "model.safetensors" not in m["files"]
    # closed-vocab scoring always answers a word of the vocabulary, so that says nothing: the adapter must
    # have trained (LoRA's B starts at zero) and moved the answers toward the training labels
    import numpy as np
    from safetensors.numpy import load as load_safetensors

    adapter = load_safetensors(zip_read(tmp_path / "tagger.kolm", "adapter_model.safetensors"))
    lora_b = [v for k, v in adapter.items() if "lora_B" in k]
    assert lora_b and all(np.abs(v).max() > 0 for v in lora_b)
    assert m["metrics"]["accuracy"] >= 0.8, m["metrics"]  # eval pairs scored through the adapter (1.0 here)
    assert main(["run", str(tmp_path / "tagger.kolm"), "how do i restart deploy worker"]) == 0
    answer = json.loads(capsys.readouterr().out)
    assert answer["namespace"] == "runbooks" and 0 < answer["confidence"] <= 1


def zip_read(path: Path, name: str) -> bytes:
    import zipfile

    with zipfile.ZipFile(path) as z:
        return z.read(name)


def test_namespaces_file_must_be_names(tmp_path: Path, capsys) -> None:
    argv = compile_argv(tmp_path)
    write_namespaces(tmp_path / "namespaces.json").write_text(
        '{"billing": "money", "runbooks": "ops", "incidents": "x"}'
    )
    assert main([*argv, "--dry-run"]) == 0
    (tmp_path / "namespaces.json").write_text("[1, 2]")
    assert main(argv) == 2
    assert "non-empty JSON array of names" in _err(capsys)


def test_router_trains_on_mixed_outliers_and_calibrates_with_eval_negatives(tmp_path: Path) -> None:
    from kolm_ray.cli import build_parser
    from kolm_ray.compile.evaluate import evaluate, split_for_calibration
    from kolm_ray.compile.plan import validate
    from kolm_ray.inference.predictors import open_predictor

    artifact, _ = build_artifact_without_ray(tmp_path)
    evals = write_eval_with_negatives(tmp_path / "eval.jsonl")
    plan = validate(build_parser().parse_args(compile_argv(tmp_path, "--eval-pairs", str(evals))))
    assert plan.training["mix_weight"] == 0.25  # a router (fallback verifier): pseudo-outliers on
    assert len(plan.eval_negatives) == 40 and len(plan.eval_rows) == 30

    with open_predictor(artifact) as p:
        p.cascade = (
            "teacher"  # the encoder's own calibration path (the cascade's tests: tests/test_recall.py)
        )
        scored: list[str] = []
        score = p.calibration_scores
        p.calibration_scores = lambda inputs, **kw: (scored.extend(inputs), score(inputs, **kw))[1]
        metrics = evaluate(p, plan.eval_rows, plan.spec, negatives=plan.eval_negatives)
        # the model ran once per eval pair and once per negative; the answers are what predict() gives
        assert sorted(scored) == sorted([r["input"] for r in plan.eval_rows] + plan.eval_negatives)
        again = p.predict([r["input"] for r in plan.eval_rows])
        _, neg_idx, _ = split_for_calibration(len(plan.eval_negatives), seed=1)
        neg_answers = p.predict([plan.eval_negatives[i] for i in neg_idx])
        threshold = p.fallback_threshold
    right = [a["namespace"] == r["output"]["namespace"] for a, r in zip(again, plan.eval_rows, strict=True)]
    assert metrics["accuracy"] == sum(right) / len(right)
    cal = metrics["calibration"]
    assert cal["n_negatives_fit"] == 20 and cal["objective"].startswith("brier-with-negatives")
    # the share of held-out negatives answered under the fallback threshold, as predict() answers them, and
    # most of them: "weather on mars" shares no word with any namespace (a broken outlier fit routes none)
    broad = [a["confidence"] < threshold for a in neg_answers]
    assert metrics["negatives_broad"] == sum(broad) / len(broad) >= 0.75, (
        metrics["negatives_broad"],
        threshold,
    )
    assert sum(a["confidence"] < threshold for a in again) / len(again) <= 0.25  # in-scope stays narrow


def test_calibration_weight_is_a_compile_setting_not_a_train_one(tmp_path: Path) -> None:
    from kolm_ray.cli import build_parser
    from kolm_ray.compile.compile import train_config
    from kolm_ray.compile.plan import validate

    plan = validate(build_parser().parse_args(compile_argv(tmp_path)))
    plan.training.update(calibration_negative_weight=0.3, max_failures=2, num_workers=2)
    cfg = train_config(plan)
    assert cfg.mix_weight == 0.25 and not hasattr(cfg, "calibration_negative_weight")


def test_router_with_eval_negatives_ships_class_distances_the_fast_path_reproduces(tmp_path: Path) -> None:
    import zipfile

    import numpy as np

    from kolm_ray.inference.fastpath import EncoderParts, build_fast_tagger
    from kolm_ray.inference.predictors import open_predictor

    evals = write_eval_with_negatives(tmp_path / "eval.jsonl")
    artifact, _ = build_artifact_without_ray(tmp_path, extra=("--eval-pairs", str(evals)))
    with zipfile.ZipFile(artifact) as z:
        manifest = json.loads(z.read("manifest.json"))
        calibration = json.loads(z.read("calibration.json"))
    outlier = manifest["metrics"]["calibration"]["outlier"]["namespace"]
    assert calibration["outlier"]["namespace"] == outlier and set(outlier) == {"weight", "offset"}
    queries = ["how do i refund invoice card", "weather on mars 99", "restart deploy worker"]
    with open_predictor(artifact) as p:
        assert p.model.gaussians is not None and p.outlier == calibration["outlier"]
        p.cascade = "teacher"  # the fast form is the teacher stage: compare it with the teacher alone
        answers = p.predict(queries, allowed=["billing", "incidents"])
        fast, report = build_fast_tagger(EncoderParts.from_predictor(p), candidates=("onnx-fp32",))
    assert {r["backend"]: r["agrees"] for r in report}["onnx-fp32"], report
    scored = fast.score(queries, [["billing", "incidents"]] * len(queries))
    assert [s["namespace"] for s in scored] == [a["namespace"] for a in answers], (scored, answers)
    assert np.allclose([s["confidence"] for s in scored], [a["confidence"] for a in answers], atol=1e-4)
    assert all(a["namespace"] in ("billing", "incidents") for a in answers)


def test_router_without_eval_negatives_has_no_class_distances(tmp_path: Path) -> None:
    from kolm_ray.inference.predictors import open_predictor

    artifact, _ = build_artifact_without_ray(tmp_path, epochs=1)
    with open_predictor(artifact) as p:
        assert p.model.gaussians is None and p.outlier == {}
