"""Anthropic messages: request -> input text, response JSON or SSE stream -> Extracted.

Wire format: https://docs.anthropic.com/en/api/messages and .../messages-streaming. A stream is
`message_start`, then per content block `content_block_start` / `content_block_delta`... /
`content_block_stop`, then `message_delta` (stop_reason, output usage) and `message_stop`; `ping`
events may appear anywhere and an `error` event can end it early.
"""

from __future__ import annotations

import json
from typing import Any

from kolm_ray.providers import Extracted, error_message, input_from_turns, iter_sse, json_or_text

NAME = "anthropic"


def content_text(content: Any) -> str:
    """A message's `content` (string, or content blocks) as text; non-text blocks become `[type]`."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        parts = []
        for block in content:
            if not isinstance(block, dict):
                parts.append(str(block))
            elif block.get("type") == "text":
                parts.append(str(block.get("text", "")))
            elif block.get("type") == "tool_result":
                parts.append(content_text(block.get("content")))
            elif block.get("type") == "tool_use":
                parts.append(json.dumps({"name": block.get("name"), "input": block.get("input")}))
            else:
                parts.append(f"[{block.get('type', 'block')}]")
        return "\n".join(parts)
    return str(content)


def input_text(request: dict[str, Any]) -> str:
    """The last user message's text for a single-turn call, else a transcript (`system` is not a turn)."""
    turns = [
        (str(m.get("role", "user")), content_text(m.get("content")))
        for m in request.get("messages") or []
        if isinstance(m, dict)
    ]
    return input_from_turns(turns)


def _output(blocks: list[dict[str, Any]]) -> Any:
    text = "".join(str(b.get("text", "")) for b in blocks if b.get("type") == "text")
    tools = [{"name": b.get("name"), "input": b.get("input")} for b in blocks if b.get("type") == "tool_use"]
    if not text and tools:
        return tools
    return json_or_text(text)


def _usage(usage: dict[str, Any] | None) -> dict[str, Any] | None:
    return dict(usage) if isinstance(usage, dict) else None


def from_response(body: Any) -> Extracted:
    """A non-streamed message (or an error body) as Extracted."""
    if not isinstance(body, dict) or body.get("type") == "error" or "error" in body and "content" not in body:
        return Extracted(output=body, error=error_message(body))
    blocks = [b for b in body.get("content") or [] if isinstance(b, dict)]
    return Extracted(
        output=_output(blocks),
        model=body.get("model"),
        usage=_usage(body.get("usage")),
        finish_reason=body.get("stop_reason"),
    )


def from_stream(data: bytes | str) -> Extracted:
    """Assemble a streamed message from its SSE bytes (possibly cut short: `complete` tells)."""
    blocks: dict[int, dict[str, Any]] = {}
    partial_json: dict[int, str] = {}
    ex = Extracted(complete=False)
    usage: dict[str, Any] = {}
    for event, payload in iter_sse(data):
        try:
            msg = json.loads(payload)
        except ValueError:
            continue
        if not isinstance(msg, dict):
            continue
        kind = msg.get("type") or event
        if kind == "message_start":
            m = msg.get("message") or {}
            ex.model = m.get("model")
            usage.update(m.get("usage") or {})
        elif kind == "content_block_start":
            blocks[msg.get("index", 0)] = dict(msg.get("content_block") or {"type": "text", "text": ""})
        elif kind == "content_block_delta":
            i = msg.get("index", 0)
            block = blocks.setdefault(i, {"type": "text", "text": ""})
            delta = msg.get("delta") or {}
            if delta.get("type") == "text_delta":
                block["text"] = str(block.get("text", "")) + str(delta.get("text", ""))
            elif delta.get("type") == "input_json_delta":
                partial_json[i] = partial_json.get(i, "") + str(delta.get("partial_json", ""))
        elif kind == "message_delta":
            ex.finish_reason = (msg.get("delta") or {}).get("stop_reason") or ex.finish_reason
            usage.update(msg.get("usage") or {})
        elif kind == "message_stop":
            ex.complete = True
        elif kind == "error":
            ex.error = error_message(msg)
    for i, raw in partial_json.items():
        try:
            blocks[i]["input"] = json.loads(raw) if raw else {}
        except ValueError:
            blocks[i]["input"] = raw
    ex.output = _output([blocks[i] for i in sorted(blocks)])
    ex.usage = usage or None
    return ex
