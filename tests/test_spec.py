"""Spec validation and the verifier table."""

from __future__ import annotations

import pytest

from kolm_ray.artifact.spec import Spec, validate_spec
from kolm_ray.artifact.verifiers import VERIFIERS, build, hard_failures, parse_verifier_list
from kolm_ray.errors import KolmError

NS = ["billing", "runbooks", "incidents"]


def tagger_spec(**extra):
    return {
        "output_kind": "json",
        "schema": {
            "type": "object",
            "properties": {"namespace": {"type": "string", "enum": NS}},
            "required": ["namespace"],
        },
        "verifier": [
            {"name": "json-schema"},
            {"name": "closed-vocab", "fields": {"namespace": NS}},
            {"name": "calibrated-brier", "threshold": 0.1},
            {"name": "low-confidence-fallback-broad", "threshold": 0.7},
            {"name": "tenant-authorized"},
        ],
        **extra,
    }


def test_parse_verifier_list():
    specs = parse_verifier_list("closed-vocab, calibrated-brier=0.10")
    assert [s.name for s in specs] == ["closed-vocab", "calibrated-brier"]
    assert specs[1].threshold == pytest.approx(0.10)


@pytest.mark.parametrize(
    "text, needle",
    [
        ("bogus", "unknown verifier 'bogus'"),
        ("calibrated-brier", "needs a threshold"),
        ("calibrated-brier=x", "takes a number"),
        ("calibrated-brier=2", "not in [0, 1]"),
        ("", "lists no verifier"),
        (" , ", "lists no verifier"),
        ("closed-vocab,closed-vocab", "listed twice"),
    ],
)
def test_parse_verifier_list_errors(text, needle):
    with pytest.raises(KolmError, match=needle.replace("[", r"\[").replace("]", r"\]")) as e:
        parse_verifier_list(text)
    if "unknown" in needle:
        for name in VERIFIERS:
            assert name in str(e.value)


def test_valid_spec_round_trips():
    spec = validate_spec(tagger_spec())
    assert spec.vocab() == {"namespace": NS}
    assert validate_spec(spec.to_json()) == spec


def test_invalid_spec_reports_every_problem():
    bad = {"output_kind": "yaml", "schema": [], "verifier": [{"name": "nope"}]}
    with pytest.raises(KolmError) as e:
        validate_spec(bad)
    msg = str(e.value)
    assert "output_kind" in msg and "schema" in msg and "verifier/0/name" in msg


def test_spec_schema_names_exactly_the_verifier_table():
    """validate_spec leaves unknown names to the published schema's enum: it must be the verifier table."""
    from kolm_ray.artifact.spec import spec_json_schema

    names = spec_json_schema()["properties"]["verifier"]["items"]["properties"]["name"]["enum"]
    assert sorted(names) == sorted(VERIFIERS)


def test_closed_vocab_needs_a_vocabulary():
    data = {"output_kind": "json", "schema": {"type": "object"}, "verifier": [{"name": "closed-vocab"}]}
    with pytest.raises(KolmError, match="spec.json: closed-vocab needs a vocabulary"):
        validate_spec(data, "spec.json")
    with pytest.raises(KolmError, match="spec: closed-vocab needs a vocabulary"):
        build(Spec.model_validate(data))


def test_hard_verifiers():
    spec = validate_spec(tagger_spec())
    vs = build(spec)
    ok = {"namespace": "billing", "confidence": 0.9, "fallback": "narrow"}
    assert hard_failures(vs, ok, "refund my card") == []
    assert any("closed-vocab" in r for r in hard_failures(vs, {"namespace": "hr"}, "q"))
    low = {"namespace": "billing", "confidence": 0.4, "fallback": "narrow"}
    assert any("low-confidence-fallback-broad" in r for r in hard_failures(vs, low, "q"))
    assert any("tenant-authorized" in r for r in hard_failures(vs, ok, "q", allowed=["runbooks"]))


def test_byte_grounded_and_numeric_range():
    spec = validate_spec(
        {
            "output_kind": "json",
            "schema": {
                "type": "object",
                "properties": {
                    "name": {"type": "string"},
                    "qty": {"type": "integer", "minimum": 1, "maximum": 9},
                },
            },
            "verifier": [{"name": "byte-grounded", "fields": ["name"]}, {"name": "numeric-range"}],
        }
    )
    vs = build(spec)
    assert hard_failures(vs, {"name": "Ada", "qty": 3}, "order for Ada, 3 units") == []
    assert hard_failures(vs, {"name": "Bob", "qty": 3}, "order for Ada") != []
    assert hard_failures(vs, {"name": "Ada", "qty": 30}, "order for Ada") != []


def test_calibrated_brier_scores():
    spec = validate_spec(tagger_spec())
    brier = next(v for v in build(spec) if v.name == "calibrated-brier")
    value, passed = brier.score([0.9, 0.8, 0.6], [True, True, False])
    assert value == pytest.approx((0.01 + 0.04 + 0.36) / 3)
    assert not passed
