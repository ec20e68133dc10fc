"""OpenAI chat completions: request -> input text, response JSON or SSE stream -> Extracted.

Wire format: https://platform.openai.com/docs/api-reference/chat. A stream is `data: {chunk}` events
ending with `data: [DONE]`; usage arrives in a last chunk with empty `choices` only when the request
set `stream_options.include_usage` (the proxy never adds it: the answer goes back unchanged).
"""

from __future__ import annotations

import json
from typing import Any

from kolm_ray.providers import Extracted, error_message, input_from_turns, iter_sse, json_or_text

NAME = "openai"


def content_text(content: Any) -> str:
    """A message's `content` (string, or a list of parts) as text; non-text parts become `[type]`."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        parts = []
        for part in content:
            if isinstance(part, dict):
                if part.get("type") in ("text", "input_text", "output_text") and isinstance(
                    part.get("text"), str
                ):
                    parts.append(part["text"])
                elif part.get("type") == "refusal":
                    parts.append(str(part.get("refusal", "")))
                else:
                    parts.append(f"[{part.get('type', 'part')}]")
            elif isinstance(part, str):
                parts.append(part)
        return "\n".join(parts)
    return str(content)


def input_text(request: dict[str, Any]) -> str:
    """The last user message's text for a single-turn call, else a transcript of the non-system turns."""
    turns = []
    for msg in request.get("messages") or []:
        if not isinstance(msg, dict):
            continue
        role = str(msg.get("role", "user"))
        if role in ("system", "developer"):
            continue
        text = content_text(msg.get("content"))
        if not text and msg.get("tool_calls"):
            text = json.dumps(msg["tool_calls"])
        turns.append((role, text))
    return input_from_turns(turns)


def _tool_output(calls: list[dict[str, Any]]) -> list[dict[str, Any]]:
    out = []
    for call in calls:
        fn = call.get("function") or {}
        out.append({"name": fn.get("name"), "arguments": json_or_text(fn.get("arguments") or "")})
    return out


def from_response(body: Any) -> Extracted:
    """A non-streamed chat.completion (or an error body) as Extracted; choice 0 is the answer."""
    if not isinstance(body, dict) or "error" in body and not body.get("choices"):
        return Extracted(output=body, error=error_message(body))
    choices = body.get("choices") or []
    msg = (choices[0].get("message") or {}) if choices else {}
    text = msg.get("content")
    if text is None and msg.get("tool_calls"):
        output: Any = _tool_output(msg["tool_calls"])
    elif text is None and msg.get("refusal"):
        output = msg["refusal"]
    else:
        output = json_or_text(content_text(text))
    return Extracted(
        output=output,
        model=body.get("model"),
        usage=body.get("usage"),
        finish_reason=choices[0].get("finish_reason") if choices else None,
    )


def from_stream(data: bytes | str) -> Extracted:
    """Assemble a streamed answer from its SSE bytes (possibly cut short: `complete` tells)."""
    text_parts: list[str] = []
    tools: dict[int, dict[str, Any]] = {}
    ex = Extracted(complete=False)
    for _, payload in iter_sse(data):
        if payload.strip() == "[DONE]":
            ex.complete = True
            continue
        try:
            chunk = json.loads(payload)
        except ValueError:
            continue
        if not isinstance(chunk, dict):
            continue
        if chunk.get("error"):
            ex.error = error_message(chunk)
            continue
        ex.model = chunk.get("model") or ex.model
        if chunk.get("usage"):
            ex.usage = chunk["usage"]
        for choice in chunk.get("choices") or []:
            if choice.get("index", 0) != 0:
                continue
            delta = choice.get("delta") or {}
            if isinstance(delta.get("content"), str):
                text_parts.append(delta["content"])
            for call in delta.get("tool_calls") or []:
                slot = tools.setdefault(call.get("index", 0), {"function": {"name": "", "arguments": ""}})
                fn = call.get("function") or {}
                slot["function"]["name"] += fn.get("name") or ""
                slot["function"]["arguments"] += fn.get("arguments") or ""
            if choice.get("finish_reason"):
                ex.finish_reason = choice["finish_reason"]
    text = "".join(text_parts)
    if not text and tools:
        ex.output = _tool_output([tools[i] for i in sorted(tools)])
    else:
        ex.output = json_or_text(text)
    return ex
