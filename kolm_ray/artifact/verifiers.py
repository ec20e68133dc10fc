"""One table of verifiers: name -> class. Recipe chooses from it, compile validates with it, evaluation
scores with it, Serve enforces `tenant-authorized` with it.

Two kinds of check:
- hard (per output): `check(output, input_text, allowed=None) -> reason | None`; an output that fails
  any hard verifier scores 0 in the K-score.
- set-level (on the eval set): `score(confidences, correct) -> (value, passed)`, e.g. calibrated-brier.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, ClassVar

import jsonschema

from kolm_ray.artifact.spec import CONFIDENCE_FIELD, FALLBACK_FIELD, Spec, VerifierSpec, check_vocabulary
from kolm_ray.errors import KolmError

DEFAULT_THRESHOLD = 0.7  # confidence below this routes broad (the recall router's default)


class Verifier:
    name: ClassVar[str]
    hard: ClassVar[bool] = True
    doc: ClassVar[str] = ""

    def __init__(self, vspec: VerifierSpec, spec: Spec):
        self.vspec = vspec
        self.spec = spec

    def check(self, output: Any, input_text: str, allowed: Sequence[str] | None = None) -> str | None:
        return None

    def score(self, confidences: Sequence[float], correct: Sequence[bool]) -> tuple[float, bool]:
        return 0.0, True


def _fields(output: Any) -> dict[str, Any]:
    return output if isinstance(output, dict) else {}


class JsonSchemaVerifier(Verifier):
    name = "json-schema"
    doc = "output validates against spec.schema"

    def __init__(self, vspec: VerifierSpec, spec: Spec):
        super().__init__(vspec, spec)
        schema = dict(spec.output_schema)
        props = schema.get("properties")
        if isinstance(props, dict):
            # confidence/fallback are added by the predictor; the schema describes the gold output.
            schema["properties"] = {**props, CONFIDENCE_FIELD: {"type": "number"}, FALLBACK_FIELD: {}}
        self._validator = jsonschema.Draft202012Validator(schema)

    def check(self, output, input_text, allowed=None):
        err = next(iter(self._validator.iter_errors(output)), None)
        return None if err is None else f"schema: {err.message}"


class ClosedVocabVerifier(Verifier):
    name = "closed-vocab"
    doc = "each listed field's value is in its declared set (--namespaces closes `namespace`)"

    def check(self, output, input_text, allowed=None):
        out = _fields(output)
        for field, values in self.spec.vocab().items():
            if field in out and out[field] not in values:
                return f"{field}={out[field]!r} not in the closed vocabulary"
        return None


class ByteGroundedVerifier(Verifier):
    name = "byte-grounded"
    doc = "string values (of the listed fields, else all) occur verbatim in the input"

    def check(self, output, input_text, allowed=None):
        fields = set(self.vspec.fields) if isinstance(self.vspec.fields, list) else None
        return self._check(_fields(output), input_text, fields, "", False)

    def _check(self, obj: dict, input_text: str, fields: set[str] | None, prefix: str, covered: bool):
        """Nested objects too: `slots` in `fields` covers every string under it, `slots.city` that one."""
        for key, value in obj.items():
            if not prefix and key in (CONFIDENCE_FIELD, FALLBACK_FIELD):
                continue
            name = prefix + key
            listed = covered or fields is None or name in fields
            if isinstance(value, dict):
                reason = self._check(value, input_text, fields, name + ".", listed)
                if reason:
                    return reason
            elif listed and isinstance(value, str) and value and value not in input_text:
                return f"{name}={value!r} does not occur in the input"
        return None


class NumericRangeVerifier(Verifier):
    name = "numeric-range"
    doc = "numeric fields lie within [min, max] (from `fields`, else the schema's minimum/maximum)"

    def _ranges(self) -> dict[str, tuple[float, float]]:
        if isinstance(self.vspec.fields, dict):
            return {k: (float(v[0]), float(v[1])) for k, v in self.vspec.fields.items()}
        props = self.spec.output_schema.get("properties", {})
        return {
            k: (p.get("minimum", -math.inf), p.get("maximum", math.inf))
            for k, p in props.items()
            if isinstance(p, dict) and ("minimum" in p or "maximum" in p)
        }

    def check(self, output, input_text, allowed=None):
        out = _fields(output)
        for field, (lo, hi) in self._ranges().items():
            v = out.get(field)
            if isinstance(v, (int, float)) and not isinstance(v, bool) and not lo <= v <= hi:
                return f"{field}={v} outside [{lo}, {hi}]"
        return None


class CalibratedBrierVerifier(Verifier):
    name = "calibrated-brier"
    hard = False
    doc = "on eval, mean (confidence - 1[prediction right])^2 <= T  (write calibrated-brier=T)"

    def score(self, confidences, correct):
        if not confidences:
            return 0.0, True
        brier = sum((c - float(r)) ** 2 for c, r in zip(confidences, correct, strict=True)) / len(confidences)
        return brier, brier <= float(self.vspec.threshold)


class FallbackBroadVerifier(Verifier):
    name = "low-confidence-fallback-broad"
    doc = "confidence below the threshold (default 0.7) implies fallback 'broad'"

    def check(self, output, input_text, allowed=None):
        out = _fields(output)
        if CONFIDENCE_FIELD not in out:
            return None
        threshold = self.vspec.threshold if self.vspec.threshold is not None else DEFAULT_THRESHOLD
        if out[CONFIDENCE_FIELD] < threshold and out.get(FALLBACK_FIELD) != "broad":
            return f"confidence {out[CONFIDENCE_FIELD]:.2f} < {threshold} but fallback is not 'broad'"
        return None


class TenantAuthorizedVerifier(Verifier):
    name = "tenant-authorized"
    doc = "serve time: the namespace is in the tenant's authorized list"

    def check(self, output, input_text, allowed=None):
        ns = _fields(output).get("namespace")
        if allowed is not None and ns is not None and ns not in allowed:
            return f"namespace {ns!r} is not authorized for this tenant"
        return None


VERIFIERS: dict[str, type[Verifier]] = {
    v.name: v
    for v in (
        JsonSchemaVerifier,
        ClosedVocabVerifier,
        ByteGroundedVerifier,
        NumericRangeVerifier,
        CalibratedBrierVerifier,
        FallbackBroadVerifier,
        TenantAuthorizedVerifier,
    )
}


def known() -> str:
    return ", ".join(VERIFIERS)


def parse_verifier_list(text: str) -> list[VerifierSpec]:
    """Parse the CLI form `closed-vocab,calibrated-brier=0.10` into verifier specs."""
    specs = []
    for item in (s.strip() for s in text.split(",")):
        if not item:
            continue
        name, _, arg = item.partition("=")
        if name not in VERIFIERS:
            raise KolmError(f"unknown verifier {name!r}; known: {known()}")
        threshold = None
        if arg:
            try:
                threshold = float(arg)
            except ValueError:
                raise KolmError(f"verifier {name!r} takes a number after '=', got {arg!r}") from None
            if not 0 <= threshold <= 1:
                raise KolmError(f"verifier {name!r}: threshold {threshold} is not in [0, 1]")
        if name == "calibrated-brier" and threshold is None:
            raise KolmError("calibrated-brier needs a threshold: calibrated-brier=0.10")
        if any(v.name == name for v in specs):
            raise KolmError(f"verifier {name!r} is listed twice")
        specs.append(VerifierSpec(name=name, threshold=threshold))
    if not specs:
        raise KolmError(f"--verifier lists no verifier; known: {known()}")
    return specs


def check_verifier_specs(spec: Spec, source: str = "spec") -> None:
    problems = [f"unknown verifier {v.name!r}" for v in spec.verifier if v.name not in VERIFIERS]
    if problems:
        raise KolmError(f"{source}: " + "; ".join(problems) + f"; known: {known()}")
    check_vocabulary(spec, source)


def build(spec: Spec) -> list[Verifier]:
    """Instantiate every verifier in the spec (raises KolmError on an unknown name)."""
    check_verifier_specs(spec)
    return [VERIFIERS[v.name](v, spec) for v in spec.verifier]


def hard_failures(
    verifiers: Sequence[Verifier], output: Any, input_text: str, allowed: Sequence[str] | None = None
) -> list[str]:
    """Reasons the output fails the hard verifiers (empty list: it passes)."""
    reasons = []
    for v in verifiers:
        if v.hard:
            reason = v.check(output, input_text, allowed)
            if reason:
                reasons.append(f"{v.name}: {reason}")
    return reasons
