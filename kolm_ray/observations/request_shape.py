"""The request shape a model was compiled for: the system prompt and response format of its cluster.

    shape = shape_of_request(request_json)   # {"system_prompt", "response_format", "turns"}
    shape_key(shape)                          # 12 hex chars; equal keys: the model may answer

The same signals clustering fingerprints a request by (system_prompt, response_format below, and the
prompt normalisation: digits and whitespace do not make a new task), so "the recipe's cluster" and "a
request this model may answer" mean the same thing. `turns` is "single" when the model only ever saw the
last user message of single-turn calls: a multi-turn conversation is another input rendering and goes
upstream.
"""

from __future__ import annotations

import hashlib
import re
from collections import Counter
from typing import Any

EMPTY_SHAPE = {"system_prompt": "", "response_format": "", "turns": "single"}
"""What an artifact compiled from plain pairs (no recipe, so no captured requests) answers: calls with no
system prompt, no response format, one user turn."""


def _text_of(content: Any) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):  # content blocks: [{"type": "text", "text": ...}]
        return " ".join(b.get("text", "") for b in content if isinstance(b, dict))
    return ""


def system_prompt(request: dict | None) -> str:
    """The system prompt of an OpenAI (system/developer messages) or Anthropic (`system`) request."""
    if not isinstance(request, dict):
        return ""
    parts = [_text_of(request.get("system"))]
    for m in request.get("messages") or []:
        if isinstance(m, dict) and m.get("role") in ("system", "developer"):
            parts.append(_text_of(m.get("content")))
    return " ".join(p for p in parts if p)


def response_format(request: dict | None) -> str:
    """The requested output format: OpenAI response_format (type + schema keys), Anthropic tools/tool_choice."""
    if not isinstance(request, dict):
        return ""
    rf = request.get("response_format")
    parts = []
    if isinstance(rf, dict):
        parts.append(str(rf.get("type", "")))
        schema = (
            (rf.get("json_schema") or {}).get("schema") if isinstance(rf.get("json_schema"), dict) else None
        )
        if isinstance(schema, dict):
            parts.append(",".join(sorted((schema.get("properties") or {}).keys())))
    tools = request.get("tools")
    if isinstance(tools, list):
        parts.append(
            "tools:"
            + ",".join(sorted(str(t.get("name", t.get("type", ""))) for t in tools if isinstance(t, dict)))
        )
    return "|".join(parts)


def _normalize_prompt(text: str) -> str:
    # Templated prompts differ in dates, counts and ids: digits and whitespace do not make a new task.
    return re.sub(r"\s+", " ", re.sub(r"\d+", "0", text.lower())).strip()


def turns_of(request: dict | None) -> str:
    """ "single" for one user turn (system prompts aside) or no request at all (an import), else "multi"."""
    if not isinstance(request, dict):
        return "single"
    turns = [
        m
        for m in request.get("messages") or []
        if isinstance(m, dict) and m.get("role") not in ("system", "developer")
    ]
    return "single" if len(turns) == 1 and turns[0].get("role") == "user" else "multi"


# Instructions in the user turn (one app, one system prompt, several tasks): a cluster whose calls all
# open with a few phrasings of an instruction answers only calls that open with one of them.
TEMPLATE_WORDS = 16  # an instruction longer than this is matched on its first 16 words
TEMPLATE_SHARE = 0.05  # a phrasing opens at least this share of the cluster's calls (and 5 of them)
TEMPLATE_COVER = 0.95  # ... and the phrasings open this share of them, else the cluster has none
_HEAD_CHARS = 4000  # a huge user turn: only its start is normalised (on the proxy's hot path)


def _user_text(request: dict | None) -> str:
    """The last user turn's text (OpenAI or Anthropic), as capture records a single-turn call's input."""
    if not isinstance(request, dict):
        return ""
    for m in reversed(request.get("messages") or []):
        if isinstance(m, dict) and m.get("role", "user") == "user":
            return _text_of(m.get("content"))
    return ""


def head_words(text: str) -> list[str]:
    """The words an input opens with, normalised as system prompts are (case, digits, whitespace); only
    its first few thousand characters are read. Clustering's template prefixes and the templates here
    both count these."""
    return _normalize_prompt(text[:_HEAD_CHARS]).split(" ")


def instruction_templates(inputs: list[str]) -> list[str]:
    """The phrasings of an instruction a cluster's inputs open with (normalised as system prompts are), when
    TEMPLATE_COVER of them open with one; [] otherwise (plain user text: any opening may come).

    A row's phrasing is the word prefix (2 words or more) along which the rows sharing it stay together:
    it grows while at least 3 in 4 of the rows sharing it also share the next word, and stops where the
    user's own text starts (the next word varies). A phrasing must open TEMPLATE_SHARE of the inputs."""
    heads = [head_words(t) for t in inputs]
    counts = Counter(" ".join(w[:n]) for w in heads for n in range(2, min(TEMPLATE_WORDS, len(w) - 1) + 1))
    need = max(5, TEMPLATE_SHARE * len(inputs))
    found, covered = set(), 0
    for w in heads:
        top = min(TEMPLATE_WORDS, len(w) - 1)
        if top < 2 or counts[" ".join(w[:2])] < need:
            continue
        n = 2
        while n < top and counts[" ".join(w[: n + 1])] >= 0.75 * counts[" ".join(w[:n])]:
            n += 1
        found.add(" ".join(w[:n]))
        covered += 1
    if not inputs or covered < TEMPLATE_COVER * len(inputs):
        return []
    kept: list[str] = []
    for t in sorted(found, key=len):  # a phrasing that extends a shorter one adds nothing
        if not any(t.startswith(k + " ") for k in kept):
            kept.append(t)
    return kept


def opens_with(templates: list[str], head: str) -> bool:
    """Whether a normalised input `head` opens with one of `templates` (whole words)."""
    return any(head == t or head.startswith(t + " ") for t in templates)


def shape_of_request(request: dict | None) -> dict[str, str]:
    """The shape of one request (OpenAI or Anthropic body); `head`, the normalised start of its user turn."""
    return {
        "system_prompt": _normalize_prompt(system_prompt(request)),
        "response_format": response_format(request),
        "turns": turns_of(request),
        "head": " ".join(head_words(_user_text(request))[: TEMPLATE_WORDS + 1]),
    }


def shape_key(shape: dict[str, Any]) -> str:
    """12 hex chars over the system prompt and response format (the part a request must match exactly)."""
    key = f"{shape.get('system_prompt', '')}\x1f{shape.get('response_format', '')}"
    return hashlib.sha1(key.encode()).hexdigest()[:12]


def matches(model_shape: dict[str, Any], request_shape: dict[str, str]) -> bool:
    """Whether a model compiled for `model_shape` may answer a request of `request_shape`."""
    if shape_key(model_shape) != shape_key(request_shape):
        return False
    templates = model_shape.get("templates")
    if templates and not opens_with(templates, request_shape.get("head", "")):
        return False  # another task behind the same system prompt: its instruction is not this model's
    return model_shape.get("turns") != "single" or request_shape["turns"] == "single"


def shape_of_cluster(requests: list[dict | None], inputs: list[str] | None = None) -> dict[str, Any]:
    """The cluster's shape: its most common system prompt + response format (clustering keeps one
    fingerprint per cluster, so that is all of them), "single" turns when every call was single-turn, and
    with `inputs` (single-turn calls), the instruction phrasings they all open with (`templates`, only
    when there are: clustering splits one system prompt's tasks by them)."""
    if not requests:
        return {**EMPTY_SHAPE, "key": shape_key(EMPTY_SHAPE)}
    shapes = [shape_of_request(r) for r in requests]
    ((key, _),) = Counter(shape_key(s) for s in shapes).most_common(1)
    first = next(s for s in shapes if shape_key(s) == key)
    turns = "single" if all(s["turns"] == "single" for s in shapes) else "any"
    out: dict[str, Any] = {
        "system_prompt": first["system_prompt"],
        "response_format": first["response_format"],
        "turns": turns,
        "key": key,
    }
    templates = instruction_templates(inputs) if inputs and turns == "single" else []
    if templates:
        out["templates"] = templates
    return out
