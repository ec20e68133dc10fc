"""The Observation: one frontier-API call (or one imported example) as the rest of kolm sees it.

    {"id", "namespace", "tenant", "provider": "openai"|"anthropic"|"import"|"local", "model", "input", "output",
     "verified": true|false|null, "status", "latency_ms", "usage", "created_at", "request", "key_id"}

`status` is the HTTP status the client got (499 when the client went away mid-stream, the nginx
convention; null for imports); `latency_ms` is the upstream's time to the last byte.
"""

from __future__ import annotations

import json
import math
import re
import uuid
from datetime import datetime, timezone
from typing import Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    StrictBool,
    ValidationError,
    field_validator,
    model_serializer,
)

Provider = Literal["openai", "anthropic", "import", "local"]  # local: answered by a promoted model
Omitted = Literal["request", "response", "all"]  # X-Kolm-Omit: the side whose text is not stored
# fullmatch, never match with `$`: `$` also matches before a trailing newline ("support\n" would pass)
NAMESPACE_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.:\-]{0,127}")
# Deepest JSON kolm stores. pydantic cannot serialize past ~255 levels, so a deeper row, once stored, would
# break every bridge page that holds it; real requests (messages, tool schemas) are a few levels deep.
MAX_JSON_DEPTH = 100
_SURROGATE_ESCAPE = re.compile(r"\\u[dD][89a-fA-F]")
CLIENT_CLOSED = 499  # nginx's "client closed request": a stream the client left before its end


class MalformedInput(ValueError):
    """The import body is not JSON / JSON lines at all (as opposed to well-formed rows with bad fields)."""


def new_id() -> str:
    """A fresh observation id: `obs_` + 32 hex characters (uuid4)."""
    return f"obs_{uuid.uuid4().hex}"


def utcnow() -> datetime:
    return datetime.now(timezone.utc)


def check_namespace(name: str) -> str:
    """Return `name` if it is a valid namespace (1-128 of letters, digits, `_.:-`), else raise ValueError."""
    if not isinstance(name, str) or not NAMESPACE_RE.fullmatch(name):
        raise ValueError(
            f"namespace {name!r} is not valid: use 1-128 letters, digits or _.:- (starting with a letter or digit)"
        )
    return name


class Observation(BaseModel):
    """One observation. JSON field names and meanings are the contract's (see the module docstring)."""

    model_config = ConfigDict(extra="forbid")

    id: str = Field(default_factory=new_id, min_length=1, max_length=128)
    namespace: str = "default"
    """Traffic group, from the X-Kolm-Namespace header (default `default`)."""
    tenant: str | None = Field(default=None, max_length=256)
    """From the X-Kolm-Tenant header, when sent."""
    provider: Provider = "import"
    model: str | None = None
    input: str
    """What a distilled model will see: last user text (single turn) or a rendered transcript."""
    output: Any = None
    """The assistant's text, or its parsed JSON value when the text is JSON."""
    verified: StrictBool | None = None
    """true: checked good; false: known bad (upstream error, cut-short stream); null: not judged yet."""
    status: int | None = None
    """HTTP status the client got (499: client left mid-stream); null for imports."""
    latency_ms: float | None = None
    """Upstream time to the last byte, in milliseconds."""
    usage: dict[str, Any] | None = None
    """Token usage as the provider reported it."""
    created_at: datetime = Field(default_factory=utcnow)
    request: dict[str, Any] | None = None
    """The full request body (system prompt, params) minus credentials."""
    omitted: Omitted | None = None
    """Which side's text was not stored (`X-Kolm-Omit`): such a row counts for spend, never for training."""
    key_id: str | None = Field(default=None, max_length=64)
    """The capture key the call (or bridge import) came with (`kolm keys`); null: an open proxy or an admin import."""

    @field_validator("namespace")
    @classmethod
    def _namespace(cls, v: str) -> str:
        return check_namespace(v)

    @model_serializer(mode="wrap")
    def _omitted_only_when_set(self, handler: Any) -> dict[str, Any]:
        # `omitted` appears in exports and bridge pages only on the rows it describes: the contract's
        # observation keeps its fields.
        data = handler(self)
        if data.get("omitted") is None:
            data.pop("omitted", None)
        return data

    @field_validator("created_at")
    @classmethod
    def _aware(cls, v: datetime) -> datetime:
        return v if v.tzinfo else v.replace(tzinfo=timezone.utc)


class ImportRow(BaseModel):
    """One row of an import (bridge POST or `kolm observations import`): an observation's fields, where
    `namespace`, `input` and `output` are required and the rest optional (so an export imports back)."""

    model_config = ConfigDict(extra="forbid")

    namespace: str | None = None
    input: str = Field(min_length=1)
    output: Any
    verified: StrictBool | None = None
    tenant: str | None = Field(default=None, max_length=256)
    id: str | None = Field(default=None, min_length=1, max_length=128)
    provider: Provider = "import"
    model: str | None = None
    status: int | None = Field(default=None, ge=0, le=999)  # an HTTP status; SQLite integers are 64-bit
    latency_ms: float | None = Field(default=None, ge=0, allow_inf_nan=False)
    usage: dict[str, Any] | None = None
    created_at: datetime | None = None
    request: dict[str, Any] | None = None
    omitted: Omitted | None = None
    key_id: str | None = Field(
        default=None, max_length=64
    )  # an export imports back; a key's import sets its own

    @field_validator("request")
    @classmethod
    def _no_credentials(cls, v: dict[str, Any] | None) -> dict[str, Any] | None:
        from kolm_ray.providers import scrub_credentials

        return None if v is None else scrub_credentials(v)


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON (numbers must be finite)")


def json_depth(value: Any, limit: int = MAX_JSON_DEPTH) -> int:
    """Nesting depth of a parsed JSON value (a scalar is 0), counted iteratively; stops past `limit`."""
    deepest, stack = 0, [(value, 0)]
    while stack:
        v, d = stack.pop()
        if isinstance(v, dict | list):
            d += 1
            deepest = max(deepest, d)
            if deepest > limit:
                break
            stack.extend((x, d) for x in (v.values() if isinstance(v, dict) else v))
    return deepest


def _finite(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"{text[:20]} is out of range for a JSON number kolm can store")
    return value


def loads_strict(data: bytes | str) -> Any:
    """json.loads for what kolm stores: NaN/Infinity refused (not JSON: a reader would get invalid JSON
    back), lone UTF-16 surrogate escapes refused (such a string cannot be stored as UTF-8), and so is
    nesting deeper than MAX_JSON_DEPTH.

    Raises ValueError naming the problem, UnicodeDecodeError for bytes that are not UTF-8, RecursionError
    for nesting past Python's limit.
    """
    text = data.decode("utf-8") if isinstance(data, bytes) else data
    value = json.loads(text, parse_constant=_no_constant, parse_float=_finite)
    if json_depth(value) > MAX_JSON_DEPTH:
        raise ValueError(f"nested deeper than {MAX_JSON_DEPTH} levels")
    if _SURROGATE_ESCAPE.search(text):  # rare: only then pay for the check
        try:
            json.dumps(value, ensure_ascii=False).encode("utf-8")
        except UnicodeEncodeError:
            raise ValueError(
                "a string holds a lone UTF-16 surrogate (\\ud800-\\udfff): not valid Unicode"
            ) from None
    return value


def _describe(err: ValidationError) -> str:
    parts = []
    for e in err.errors():
        loc = ".".join(str(p) for p in e["loc"]) or "row"
        parts.append(f"{loc}: {e['msg']}")
    return "; ".join(parts)


def parse_import(data: bytes | str, default_namespace: str | None = None) -> list[Observation]:
    """Parse a JSON list or JSON lines of import rows into Observations, all or nothing.

    Raises MalformedInput when the body is not JSON, else ValueError naming every bad row (up to 10) so the caller can answer 4xx and write nothing.
    """
    text = data.decode("utf-8") if isinstance(data, bytes) else data
    stripped = text.strip()
    if not stripped:
        raise MalformedInput("empty body: send a JSON list or JSON lines of {namespace, input, output}")
    rows: list[tuple[str, Any]] = []
    if stripped.startswith("["):
        try:
            items = loads_strict(stripped)
        except RecursionError:
            raise MalformedInput("malformed JSON: nested too deeply") from None
        except ValueError as e:
            raise MalformedInput(f"malformed JSON: {e}") from None
        if not isinstance(items, list):
            raise MalformedInput("expected a JSON list of objects")
        rows = [(f"row {i}", item) for i, item in enumerate(items)]
    else:
        for n, line in enumerate(text.splitlines(), start=1):
            if not line.strip():
                continue
            try:
                rows.append((f"line {n}", loads_strict(line)))
            except RecursionError:
                raise MalformedInput(f"line {n}: malformed JSON: nested too deeply") from None
            except ValueError as e:
                raise MalformedInput(f"line {n}: malformed JSON: {e}") from None
    problems: list[str] = []
    out: list[Observation] = []
    seen: set[str] = set()
    for where, item in rows:
        if not isinstance(item, dict):
            problems.append(f"{where}: expected a JSON object, got {type(item).__name__}")
            continue
        try:
            row = ImportRow.model_validate(item)
            ns = row.namespace or default_namespace
            if ns is None:
                raise ValueError("namespace: field required (or pass a default namespace)")
            fields = row.model_dump(exclude_none=True)
            fields["namespace"] = ns
            fields["verified"] = row.verified
            obs = Observation.model_validate(fields)
        except ValidationError as e:
            problems.append(f"{where}: {_describe(e)}")
            continue
        except ValueError as e:
            problems.append(f"{where}: {e}")
            continue
        if obs.id in seen:
            problems.append(f"{where}: duplicate id {obs.id!r}")
            continue
        seen.add(obs.id)
        out.append(obs)
    if problems:
        more = f" (and {len(problems) - 10} more)" if len(problems) > 10 else ""
        raise ValueError("; ".join(problems[:10]) + more)
    return out
