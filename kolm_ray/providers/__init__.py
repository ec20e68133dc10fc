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


def _words(name: str) -> list[str]:
    """A field name's words, lower-cased: `openai_api_key`, `apiKey`, `X-API-Key` -> [..., "api", "key"]."""
    return re.findall(r"[a-z0-9]+", re.sub(r"([a-z0-9])([A-Z])", r"\1 \2", name).lower())


# A field is a credential when its name's last word is one of these (`api_key`, `github_token`, `apiKey`,
# `client_secret`, `Authorization`, `APIKEY`...); `max_tokens` ends in "tokens" and stays.
CREDENTIAL_WORDS = frozenset(
    "key token secret password passwd passphrase credential credentials authorization auth bearer cookie"
    " apikey xapikey accesstoken refreshtoken idtoken sessiontoken authtoken secretkey privatekey clientsecret".split()
)
NOT_CREDENTIALS = frozenset({("prompt", "cache", "key")})  # OpenAI's cache-routing hint: a label, not a key
_KEYLIKE = re.compile(
    r"^(?:Bearer\s+\S+"
    r"|sk-[A-Za-z0-9_\-]{16,}"  # OpenAI, Anthropic (sk-ant-...)
    r"|AIza[0-9A-Za-z_\-]{30,}"  # Google
    r"|gh[pousr]_[A-Za-z0-9]{30,}|github_pat_[A-Za-z0-9_]{30,}"  # GitHub
    r"|xox[abprs]-[A-Za-z0-9\-]{10,}"  # Slack
    r"|(?:AKIA|ASIA)[0-9A-Z]{16}"  # AWS access key id
    r"|eyJ[A-Za-z0-9_\-]{8,}\.[A-Za-z0-9_\-]{8,}\.[A-Za-z0-9_\-]{8,})$"  # a JWT
)
REDACTED = "[redacted]"


def is_credential_field(name: str) -> bool:
    words = _words(name)
    return bool(words) and words[-1] in CREDENTIAL_WORDS and tuple(words[-3:]) not in NOT_CREDENTIALS


def scrub_credentials(value: Any) -> Any:
    """A copy of a JSON value without credentials: a field whose name ends in a credential word is dropped
    unless it holds an object (then scrubbed like the rest: `{"auth": {"type": "basic", "password": ...}}`,
    or a JSON schema's `{"token": {"type": "string"}}`), and key-shaped strings anywhere are redacted."""
    if isinstance(value, dict):
        return {
            k: scrub_credentials(v)
            for k, v in value.items()
            if isinstance(v, dict) or not is_credential_field(str(k))
        }
    if isinstance(value, list):
        return [scrub_credentials(v) for v in value]
    if isinstance(value, str) and _KEYLIKE.match(value):
        return REDACTED
    return value


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
