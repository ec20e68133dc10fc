"""The encoder extractor's pieces without training: which outputs `kolm recipe` gives an extractor (and why),
the layout it predicts, spans that always come back as exact substrings, nested answers whose absent keys
stay absent, and the nested byte-grounded check."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import recipe_data as rd
import torch
import yaml

from kolm_ray.artifact.spec import validate_spec
from kolm_ray.artifact.verifiers import build, hard_failures
from kolm_ray.clustering.shape import infer_shape
from kolm_ray.compile.extract import choose_threshold, fit_platt, span_counts
from kolm_ray.demo.simulate.snips import read_snips
from kolm_ray.errors import KolmError
from kolm_ray.models.extract_layout import ABSENT, build_output, extraction_layout, span_value
from kolm_ray.models.extractor import decode_spans, find_span, tag_targets
from kolm_ray.recipe import recipe_from_observations, validate_recipe_dir

EXAMPLE = Path(__file__).resolve().parents[1] / "configs" / "examples" / "order-extractor"
SNIPS = Path(__file__).resolve().parents[2] / "shared" / "datasets" / "snips"
if not SNIPS.is_dir():
    SNIPS = Path("/work/shared/datasets/snips")


def _example_observations() -> list[dict]:
    rows = [json.loads(line) for line in (EXAMPLE / "pairs.jsonl").read_text().splitlines()]
    return [rd.obs(i, r["input"], r["output"]) for i, r in enumerate(rows)]


def snips_sample(per_intent: int = 40, seed: int = 0) -> list[dict]:
    """A SNIPS-like nested sample: {"intent", "slots": {type: exact text}}, slots optional per utterance."""
    rows = read_snips(SNIPS, "train")
    rng = random.Random(seed)
    by_intent: dict[str, list[dict]] = {}
    for r in rows:
        by_intent.setdefault(r["output"]["intent"], []).append(r)
    picked = [r for group in by_intent.values() for r in rng.sample(group, per_intent)]
    return [rd.obs(i, r["input"], r["output"]) for i, r in enumerate(picked)]


def _recipe(tmp: Path, observations: list[dict]) -> tuple[dict, dict, dict]:
    info = recipe_from_observations(observations, out_dir=str(tmp / "recipe"))
    spec = json.loads(Path(info["spec_json"]).read_text())
    diag = json.loads(Path(info["diagnostics"]).read_text())
    settings = yaml.safe_load(Path(info["recipe_dir"], "recipe.yaml").read_text())
    validate_recipe_dir(info["recipe_dir"])  # what `kolm compile --dry-run` checks
    return spec, diag, settings


def test_recipe_picks_the_extractor_for_the_order_example(tmp_path):
    spec, diag, settings = _recipe(tmp_path, _example_observations())
    assert settings["base"] == "minilm-l6" and diag["base"]["name"] == "minilm-l6"
    assert "encoder extractor" in diag["base"]["why"] and "order_id 100%" in diag["base"]["why"]
    assert settings["training"]["max_len"] == 128 and settings["training"]["head_lr"] == 0.003
    v = {x["name"]: x for x in spec["verifier"]}
    assert v["byte-grounded"]["fields"] == ["order_id"]
    layout = extraction_layout(validate_spec(spec), [o["output"] for o in _example_observations()])
    kinds = {".".join(f["path"]): f["kind"] for f in layout["fields"]}
    assert kinds == {"order_id": "span", "priority": "class"}


def test_recipe_picks_the_extractor_for_a_snips_like_nested_sample(tmp_path):
    observations = snips_sample()
    spec, diag, settings = _recipe(tmp_path, observations)
    assert settings["base"] == "minilm-l6" and "encoder extractor" in diag["base"]["why"]
    assert diag["fields"]["slots"]["kind"] == "object"
    assert diag["fields"]["intent"]["kind"] == "categorical"
    v = {x["name"]: x for x in spec["verifier"]}
    assert v["byte-grounded"]["fields"] == ["slots"]  # the object's name covers every slot under it
    layout = extraction_layout(validate_spec(spec), [o["output"] for o in observations])
    spans = [f for f in layout["fields"] if f["kind"] == "span"]
    assert spans and all(f["path"][0] == "slots" and f["missing"] == "absent" for f in spans)
    assert layout["containers"]["slots"]["always"] is True
    assert [f["path"] for f in layout["fields"] if f["kind"] == "class"] == [["intent"]]


def test_free_text_not_in_the_input_still_gets_a_causal_lm(tmp_path):
    observations = rd.extractive(300)
    for i, o in enumerate(observations):  # a summary the input does not contain
        o["output"] = {**o["output"], "note": f"customer wrote about an order, case {i}"}
    _, diag, settings = _recipe(tmp_path, observations)
    assert settings["base"].startswith("qwen2.5-coder")
    assert "note" in diag["base"]["why"] and "causal LM" in diag["base"]["why"]


def test_flat_fields_with_nulls_are_extracted_and_keep_their_nulls():
    outputs, inputs = [], []
    for i in range(60):
        oid = f"ORD-{10000 + i}"
        has = i % 3 != 0
        inputs.append(f"where is {oid}" if has else "where is my order")
        outputs.append({"order_id": oid if has else None, "rush": i % 2 == 0})
    shape = infer_shape(outputs, inputs)
    assert shape.extractable and shape.fields["order_id"].nulls == pytest.approx(20 / 60, abs=1e-3)
    from kolm_ray.clustering.shape import choose_verifiers

    specs, _ = choose_verifiers(shape)
    spec = validate_spec(
        {
            "output_kind": "json",
            "schema": shape.schema,
            "verifier": [s.model_dump(exclude_none=True) for s in specs],
        }
    )
    layout = extraction_layout(spec, outputs)
    f = {".".join(x["path"]): x for x in layout["fields"]}
    assert f["order_id"]["kind"] == "span" and f["order_id"]["missing"] == "null"
    assert f["rush"]["kind"] == "class" and f["rush"]["values"][:2] == [False, True]
    assert build_output(layout, {("order_id",): None, ("rush",): True}) == {"order_id": None, "rush": True}


def test_nested_answers_keep_absent_keys_absent():
    layout = {
        "fields": [
            {"path": ["intent"], "kind": "class", "values": ["a", "b"], "absent": False},
            {"path": ["slots", "city"], "kind": "span", "type": "string", "missing": "absent"},
            {"path": ["slots", "date"], "kind": "span", "type": "string", "missing": "absent"},
        ],
        "containers": {"slots": {"always": True}},
        "order": {"intent": None, "slots": {"city": None, "date": None}},
    }
    out = build_output(layout, {("intent",): "a", ("slots", "city"): "Paris", ("slots", "date"): ABSENT})
    assert out == {"intent": "a", "slots": {"city": "Paris"}} and list(out) == ["intent", "slots"]
    assert build_output(layout, {("intent",): "b"}) == {"intent": "b", "slots": {}}
    layout["containers"]["slots"]["always"] = False
    assert build_output(layout, {("intent",): "b"}) == {"intent": "b"}
    assert span_value({"type": "integer", "missing": "null"}, "42") == 42
    assert span_value({"type": "number", "missing": "null"}, "forty") is None


def test_fields_neither_closed_nor_grounded_are_refused_by_name():
    spec = validate_spec(
        {
            "output_kind": "json",
            "schema": {
                "type": "object",
                "properties": {"id": {"type": "string"}, "note": {"type": "string"}},
            },
            "verifier": [{"name": "byte-grounded", "fields": ["id"]}],
        }
    )
    with pytest.raises(KolmError, match=r"note \(string, not grounded"):
        extraction_layout(spec, [{"id": "x", "note": "y"}])


@pytest.fixture(scope="module")
def tokenizer():
    from kolm_ray.models.bases import resolve_base

    return resolve_base("minilm-l6").load_tokenizer()


@pytest.mark.parametrize(
    "text,value",
    [
        ("URGENT!! status for ORD-52445?", "ORD-52445"),
        ("Add another song to the Cita Romántica playlist. ", "Cita Romántica"),
        ("book a table in San Francisco, CA for 4", "San Francisco, CA"),
        ("rate it 4 of 6", "4"),  # the first occurrence on word boundaries, not inside another word
    ],
)
def test_gold_tags_decode_back_to_the_exact_substring(tokenizer, text, value):
    layout = {
        "fields": [{"path": ["v"], "kind": "span", "type": "string", "missing": "absent"}],
        "containers": {},
        "order": {"v": None},
    }
    enc = tokenizer(text, return_offsets_mapping=True)
    offsets, words = enc["offset_mapping"], enc.word_ids()
    tags = tag_targets(text, offsets, {"v": value}, layout, words)
    assert tags.count(1) == 1  # one B on the first piece of the first word
    assert all(
        t == -100 for i, t in enumerate(tags) if i > 0 and words[i] is not None and words[i] == words[i - 1]
    )
    # the best tags are the gold ones (continuation pieces say nothing; decoding snaps to whole words)
    logits = torch.full((len(tags), 3), -5.0)
    for i, t in enumerate(tags):
        logits[i, t if t >= 0 else 0] = 5.0
    spans, logp = decode_spans(text, offsets, torch.log_softmax(logits, -1), 1, words)
    assert spans == [value] and spans[0] == text[find_span(text, value)[0] :][: len(value)]
    assert logp < 0


def test_nested_byte_grounded_check():
    spec = validate_spec(
        {
            "output_kind": "json",
            "schema": {"type": "object"},
            "verifier": [{"name": "byte-grounded", "fields": ["slots"]}],
        }
    )
    v = build(spec)
    assert hard_failures(v, {"intent": "x", "slots": {"city": "Paris"}}, "fly to Paris") == []
    reasons = hard_failures(v, {"intent": "x", "slots": {"city": "Rome"}}, "fly to Paris")
    assert reasons and "slots.city='Rome'" in reasons[0]


def test_threshold_is_the_lowest_that_keeps_precision_and_platt_is_monotone():
    confs = [0.99, 0.97, 0.95, 0.9, 0.8, 0.6, 0.55]
    right = [True, True, True, True, False, True, False]
    assert choose_threshold(confs, right, precision=0.98) == 0.9
    assert choose_threshold(confs, right, precision=0.8) == 0.6
    assert choose_threshold([0.4, 0.3], [True, True]) == 1.0  # never below an even chance
    p = fit_platt([-0.01, -0.1, -1.0, -3.0, -0.05, -2.0], [True, True, False, False, True, False])
    assert p["a"] > 0
    layout = {"fields": [{"path": ["s", "a"], "kind": "span", "type": "string", "missing": "absent"},
                         {"path": ["s", "b"], "kind": "span", "type": "string", "missing": "absent"}]}  # fmt: skip
    assert span_counts(layout, {"s": {"a": "x", "b": "y"}}, {"s": {"a": "x"}}) == (1, 2, 1)


def test_epoch_benchmark_scores_gold_logits_as_right_and_a_wrong_slot_as_wrong(tmp_path):
    """benchmarks/extract_epochs.py chose the default epochs: its scoring, fed logits that spell the gold tags and
    classes, must give every frame right; one row's slot moved to another type costs that frame and its slot."""
    import importlib.util
    import sys

    from kolm_ray.models.bases import resolve_base
    from kolm_ray.models.extract_layout import classes
    from kolm_ray.models.extractor import class_targets

    bench_dir = Path(__file__).resolve().parent.parent / "benchmarks"
    spec_ = importlib.util.spec_from_file_location("extract_epochs", bench_dir / "extract_epochs.py")
    bench = importlib.util.module_from_spec(spec_)
    sys.modules["extract_epochs"] = bench
    spec_.loader.exec_module(bench)

    observations = snips_sample()  # 280: a recipe needs 200 pairs
    spec, _, _ = _recipe(tmp_path, observations)
    rows = [{"input": o["input"], "output": o["output"]} for o in observations][:30]
    layout = extraction_layout(validate_spec(spec), [r["output"] for r in rows])
    tokenizer = resolve_base("tiny-encoder").load_tokenizer()
    n_tags = 1 + 2 * sum(f["kind"] == "span" for f in layout["fields"])
    n_cls = sum(len(f["values"]) + int(f["absent"]) for f in classes(layout))
    spoil = {"row": 0, "from": None, "to": None}

    class Gold(torch.nn.Module):
        """Logits that put 10 on each row's gold tag and class (continuation pieces follow their word)."""

        def forward(self, ids, mask):
            tags = torch.zeros(ids.shape[0], ids.shape[1], n_tags)
            cls = torch.zeros(ids.shape[0], n_cls)
            for k in range(ids.shape[0]):
                r = rows[self.start + k]
                enc = tokenizer(r["input"], return_offsets_mapping=True, truncation=True, max_length=128)
                words = enc.word_ids()
                gold = tag_targets(r["input"], enc["offset_mapping"], r["output"], layout, words)
                for i, t in enumerate(gold):
                    t = gold[i - 1] if t < 0 and i > 0 and words[i] is not None else max(t, 0)
                    if self.start + k == spoil["row"] and t == spoil["from"]:
                        t = spoil["to"]
                    gold[i] = t
                    tags[k, i, t] = 10.0
                start = 0
                for f, c in zip(classes(layout), class_targets(r["output"], layout), strict=True):
                    cls[k, start + c] = 10.0
                    start += len(f["values"]) + int(f["absent"])
            self.start += ids.shape[0]
            return tags, cls

    model = Gold()
    model.start = 0
    assert bench.evaluate(model, tokenizer, layout, rows, 128) == {"frame_accuracy": 1.0, "slot_f1": 1.0}

    # Row 0's first slot becomes a span field the row does not have: its frame is wrong, one slot a false
    # positive and one a miss.
    first = next(iter(rows[0]["output"]["slots"]))
    names = [f["path"][-1] for f in layout["fields"] if f["kind"] == "span"]
    j = names.index(first)
    other = next(k for k, name in enumerate(names) if name not in rows[0]["output"]["slots"])
    spoil.update({"from": 1 + 2 * j, "to": 1 + 2 * other})
    model.start = 0
    gold_slots = sum(len(r["output"]["slots"]) for r in rows)
    f1 = 2 * (gold_slots - 1) / (2 * gold_slots)  # precision = recall = (n - 1) / n
    assert bench.evaluate(model, tokenizer, layout, rows, 128) == {
        "frame_accuracy": round(29 / 30, 4),
        "slot_f1": round(f1, 4),
    }
