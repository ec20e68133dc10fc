"""What the outputs look like: their common shape, a JSON Schema (genson plus enums, ranges and
`required`), per-field statistics, and the verifiers that follow from them.

    shape = infer_shape(outputs, inputs)     # raises KolmError when there is no common shape
    shape.schema, shape.fields, shape.conforms(output)
    verifiers, reasons = choose_verifiers(shape)
"""

from __future__ import annotations

import json
import math
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Literal

import jsonschema
from genson import SchemaBuilder

from kolm_ray.artifact.spec import CONFIDENCE_FIELD, VerifierSpec
from kolm_ray.errors import KolmError

REQUIRED_SHARE = 0.95  # a field present in at least this share of outputs is `required`
COMMON_SHARE = 0.8  # the dominant output type must cover this share, else "no common shape"
FIELD_SHARE = 0.5  # ... and at least one field must occur in this share of object outputs
GROUNDED_SHARE = 0.9  # byte-grounded when this share of a field's strings occur verbatim in the input
EXTRACT_SHARE = (
    0.95  # an encoder extractor cuts a field out of the input when this share of its values are there
)
MAX_ENUM = 200  # a string field with more distinct values than this is never categorical
ENUM_RATIO = 0.2  # ... nor one whose distinct values exceed this share of its occurrences
CONFIDENCE_NAMES = {CONFIDENCE_FIELD, "score", "probability", "prob", "certainty"}
FALLBACK_THRESHOLD = 0.7  # the recall router's default: below it a namespace tagger answers broad

FieldKind = Literal["categorical", "extractive", "numeric", "confidence", "text", "object", "other"]


@dataclass
class FieldStats:
    """What one output field holds across the cluster."""

    name: str
    present: float
    """Share of object outputs that have this field."""
    kind: FieldKind
    distinct: int
    values: list[Any] = field(default_factory=list)
    """Categorical fields: the allowed values, most frequent first."""
    counts: dict[str, int] = field(default_factory=dict)
    """Categorical fields: value (as JSON) -> how many outputs hold it."""
    grounded: float | None = None
    """String fields: share of values that occur verbatim in their input."""
    minimum: float | None = None
    maximum: float | None = None
    nulls: float | None = None
    """Share of the field's values that are null (typed by the others)."""
    subfields: dict[str, FieldStats] = field(default_factory=dict)
    """Nested objects (kind "object"): their fields, `present` relative to the objects."""

    @property
    def spannable(self) -> bool:
        """A string or number that occurs verbatim in the input for >= EXTRACT_SHARE of its non-null values."""
        return self.kind in ("extractive", "numeric") and (self.grounded or 0.0) >= EXTRACT_SHARE

    def to_json(self) -> dict[str, Any]:
        d = {k: v for k, v in self.__dict__.items() if v is not None and v != [] and v != {}}
        d.pop("counts", None)
        if self.subfields:
            d["subfields"] = {n: f.to_json() for n, f in self.subfields.items()}
        if self.kind == "categorical":
            d["top"] = dict(Counter(self.counts).most_common(10))
        return d


@dataclass
class Shape:
    """The outputs' common shape: kind, schema and per-field statistics."""

    output_kind: Literal["json", "text"]
    top_type: str
    """object, array, string, number, integer, boolean (JSON kind) or text."""
    schema: dict[str, Any]
    fields: dict[str, FieldStats]
    type_shares: dict[str, float]
    _validator: Any = None

    def conforms(self, output: Any) -> str | None:
        """None when the output fits the shape, else why not."""
        if self.output_kind == "text":
            if not isinstance(output, str):
                return f"expected text, got {json_type(output)}"
            return None if output.strip() else "empty text output"
        if self._validator is None:
            self._validator = jsonschema.Draft202012Validator(self.schema)
        err = next(iter(self._validator.iter_errors(output)), None)
        return None if err is None else f"does not match the inferred schema: {err.message}"

    @property
    def categorical(self) -> list[str]:
        return [n for n, f in self.fields.items() if f.kind == "categorical"]

    @property
    def label_fields(self) -> list[str]:
        """Fields a classifier predicts: categorical fields that are (nearly) always present."""
        return [n for n in self.categorical if self.fields[n].present >= REQUIRED_SHARE]

    @property
    def closed(self) -> bool:
        """True when every field other than confidence is categorical: a tagger (encoder) can learn it."""
        if self.output_kind != "json" or self.top_type != "object" or not self.fields:
            return False
        return all(f.kind in ("categorical", "confidence") for f in self.fields.values()) and bool(
            self.categorical
        )

    def extraction(self) -> tuple[list[str], list[str], list[str]]:
        """(span fields, class fields, fields neither can answer), nested ones as `parent.child`: what an
        encoder extractor would predict (CONTRACT "Extraction models that run on a CPU")."""
        span, cls, bad = [], [], []

        def visit(name: str, f: FieldStats, depth: int) -> None:
            if f.kind == "confidence":
                return
            if f.kind == "categorical":
                cls.append(name)
            elif f.spannable:
                span.append(name)
            elif f.kind == "object" and depth == 0 and f.subfields:
                for sub, sf in f.subfields.items():
                    visit(f"{name}.{sub}", sf, 1)
            else:
                bad.append(name)

        if self.output_kind == "json" and self.top_type == "object":
            for n, f in self.fields.items():
                visit(n, f, 0)
        return span, cls, bad

    @property
    def extractable(self) -> bool:
        """Not closed, yet every field is categorical, boolean, null or grounded in the input (an extractor)."""
        span, _, bad = self.extraction()
        return not self.closed and bool(span) and not bad


def json_type(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int):
        return "integer"
    if isinstance(value, float):
        return "number"
    if isinstance(value, str):
        return "string"
    if isinstance(value, list):
        return "array"
    if isinstance(value, dict):
        return "object"
    return type(value).__name__


def _key(value: Any) -> str:
    return json.dumps(value, sort_keys=True, ensure_ascii=False)


def infer_shape(outputs: list[Any], inputs: list[str]) -> Shape:
    """Infer the common shape of the outputs; KolmError when they share none."""
    if not outputs:
        raise KolmError("no outputs to infer a schema from")
    types = Counter("text" if isinstance(o, str) else json_type(o) for o in outputs)
    shares = {t: round(c / len(outputs), 4) for t, c in types.most_common()}
    top, top_n = types.most_common(1)[0]
    if top_n / len(outputs) < COMMON_SHARE:
        listed = ", ".join(f"{t} {s:.0%}" for t, s in shares.items())
        raise KolmError(
            f"outputs have no common shape ({listed}); cluster the namespace or clean the outputs"
        )
    if top == "text":
        return Shape("text", "text", {}, {}, shares)
    if top in ("integer", "number"):
        top = "number" if "number" in types else top
    conforming = [(o, i) for o, i in zip(outputs, inputs, strict=True) if _matches_top(o, top)]
    builder = SchemaBuilder(schema_uri="https://json-schema.org/draft/2020-12/schema")
    for o, _ in conforming:
        builder.add_object(o)
    schema = builder.to_schema()
    fields: dict[str, FieldStats] = {}
    if top == "object":
        fields = _object_fields(conforming)
        common = max((f.present for f in fields.values()), default=0.0)
        if common < FIELD_SHARE:
            top_fields = ", ".join(
                f"{n!r} {f.present:.0%}" for n, f in sorted(fields.items(), key=lambda x: -x[1].present)[:5]
            )
            raise KolmError(
                f"outputs have no common shape: no field occurs in at least half of the JSON objects ({top_fields})"
            )
        props = schema.setdefault("properties", {})
        for name, f in fields.items():
            _refine(props.setdefault(name, {}), f)
        schema["required"] = sorted(n for n, f in fields.items() if f.present >= REQUIRED_SHARE)
        schema["additionalProperties"] = False
    elif top == "string":
        # a bare JSON string (rare: text outputs arrive as text); categorical when few values
        f = _field_stats("(value)", [(o, i) for o, i in conforming], len(conforming))
        _refine(schema, f)
    return Shape("json", top, schema, fields, shares)


def _matches_top(value: Any, top: str) -> bool:
    t = json_type(value)
    return t == top or (top == "number" and t == "integer") or (top == "string" and isinstance(value, str))


def _object_fields(conforming: list[tuple[Any, str]]) -> dict[str, FieldStats]:
    n = len(conforming)
    names: Counter = Counter(k for o, _ in conforming for k in o)
    return {
        name: _field_stats(name, [(o[name], i) for o, i in conforming if name in o], n)
        for name in sorted(names, key=lambda k: (-names[k], k))
    }


def _field_stats(name: str, values: list[tuple[Any, str]], n_outputs: int) -> FieldStats:
    present = len(values) / max(n_outputs, 1)
    counts = Counter(_key(v) for v, _ in values)
    stats = FieldStats(name, round(present, 4), "other", len(counts))
    nonnull = [(v, i) for v, i in values if v is not None]
    if len(nonnull) < len(values):
        stats.nulls = round(1 - len(nonnull) / len(values), 4)
    if not nonnull:  # always null: one value
        stats.kind, stats.values, stats.counts = "categorical", [None], dict(counts)
        return stats
    vals = [v for v, _ in nonnull]
    types = {json_type(v) for v in vals}
    if types <= {"integer", "number"}:
        nums = [float(v) for v in vals]
        stats.minimum, stats.maximum = min(nums), max(nums)
        is_conf = name.lower() in CONFIDENCE_NAMES and 0.0 <= stats.minimum and stats.maximum <= 1.0
        stats.kind = "confidence" if is_conf else "numeric"
        stats.grounded = round(sum(1 for v, i in nonnull if _num_text(v) in i) / len(nonnull), 4)
        return stats
    if types == {"boolean"}:
        stats.kind, stats.values = "categorical", [False, True] + ([None] if stats.nulls else [])
        stats.counts = dict(counts)
        return stats
    if types == {"object"}:
        stats.kind = "object"
        stats.subfields = _object_fields(nonnull)
        return stats
    if types == {"string"}:
        grounded = sum(1 for v, i in nonnull if v and v in i) / len(nonnull)
        stats.grounded = round(grounded, 4)
        few = len(counts) <= MAX_ENUM and len(counts) <= max(2, ENUM_RATIO * len(values))
        if few and grounded < GROUNDED_SHARE:
            stats.kind = "categorical"
            stats.values = [json.loads(k) for k, _ in counts.most_common()]
            stats.counts = dict(counts)
        elif grounded >= GROUNDED_SHARE:
            stats.kind = "extractive"
        else:
            stats.kind = "text"
    return stats


def _num_text(v: Any) -> str:
    return str(v)  # the number as JSON writes it: an extractor's span must read back as this value


def _refine(prop: dict[str, Any], f: FieldStats) -> None:
    if f.kind == "object":
        sub = prop.setdefault("properties", {})
        for n, sf in f.subfields.items():
            _refine(sub.setdefault(n, {}), sf)
        return
    if f.kind == "categorical":
        prop.clear()
        prop["enum"] = sorted(f.values, key=_key)
    elif f.kind in ("numeric", "confidence"):
        lo, hi = (0.0, 1.0) if f.kind == "confidence" else (f.minimum, f.maximum)
        prop["minimum"], prop["maximum"] = _num(lo), _num(hi)


def _num(x: float | None) -> float | int | None:
    if x is None or not math.isfinite(x):
        return None
    return int(x) if float(x).is_integer() else x


def choose_verifiers(
    shape: Shape, purity: float = 1.0, model_confidence: str | None = None
) -> tuple[list[VerifierSpec], dict[str, str]]:
    """The verifiers that fit this shape, and one line per verifier saying why it was chosen.

    model_confidence: the name of a confidence field taken out of the gold outputs because the model
    (a tagger) computes its own; calibrated-brier then judges that one.
    """
    specs: list[VerifierSpec] = []
    why: dict[str, str] = {}
    if shape.output_kind == "text":
        return specs, {
            "(none)": "text outputs: compared after whitespace normalisation; no field verifier applies"
        }
    specs.append(VerifierSpec(name="json-schema"))
    why["json-schema"] = (
        f"outputs are JSON ({shape.top_type}); the schema was inferred with genson from the cluster"
    )
    cat = {n: f.values for n, f in shape.fields.items() if f.kind == "categorical"}
    if cat:
        specs.append(VerifierSpec(name="closed-vocab", fields=cat))
        why["closed-vocab"] = "categorical fields: " + ", ".join(
            f"{n} ({len(v)} values)" for n, v in cat.items()
        )
    grounded = {n: f.grounded for n, f in shape.fields.items() if f.kind == "extractive"}
    # A nested object whose strings are all grounded (an extractor's `slots`), and numbers an extractor
    # cuts out of the input: the verifier covers them too (it checks strings, nested ones under a listed name).
    span = shape.extraction()[0]
    if shape.extractable:
        for n, f in shape.fields.items():
            if f.kind == "numeric" and n in span:
                grounded[n] = f.grounded
            elif f.kind == "object" and any(s.startswith(n + ".") for s in span):
                subs = {f"{n}.{k}": sf for k, sf in f.subfields.items() if f"{n}.{k}" in span}
                if len(subs) == len(
                    f.subfields
                ):  # every nested value grounded: the object's name covers them
                    grounded[n] = min(sf.grounded or 0.0 for sf in subs.values())
                else:
                    grounded.update({k: sf.grounded for k, sf in subs.items()})
    if grounded:
        specs.append(VerifierSpec(name="byte-grounded", fields=list(grounded)))
        why["byte-grounded"] = "string values occur verbatim in their inputs: " + ", ".join(
            f"{n} ({g or 0.0:.0%})" for n, g in grounded.items()
        )
    ranges = {
        n: [_num(f.minimum), _num(f.maximum)] if f.kind == "numeric" else [0, 1]
        for n, f in shape.fields.items()
        if f.kind in ("numeric", "confidence")
    }
    if ranges:
        specs.append(VerifierSpec(name="numeric-range", fields=ranges))
        why["numeric-range"] = "numeric fields within their observed ranges: " + ", ".join(
            f"{n} in [{lo}, {hi}]" for n, (lo, hi) in ranges.items()
        )
    conf = [n for n, f in shape.fields.items() if f.kind == "confidence"] or (
        [model_confidence] if model_confidence else []
    )
    if conf:
        # A calibrated model's Brier score is about E[c(1-c)], at most p(1-p) for accuracy p; the margin
        # lets a model as good as the data pass.
        threshold = round(min(0.25, max(0.05, purity * (1 - purity) + 0.06)), 2)
        specs.append(VerifierSpec(name="calibrated-brier", threshold=threshold))
        why["calibrated-brier"] = (
            f"confidence-shaped field {conf[0]!r} in [0, 1]; threshold {threshold} = purity*(1-purity) + 0.06"
        )
    if "namespace" in cat:
        specs.append(VerifierSpec(name="low-confidence-fallback-broad", threshold=FALLBACK_THRESHOLD))
        why["low-confidence-fallback-broad"] = (
            f"a namespace tagger: below confidence {FALLBACK_THRESHOLD} the router searches every namespace"
        )
        specs.append(VerifierSpec(name="tenant-authorized"))
        why["tenant-authorized"] = (
            "a namespace tagger: at serve time only the tenant's namespaces may be named"
        )
    return specs, why


def labels_for(shape: Shape, outputs: list[Any]) -> dict[str, list[Any]]:
    """Per-pair labels a classifier can be cross-validated on (confident learning); {} when none."""
    if shape.output_kind == "text":
        distinct = len({o for o in outputs if isinstance(o, str)})
        return {"(text)": outputs} if distinct <= max(2, ENUM_RATIO * len(outputs)) else {}
    if shape.top_type == "object":
        per_field = {f: [o.get(f) for o in outputs] for f in shape.label_fields}
        if len(per_field) > 1:
            joint = [{f: o.get(f) for f in per_field} for o in outputs]
            n_joint = len({_key(j) for j in joint})
            if n_joint <= 1.5 * max(len({_key(v) for v in vals}) for vals in per_field.values()):
                # Dependent fields (a domain implied by the intent): one joint label, so a wrong intent
                # with its matching domain counts as one error, not two.
                return {"+".join(per_field): joint}
        return per_field
    if shape.schema.get("enum"):
        return {"(value)": outputs}
    return {}


def strip_confidence(shape: Shape, outputs: list[Any]) -> tuple[str | None, list[Any]]:
    """Take confidence-shaped fields out of the shape and the outputs (a tagger answers its own confidence,
    judged by calibration, so the frontier model's number is no training target). Returns (field, outputs)."""
    names = [n for n, f in shape.fields.items() if f.kind == "confidence"]
    if not names or shape.top_type != "object":
        return None, outputs
    for n in names:
        shape.fields.pop(n)
        shape.schema.get("properties", {}).pop(n, None)
        if n in shape.schema.get("required", []):
            shape.schema["required"].remove(n)
    shape._validator = None
    drop = set(names)
    return names[0], [
        {k: v for k, v in o.items() if k not in drop} if isinstance(o, dict) else o for o in outputs
    ]
