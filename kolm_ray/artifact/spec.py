"""The Spec: what a model's output must look like and how it is checked. One type everyone passes.

spec.json (validated against kolm-verifier-spec.schema.json, which `kolm spec-schema` prints):

    {"output_kind": "json",
     "schema": {"type": "object", "properties": {"namespace": {"enum": ["billing", "runbooks"]}}, ...},
     "verifier": [{"name": "json-schema"},
                  {"name": "closed-vocab", "fields": {"namespace": ["billing", "runbooks"]}},
                  {"name": "calibrated-brier", "threshold": 0.10}],
     "tolerance": 1e-6}
"""

from __future__ import annotations

import json
from functools import cache
from importlib import resources
from pathlib import Path
from typing import Any, Literal

import jsonschema
from pydantic import BaseModel, ConfigDict, Field

from kolm_ray.errors import KolmError, read_json_file

SCHEMA_FILE = "kolm-verifier-spec.schema.json"
CONFIDENCE_FIELD = "confidence"  # judged by calibration, never by equality
FALLBACK_FIELD = "fallback"  # derived from confidence at inference time, never trained


class VerifierSpec(BaseModel):
    """One verifier as written in spec.json: its name plus the parameters that name takes."""

    model_config = ConfigDict(extra="forbid")

    name: str
    fields: dict[str, list[Any]] | list[str] | None = None
    """closed-vocab: field -> allowed values; numeric-range: field -> [min, max]; byte-grounded: field names."""
    threshold: float | None = None
    """calibrated-brier: max Brier score; low-confidence-fallback-broad: min confidence to stay narrow."""


class Spec(BaseModel):
    """Output kind, JSON schema of the output, and the verifiers that judge it."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    output_kind: Literal["json", "text"]
    """json: outputs are JSON values checked field by field; text: free text compared after whitespace normalisation."""
    output_schema: dict[str, Any] = Field(default_factory=dict, alias="schema")
    """JSON Schema of the output value (empty for text)."""
    verifier: list[VerifierSpec] = Field(default_factory=list)
    tolerance: float = 1e-6
    """Absolute tolerance when comparing numbers in the K-score."""

    def to_json(self) -> dict[str, Any]:
        return self.model_dump(by_alias=True, exclude_none=True)

    def get(self, name: str) -> VerifierSpec | None:
        return next((v for v in self.verifier if v.name == name), None)

    def vocab(self) -> dict[str, list[Any]]:
        """Closed vocabularies per field: closed-vocab's own `fields`, else the schema's enums."""
        cv = self.get("closed-vocab")
        if cv is not None and isinstance(cv.fields, dict) and cv.fields:
            return {k: list(v) for k, v in cv.fields.items()}
        props = self.output_schema.get("properties", {}) if isinstance(self.output_schema, dict) else {}
        return {k: list(p["enum"]) for k, p in props.items() if isinstance(p, dict) and "enum" in p}


@cache
def spec_json_schema() -> dict[str, Any]:
    """The published JSON Schema for spec.json, shipped inside the package."""
    return json.loads(resources.files("kolm_ray.artifact").joinpath(SCHEMA_FILE).read_text())


def validate_spec(data: Any, source: str = "spec") -> Spec:
    """Validate a spec dict against the published schema (whose verifier names are the verifier table's:
    tests/test_spec.py holds them equal) and its own rules; all schema problems at once."""
    validator = jsonschema.Draft202012Validator(spec_json_schema())
    problems = [
        f"{'/'.join(map(str, e.absolute_path)) or '(root)'}: {e.message}" for e in validator.iter_errors(data)
    ]
    if problems:
        raise KolmError(f"{source} is not a valid spec: " + "; ".join(sorted(problems)))
    spec = Spec.model_validate(data)
    check_vocabulary(spec, source)
    return spec


def check_vocabulary(spec: Spec, source: str = "spec") -> None:
    """closed-vocab needs a vocabulary to check against: its own `fields`, or the schema's enums."""
    if spec.get("closed-vocab") and not spec.vocab():
        raise KolmError(
            f"{source}: closed-vocab needs a vocabulary (--namespaces, `fields`, or schema enums)"
        )


def load_spec(path: str | Path) -> Spec:
    return validate_spec(read_json_file(path), str(path))


def spec_schema_command(args) -> int:
    """kolm spec-schema: print the JSON Schema that every spec.json follows."""
    print(json.dumps(spec_json_schema(), indent=2))
    return 0
