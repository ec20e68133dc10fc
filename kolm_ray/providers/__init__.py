"""Provider wire formats: what a request asks and what a response (or SSE stream) answers.

Pure functions, no I/O, one module per provider:

    from kolm_ray.providers import openai, anthropic
    openai.input_text(request_json)         # the text a distilled model will see
    openai.from_response(response_json)     # Extracted(output, model, usage, ...)
    openai.from_stream(sse_bytes)           # the same, assembled from a server-sent-event stream

Shared here: the SSE parser, the transcript renderer, JSON-or-text output and credential scrubbing.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from kolm_ray.providers.scrub import REDACTED, is_credential_field, scrub_credentials, scrub_text

__all__ = [
    "REDACTED",
    "Extracted",
    "is_credential_field",
    "scrub_credentials",
    "scrub_text",
]


@dataclass
class Extracted:
    """What one provider response (whole or streamed) said, in provider-neutral terms."""

    output: Any = None
    """The assistant's text, the parsed JSON value when that text is a JSON object/array, or tool calls."""
    model: str | None = None
    usage: dict[str, Any] | None = None
    finish_reason: str | None = None
    error: str | None = None
    """Set when the response (or a stream event) reported an error."""
    complete: bool = True
    """False when a stream ended before its terminal event (the answer may be cut short)."""
    extra: dict[str, Any] = field(default_factory=dict)


def iter_sse(data: bytes | str) -> Iterable[tuple[str | None, str]]:
    """Yield (event, data) for each server-sent event in `data` (per the WHATWG SSE format).

    Lines starting with ':' are comments; several `data:` lines in one event are joined with a newline.
    An unterminated last event is still yielded, so a cut stream gives back what did arrive.
    """
    text = data.decode("utf-8", errors="replace") if isinstance(data, bytes) else data
    event: str | None = None
    lines: list[str] = []
    for raw in text.replace("\r\n", "\n").replace("\r", "\n").split("\n"):
        if raw == "":
            if lines:
                yield event, "\n".join(lines)
            event, lines = None, []
            continue
        if raw.startswith(":"):
            continue
        name, _, value = raw.partition(":")
        value = value[1:] if value.startswith(" ") else value
        if name == "event":
            event = value
        elif name == "data":
            lines.append(value)
    if lines:
        yield event, "\n".join(lines)


_FENCE = re.compile(r"^```(?:json|JSON)?\s*\n(.*)\n```$", re.DOTALL)


def json_or_text(text: str | None) -> Any:
    """The parsed value when `text` is a JSON object or array (optionally in a ```json fence), else the text.

    Bare scalars ("42", "true") stay text: a model answering the word "true" meant a string as often as
    a boolean, and the recipe's schema inference should not guess.
    """
    if text is None:
        return None
    stripped = text.strip()
    fenced = _FENCE.match(stripped)
    if fenced:
        stripped = fenced.group(1).strip()
    if stripped[:1] in ("{", "["):
        try:
            return json.loads(stripped)
        except ValueError:
            return text
    return text


def render_transcript(turns: list[tuple[str, str]]) -> str:
    """A multi-turn conversation as the plain text a distilled model sees: `role: text` blocks."""
    return "\n\n".join(f"{role}: {text}" for role, text in turns)


def input_from_turns(turns: list[tuple[str, str]]) -> str:
    """The last user message's text for a single-turn call, else a rendered transcript.

    Single-turn means exactly one user turn and nothing else (a system prompt is not a turn: it is kept
    in the observation's `request`).
    """
    if len(turns) == 1 and turns[0][0] == "user":
        return turns[0][1]
    return render_transcript(turns)


def error_message(body: Any) -> str:
    """A one-line reason from a provider error body (OpenAI and Anthropic both nest it under `error`)."""
    if isinstance(body, dict):
        err = body.get("error")
        if isinstance(err, dict):
            kind = err.get("type") or err.get("code")
            msg = err.get("message") or json.dumps(err)
            return f"{kind}: {msg}" if kind else str(msg)
        if isinstance(err, str):
            return err
    text = body if isinstance(body, str) else json.dumps(body)
    return text[:500]
