"""What an encoder extractor predicts, read from a spec and the observed outputs (no torch here: recipe and
compile's validation read it before anything loads).

    layout = extraction_layout(spec, outputs)      # KolmError when some field cannot be extracted
    layout["fields"]   # [{"path": ["slots", "city"], "kind": "span", "type": "string", "missing": "absent"},
                       #  {"path": ["intent"], "kind": "class", "values": [...], "absent": False}, ...]
    build_output(layout, {("intent",): "GetWeather", ("slots", "city"): "Paris"})
    # {"intent": "GetWeather", "slots": {"city": "Paris"}}   (schema order; absent keys stay absent)

A field is a *span* when its values are strings (or numbers) the spec's byte-grounded verifier covers: the
answer is then a span of the input, cut out by character offsets, so it is always an exact substring.
A field is a *class* when the spec closes its vocabulary (an enum, closed-vocab, a boolean, or only null).
A nested object of such fields (one level: `{"intent", "slots": {...}}`) is a *container*: it is answered
with the keys whose values were found, and always when every observed output had it. When a span field has
no value, it is left out or set to null, whichever the observed outputs did more often for that field
(`missing`); a class field that some outputs lack learns "absent" as one more class.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from kolm_ray.errors import KolmError

EXTRACTOR_FILE = "extractor.json"  # the artifact's layout + max_len
ABSENT = object()  # a field the answer leaves out


def _grounded_names(spec) -> set[str] | None:
    """Dotted names the byte-grounded verifier covers (a name covers everything below it); None: all."""
    v = spec.get("byte-grounded")
    if v is None:
        return set()
    return set(v.fields) if isinstance(v.fields, list) else None


def _covered(path: Sequence[str], names: set[str] | None) -> bool:
    if names is None:
        return True
    return any(".".join(path[: i + 1]) in names for i in range(len(path)))


def _types(prop: dict[str, Any]) -> set[str]:
    t = prop.get("type")
    if isinstance(t, str):
        return {t}
    if isinstance(t, list):
        return set(t)
    if "anyOf" in prop:
        return {x for p in prop["anyOf"] if isinstance(p, dict) for x in _types(p)}
    return set()


def _get(output: Any, path: Sequence[str]) -> Any:
    for key in path:
        if not isinstance(output, dict) or key not in output:
            return ABSENT
        output = output[key]
    return output


def extraction_layout(spec, outputs: Sequence[Any]) -> dict[str, Any]:
    """The extractor's fields from a JSON-object spec; KolmError naming the fields it cannot extract."""
    schema = spec.output_schema if spec.output_kind == "json" else {}
    props = schema.get("properties") if isinstance(schema, dict) and schema.get("type") == "object" else None
    if not isinstance(props, dict) or not props:
        raise KolmError("an encoder extractor needs JSON-object outputs (a schema with properties)")
    vocab = spec.vocab()
    grounded = _grounded_names(spec)
    fields: list[dict[str, Any]] = []
    containers: dict[str, dict[str, Any]] = {}
    order: dict[str, Any] = {}
    problems: list[str] = []
    objs = [o for o in outputs if isinstance(o, dict)]

    def leaf(path: list[str], prop: dict[str, Any]) -> dict[str, Any] | None:
        name = ".".join(path)
        values = [_get(o, path) for o in objs]
        present = [v for v in values if v is not ABSENT]
        absent = len(present) < len(values)
        types = _types(prop)
        enum = vocab.get(name) if len(path) == 1 else None
        enum = enum if enum is not None else prop.get("enum")
        if enum is not None:
            vals = list(enum)
            if any(v is None for v in present) and None not in vals:
                vals.append(None)
            return {"path": path, "kind": "class", "values": vals, "absent": absent}
        if types and types <= {"boolean", "null"}:
            vals = [False, True] if "boolean" in types else []
            if "null" in types or any(v is None for v in present):
                vals.append(None)
            return {"path": path, "kind": "class", "values": vals, "absent": absent}
        scalar = types - {"null"}
        if scalar and scalar <= {"string", "number", "integer"} and _covered(path, grounded):
            nulls = sum(v is None for v in present)
            kind = "string" if "string" in scalar else ("integer" if scalar == {"integer"} else "number")
            return {
                "path": path,
                "kind": "span",
                "type": kind,
                "missing": "null" if nulls > len(values) - len(present) else "absent",
            }
        problems.append(f"{name} ({'/'.join(sorted(types)) or 'untyped'}, not grounded in the input)")
        return None

    for key, prop in props.items():
        prop = prop if isinstance(prop, dict) else {}
        sub = prop.get("properties")
        if "object" in _types(prop) and isinstance(sub, dict):
            order[key] = {}
            seen = [_get(o, [key]) for o in objs]
            containers[key] = {"always": bool(seen) and all(isinstance(v, dict) for v in seen)}
            for skey, sprop in sub.items():
                if isinstance(sprop, dict) and "object" in _types(sprop):
                    problems.append(f"{key}.{skey} (an object two levels down)")
                    continue
                f = leaf([key, skey], sprop if isinstance(sprop, dict) else {})
                if f is not None:
                    fields.append(f)
                    order[key][skey] = None
            continue
        f = leaf([key], prop)
        if f is not None:
            fields.append(f)
            order[key] = None
    if problems:
        raise KolmError(
            "an encoder extractor answers categorical, boolean or null fields and strings or numbers that "
            "occur verbatim in the input; these fields are neither: "
            + ", ".join(problems)
            + " (use a causal-LM base such as qwen2.5-coder-0.5b)"
        )
    if not any(f["kind"] == "span" for f in fields):
        raise KolmError(
            "no field is grounded in the input: an encoder tagger (closed vocabulary) fits these outputs"
        )
    return {"fields": fields, "containers": containers, "order": order}


def spans(layout: dict[str, Any]) -> list[dict[str, Any]]:
    return [f for f in layout["fields"] if f["kind"] == "span"]


def classes(layout: dict[str, Any]) -> list[dict[str, Any]]:
    return [f for f in layout["fields"] if f["kind"] == "class"]


def class_index(field: dict[str, Any], value: Any) -> int:
    """The class id of a value (len(values) = absent), -1 when the value is not among them."""
    import json

    if value is ABSENT:
        return len(field["values"]) if field["absent"] else -1
    key = json.dumps(value, sort_keys=True)
    for i, v in enumerate(field["values"]):
        if json.dumps(v, sort_keys=True) == key:
            return i
    return -1


def span_text(value: Any) -> str | None:
    """The text a span field's gold value must be found as in the input (None: no span)."""
    if value is ABSENT or value is None or isinstance(value, bool):
        return None
    if isinstance(value, (int, float)):
        return str(value)
    if isinstance(value, str) and value:
        return value
    return None


def span_value(field: dict[str, Any], text: str | None) -> Any:
    """A decoded span -> the field's value (a number field parses it); ABSENT/None when there is none."""
    missing = ABSENT if field["missing"] == "absent" else None
    if text is None or not text:
        return missing
    if field["type"] == "string":
        return text
    try:
        number = float(text.replace(",", ""))
    except ValueError:
        return missing
    if field["type"] == "integer" or (number.is_integer() and "." not in text):
        return int(number)
    return number


def build_output(layout: dict[str, Any], values: dict[tuple[str, ...], Any]) -> dict[str, Any]:
    """Assemble an answer in the schema's order; ABSENT values are left out, empty containers too unless
    every observed output had them."""
    out: dict[str, Any] = {}
    for key, sub in layout["order"].items():
        if sub is None:
            v = values.get((key,), ABSENT)
            if v is not ABSENT:
                out[key] = v
            continue
        inner = {}
        for skey in sub:
            v = values.get((key, skey), ABSENT)
            if v is not ABSENT:
                inner[skey] = v
        if inner or layout["containers"].get(key, {}).get("always"):
            out[key] = inner
    return out
