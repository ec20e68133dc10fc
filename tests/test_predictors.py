"""The one inference path: open_predictor / Predictor.predict / run / `kolm run`, on a tiny artifact built by
the compile phases (without Ray, to keep this module fast)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
from compile_helpers import WORDS, build_artifact_without_ray

from kolm_ray.cli import main
from kolm_ray.errors import ArtifactError
from kolm_ray.inference.offline import run
from kolm_ray.inference.predictors import open_predictor

KEY = "predictor-tests-signing-key-0123456789"


@pytest.fixture(autouse=True)
def signing_key(monkeypatch) -> None:
    monkeypatch.setenv("KOLM_SIGNING_KEY", KEY)


@pytest.fixture(scope="module")
def artifact(tmp_path_factory) -> Path:
    tmp = tmp_path_factory.mktemp("artifact")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("KOLM_HOME", str(tmp / "home"))
        mp.setenv("KOLM_SIGNING_KEY", KEY)
        path, _ = build_artifact_without_ray(tmp, epochs=6)
    return path


def test_predict_answers_fields_confidence_fallback(artifact: Path) -> None:
    with open_predictor(artifact) as p:
        assert p.manifest["kind"] == "encoder-tagger" and p.labels == {"namespace": list(WORDS)}
        answers = p.predict(["how do i refund invoice charge", "how do i restart deploy worker"])
        assert [a["namespace"] for a in answers] == ["billing", "runbooks"]
        for a in answers:
            assert set(a) == {"namespace", "confidence", "fallback"} and 0 <= a["confidence"] <= 1
            assert a["fallback"] == ("broad" if a["confidence"] < 0.7 else "narrow")
        assert set(p.temperature) == {"namespace"}
        enc = p.tokenizer(["restart"], return_tensors="pt")
        assert p.model(enc["input_ids"], enc["attention_mask"])["namespace"].shape == (1, 3)


def test_allowed_masks_before_softmax(artifact: Path) -> None:
    with open_predictor(artifact) as p:
        a = p.predict(["how do i refund invoice charge"], allowed=["runbooks", "incidents"])[0]
        assert a["namespace"] in ("runbooks", "incidents")  # never the unauthorized best answer
        only = p.predict(["how do i refund invoice charge"], allowed=["incidents"])[0]
        assert only["namespace"] == "incidents" and only["confidence"] == pytest.approx(1.0)
        none = p.predict(["anything"], allowed=["not-a-namespace"])[0]
        assert none["namespace"] is None and none["confidence"] == 0.0 and none["fallback"] == "broad"


def test_run_matches_predict_and_package_api(artifact: Path) -> None:
    import kolm_ray

    with open_predictor(artifact) as p:
        expected = p.predict(["how do i outage alert page"])[0]
    assert run(artifact, "how do i outage alert page") == expected
    assert kolm_ray.run(str(artifact), "how do i outage alert page") == expected


def test_run_command_text_and_input_file(artifact: Path, tmp_path: Path, capsys) -> None:
    assert main(["run", str(artifact), "how do i refund invoice"]) == 0
    out = capsys.readouterr().out.strip().splitlines()
    assert len(out) == 1 and json.loads(out[0])["namespace"] == "billing"
    inputs = ["how do i restart worker", "how do i refund card", "how do i sev1 outage"]
    f = tmp_path / "in.jsonl"
    f.write_text("".join(json.dumps({"input": t}) + "\n" for t in inputs))
    assert main(["run", str(artifact), "--input-file", str(f)]) == 0
    lines = [json.loads(x) for x in capsys.readouterr().out.strip().splitlines()]
    assert [x["namespace"] for x in lines] == ["runbooks", "billing", "incidents"]


def test_run_command_bad_input(artifact: Path, tmp_path: Path, capsys) -> None:
    f = tmp_path / "in.jsonl"
    f.write_text('{"input": "ok"}\n{"nope": 1}\n')
    assert main(["run", str(artifact), "--input-file", str(f)]) == 2
    assert "line 2" in capsys.readouterr().err
    assert main(["run", str(artifact)]) == 2


def test_tampered_artifact_never_loads(artifact: Path, tmp_path: Path, capsys) -> None:
    bad = tmp_path / "bad.kolm"
    with zipfile.ZipFile(artifact) as zin, zipfile.ZipFile(bad, "w") as zout:
        for info in zin.infolist():
            data = zin.read(info.filename)
            if info.filename == "tagger.json":
                data = data.replace(b"billing", b"billinG")
            zout.writestr(info.filename, data)
    with pytest.raises(ArtifactError, match="tagger.json does not match"):
        open_predictor(bad)
    assert main(["run", str(bad), "x"]) == 4


@pytest.mark.slow
def test_kolm_run_subprocess(artifact: Path, tmp_path: Path) -> None:
    env = {**os.environ, "KOLM_SIGNING_KEY": KEY, "KOLM_TORCH_THREADS": "1"}
    cmd = [sys.executable, "-m", "kolm_ray.cli", "run", str(artifact), "how do i restart deploy worker"]
    r = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["namespace"] == "runbooks"
    r = subprocess.run(
        [*cmd[:4], str(tmp_path / "missing.kolm"), "x"], capture_output=True, text=True, env=env, timeout=300
    )
    assert r.returncode == 2 and r.stderr.startswith("error: ")  # a mistyped path: a user mistake
