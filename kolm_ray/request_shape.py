"""The request shape a model was compiled for: the system prompt and response format of its cluster.

    shape = shape_of_request(request_json)   # {"system_prompt", "response_format", "turns"}
    shape_key(shape)                          # 12 hex chars; equal keys: the model may answer

The same signals clustering fingerprints a request by (clustering.system_prompt, response_format, and its
prompt normalisation: digits and whitespace do not make a new task), so "the recipe's cluster" and "a
request this model may answer" mean the same thing. `turns` is "single" when the model only ever saw the
last user message of single-turn calls: a multi-turn conversation is another input rendering and goes
upstream.
"""

from __future__ import annotations

import hashlib
from collections import Counter
from typing import Any

from kolm_ray.clustering.featurize import _normalize_prompt, response_format, system_prompt

EMPTY_SHAPE = {"system_prompt": "", "response_format": "", "turns": "single"}
"""What an artifact compiled from plain pairs (no recipe, so no captured requests) answers: calls with no
system prompt, no response format, one user turn."""


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


def shape_of_request(request: dict | None) -> dict[str, str]:
    """The shape of one request (OpenAI or Anthropic body)."""
    return {
        "system_prompt": _normalize_prompt(system_prompt(request)),
        "response_format": response_format(request),
        "turns": turns_of(request),
    }


def shape_key(shape: dict[str, Any]) -> str:
    """12 hex chars over the system prompt and response format (the part a request must match exactly)."""
    key = f"{shape.get('system_prompt', '')}\x1f{shape.get('response_format', '')}"
    return hashlib.sha1(key.encode()).hexdigest()[:12]


def matches(model_shape: dict[str, Any], request_shape: dict[str, str]) -> bool:
    """Whether a model compiled for `model_shape` may answer a request of `request_shape`."""
    if shape_key(model_shape) != shape_key(request_shape):
        return False
    return model_shape.get("turns") != "single" or request_shape["turns"] == "single"


def shape_of_cluster(requests: list[dict | None]) -> dict[str, Any]:
    """The cluster's shape: its most common system prompt + response format (clustering keeps one
    fingerprint per cluster, so that is all of them), and "single" turns when every call was single-turn."""
    if not requests:
        return {**EMPTY_SHAPE, "key": shape_key(EMPTY_SHAPE)}
    shapes = [shape_of_request(r) for r in requests]
    ((key, _),) = Counter(shape_key(s) for s in shapes).most_common(1)
    first = next(s for s in shapes if shape_key(s) == key)
    turns = "single" if all(s["turns"] == "single" for s in shapes) else "any"
    return {
        "system_prompt": first["system_prompt"],
        "response_format": first["response_format"],
        "turns": turns,
        "key": key,
    }
