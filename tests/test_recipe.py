"""Recipes from generated observation sets: schema, verifiers, purity, K-floor, split, files, errors."""

from __future__ import annotations

import json
import shutil
from collections import Counter
from pathlib import Path

import pytest
import recipe_data as rd
import yaml

from kolm_ray.artifact.spec import load_spec
from kolm_ray.clustering.purity import normalize_text
from kolm_ray.errors import KolmError
from kolm_ray.recipe import recipe_from_observations, validate_recipe_dir

EXAMPLES = Path(__file__).resolve().parents[1] / "configs" / "examples"


def _load(info: dict) -> tuple[dict, list[dict], dict]:
    spec = json.loads(Path(info["spec_json"]).read_text())
    pairs = [json.loads(line) for line in Path(info["pairs_jsonl"]).read_text().splitlines()]
    diag = json.loads(Path(info["diagnostics"]).read_text())
    return spec, pairs, diag


def _verifiers(spec: dict) -> dict[str, dict]:
    return {v["name"]: v for v in spec["verifier"]}


@pytest.fixture(scope="module")
def categorical_recipe(tmp_path_factory):
    observations, flips = rd.categorical(500, noise=0.1)
    info = recipe_from_observations(observations, out_dir=str(tmp_path_factory.mktemp("r") / "cat"))
    return info, observations, flips


def test_categorical_recipe_files_spec_and_split(categorical_recipe):
    info, observations, flips = categorical_recipe
    assert set(info) == {"recipe_dir", "pairs_jsonl", "spec_json", "k_floor", "diagnostics"}
    spec, pairs, diag = _load(info)
    load_spec(info["spec_json"])  # validates against the published schema
    v = _verifiers(spec)
    assert spec["output_kind"] == "json"
    assert set(v) == {"json-schema", "closed-vocab"}
    assert sorted(v["closed-vocab"]["fields"]["intent"]) == sorted(rd.INTENTS)
    assert spec["schema"]["required"] == ["intent"]
    settings = yaml.safe_load(Path(info["recipe_dir"], "recipe.yaml").read_text())
    assert settings["base"] == "minilm-l6" and settings["k_floor"] == info["k_floor"]
    assert settings["verifiers"] == ["json-schema", "closed-vocab"]

    # split: eval >= 100 or 25%, no input on both sides, stratified, flagged pairs kept out of eval
    ev = [p for p in pairs if p["split"] == "eval"]
    assert len(pairs) == 500 and len(ev) >= max(100, 0.25 * len(pairs)) - 1
    assert not {normalize_text(p["input"]) for p in ev} & {
        normalize_text(p["input"]) for p in pairs if p["split"] == "train"
    }
    share = Counter(p["output"]["intent"] for p in ev)
    total = Counter(p["output"]["intent"] for p in pairs)
    for label, n in total.items():
        assert abs(share[label] / n - len(ev) / len(pairs)) < 0.08, (label, share[label], n)
    flagged_inputs = {f["input"] for f in diag["flagged_inconsistent"]["pairs"]}
    assert diag["flagged_inconsistent"]["count"] > 0
    assert not flagged_inputs & {p["input"] for p in ev}

    # purity and floor
    true_purity = 1 - flips / len(observations)
    est = diag["purity"]["estimate"]
    assert abs(est - true_purity) <= 0.05, (est, true_purity)
    assert 0.5 <= info["k_floor"] <= 0.95 and abs(info["k_floor"] - est) <= 0.05
    assert "confident learning" in diag["purity"]["method"]
    spec_obj, settings2, pairs2 = validate_recipe_dir(info["recipe_dir"])
    assert spec_obj.vocab()["intent"] and len(pairs2) == 500 and settings2["base"] == "minilm-l6"


def test_namespace_tagger_gets_closed_vocab_and_fallback(tmp_path):
    observations, _ = rd.categorical(300, field="namespace")
    info = recipe_from_observations(observations, out_dir=str(tmp_path / "tagger"))
    spec, _, diag = _load(info)
    v = _verifiers(spec)
    assert set(v["closed-vocab"]["fields"]) == {"namespace"}
    assert v["low-confidence-fallback-broad"]["threshold"] == 0.7
    assert {d["name"] for d in diag["verifiers"]} >= {"closed-vocab", "low-confidence-fallback-broad"}
    assert all(d["why"] for d in diag["verifiers"])
    validate_recipe_dir(info["recipe_dir"])


def test_extractive_outputs_get_byte_grounded(tmp_path):
    info = recipe_from_observations(rd.extractive(300), out_dir=str(tmp_path / "ext"))
    spec, pairs, diag = _load(info)
    v = _verifiers(spec)
    assert v["byte-grounded"]["fields"] == ["order_id"]
    assert set(v["closed-vocab"]["fields"]["priority"]) == {"low", "high"}
    assert diag["fields"]["order_id"]["kind"] == "extractive"
    assert all(p["output"]["order_id"] in p["input"] for p in pairs)
    # every field categorical or found verbatim in the input: an encoder extractor (span + class heads)
    assert diag["base"]["name"] == "minilm-l6" and "encoder extractor" in diag["base"]["why"]
    assert "order_id 100%" in diag["base"]["why"]
    validate_recipe_dir(info["recipe_dir"])


def test_mixed_outputs_choose_every_verifier(tmp_path):
    info = recipe_from_observations(rd.mixed(300), out_dir=str(tmp_path / "mixed"))
    spec, _, diag = _load(info)
    v = _verifiers(spec)
    assert set(v) == {"json-schema", "closed-vocab", "byte-grounded", "numeric-range", "calibrated-brier"}
    assert v["numeric-range"]["fields"]["urgency"] == [1, 5]
    assert v["numeric-range"]["fields"]["confidence"] == [0, 1]
    assert v["byte-grounded"]["fields"] == ["ticket"]
    assert 0.05 <= v["calibrated-brier"]["threshold"] <= 0.25
    assert spec["schema"]["properties"]["urgency"]["minimum"] == 1
    assert diag["fields"]["confidence"]["kind"] == "confidence"
    settings = yaml.safe_load(Path(info["recipe_dir"], "recipe.yaml").read_text())
    assert any(s.startswith("calibrated-brier=") for s in settings["verifiers"])
    validate_recipe_dir(info["recipe_dir"])


def test_text_outputs(tmp_path):
    info = recipe_from_observations(rd.text_outputs(300), out_dir=str(tmp_path / "text"))
    spec, pairs, diag = _load(info)
    assert spec["output_kind"] == "text" and spec["verifier"] == [] and spec["schema"] == {}
    assert all(isinstance(p["output"], str) for p in pairs)
    assert diag["purity"]["method"].endswith("near-duplicate agreement")
    assert diag["base"]["name"].startswith("qwen2.5-coder")
    validate_recipe_dir(info["recipe_dir"])


@pytest.mark.parametrize("noise", [0.0, 0.2, 0.3])
def test_purity_estimate_within_005_of_truth(tmp_path, noise):
    observations, flips = rd.categorical(500, noise=noise, seed=11)
    info = recipe_from_observations(observations, out_dir=str(tmp_path / "noisy"), seed=3)
    _, pairs, diag = _load(info)
    truth = 1 - flips / len(observations)
    assert abs(diag["purity"]["estimate"] - truth) <= 0.05, (diag["purity"], truth)
    assert abs(info["k_floor"] - min(truth, 0.95)) <= 0.05 + 1e-9


def test_rejected_never_used_and_verified_only(tmp_path):
    good, _ = rd.categorical(400, seed=5)
    for o in good[:60]:
        o["verified"] = False
        o["output"] = {"intent": "billing"}  # a rejected answer, wrong on purpose: must not reach pairs
    for o in good[60:160]:
        o["verified"] = None
    info = recipe_from_observations(good, out_dir=str(tmp_path / "all"))
    _, pairs, diag = _load(info)
    rejected = {o["input"] for o in good[:60]}
    assert len(pairs) == 340 and not rejected & {p["input"] for p in pairs}
    assert diag["dropped"]["by_reason"] == {"rejected (verified=false)": 60}
    with pytest.raises(KolmError, match="140 usable pairs.*unverified.*at least 200") as e:
        recipe_from_observations(good[:300], out_dir=str(tmp_path / "vo"), verified_only=True)
    assert "rejected" in str(e.value)
    assert not (tmp_path / "vo").exists()


def test_too_small_empty_and_no_common_shape_write_nothing(tmp_path):
    small, _ = rd.categorical(150)
    with pytest.raises(KolmError, match="at least 200"):
        recipe_from_observations(small, out_dir=str(tmp_path / "small"))
    with pytest.raises(KolmError, match="no observations"):
        recipe_from_observations([], out_dir=str(tmp_path / "empty"), namespace="ghost")
    with pytest.raises(KolmError, match="no common shape"):
        recipe_from_observations(rd.no_common_shape(300), out_dir=str(tmp_path / "shape"))
    disjoint = [rd.obs(i, f"query {i}", {f"k{i % 4}": i}) for i in range(300)]
    with pytest.raises(KolmError, match="no field occurs in at least half"):
        recipe_from_observations(disjoint, out_dir=str(tmp_path / "disjoint"))
    assert list(tmp_path.iterdir()) == []  # nothing half-written, no temp dirs left


def test_out_dir_refuses_foreign_dir_and_replaces_a_recipe(tmp_path, categorical_recipe):
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("keep me")
    observations, _ = rd.categorical(300, seed=9)
    with pytest.raises(KolmError, match=r"files a recipe does not write \(notes.txt\)"):
        recipe_from_observations(observations, out_dir=str(foreign))
    assert (foreign / "notes.txt").read_text() == "keep me"
    again = tmp_path / "again"
    shutil.copytree(categorical_recipe[0]["recipe_dir"], again)
    (again / "notes.txt").write_text("mine too")  # a recipe directory the user added a file to
    with pytest.raises(KolmError, match="notes.txt"):
        recipe_from_observations(observations, out_dir=str(again))
    (again / "notes.txt").unlink()
    info = recipe_from_observations(observations, out_dir=str(again))
    assert len(Path(info["pairs_jsonl"]).read_text().splitlines()) == 300
    assert sorted(p.name for p in tmp_path.iterdir()) == ["again", "mine"]


def test_validate_recipe_dir_lists_every_problem(tmp_path, categorical_recipe):
    d = tmp_path / "broken"
    shutil.copytree(categorical_recipe[0]["recipe_dir"], d)
    text = (d / "recipe.yaml").read_text()
    text = text.replace(f"k_floor: {categorical_recipe[0]['k_floor']}", "k_floor: 0.99")
    text = text.replace('- "closed-vocab"', '- "closed-vocab"\n  - "regex-match"')
    (d / "recipe.yaml").write_text(text)
    pairs = [json.loads(x) for x in (d / "pairs.jsonl").read_text().splitlines()]
    leak = next(p for p in pairs if p["split"] == "train")
    pairs.append({**leak, "split": "eval"})
    pairs.append({"input": "x", "output": {"intent": "astrology"}, "split": "train"})
    (d / "pairs.jsonl").write_text("".join(json.dumps(p) + "\n" for p in pairs))
    with pytest.raises(KolmError) as e:
        validate_recipe_dir(d)
    msg = str(e.value)
    for part in ("k_floor must be a number in [0.5, 0.95]", "unknown verifier 'regex-match'", "also occur in train",
                 "'astrology' is not one of"):  # fmt: skip
        assert part in msg, msg
    with pytest.raises(KolmError, match="does not exist"):
        validate_recipe_dir(tmp_path / "nope")


@pytest.mark.parametrize("example", sorted(p.name for p in EXAMPLES.iterdir() if p.is_dir()))
def test_example_recipes_validate(example):
    spec, settings, pairs = validate_recipe_dir(EXAMPLES / example)
    assert settings["description"] and len(pairs) >= 200
    assert {p["split"] for p in pairs} == {"train", "eval"}


def test_tagger_drops_the_confidence_target_and_keeps_calibration(tmp_path):
    observations, _ = rd.categorical(300, seed=13)
    for i, o in enumerate(observations):
        o["output"]["confidence"] = round(0.6 + (i % 40) / 100, 2)
    info = recipe_from_observations(observations, out_dir=str(tmp_path / "conf"))
    spec, pairs, diag = _load(info)
    v = _verifiers(spec)
    assert diag["base"]["name"] == "minilm-l6" and "calibrated-brier" in v
    assert all(set(p["output"]) == {"intent"} for p in pairs)  # the tagger answers its own confidence
    assert "confidence" not in spec["schema"]["properties"] and diag["confidence_field_removed"]
    validate_recipe_dir(info["recipe_dir"])


def test_compile_dry_run_accepts_written_recipes(categorical_recipe, tmp_path, capsys):
    from kolm_ray.cli import main

    for d in [categorical_recipe[0]["recipe_dir"], *sorted(str(p) for p in EXAMPLES.iterdir() if p.is_dir())]:
        assert main(["compile", "--recipe", d, "--output", str(tmp_path / "x.kolm"), "--dry-run"]) == 0, d
    assert not (tmp_path / "x.kolm").exists()


def test_floor_out_of_a_probes_reach_is_warned_before_compile(categorical_recipe):
    from kolm_ray.clustering.purity import PurityReport
    from kolm_ray.recipe.synth import reach_warnings

    def report(*accs):
        fields = {f"f{i}": {"out_of_fold_accuracy": a} for i, a in enumerate(accs)}
        return PurityReport(purity=1.0, method="", details={"confident_learning": fields})

    # the benchmark's router: clean labels (floor 0.95), a probe at 0.87 -> the compile missed at 0.90
    (warning,) = reach_warnings(report(0.87), 0.95, 611)
    assert "0.87" in warning and "0.95" in warning and "611 train pairs" in warning
    assert reach_warnings(report(0.93), 0.95, 611) == []  # within reach of fine-tuning
    assert reach_warnings(report(0.95, 0.9), 0.95, 611) != []  # every field must be right: the product
    assert (
        reach_warnings(PurityReport(purity=1.0, method="", details={}), 0.95, 611) == []
    )  # nothing to go on
    diagnostics = json.loads(Path(categorical_recipe[0]["diagnostics"]).read_text())
    assert diagnostics["warnings"] == []  # a learnable cluster says nothing
