"""A local model's answer in the providers' own wire formats, as their SDKs parse them.

    body, media_type = openai_answer(text, "tagger@3", stream=False, include_usage=False)
    body, media_type = anthropic_answer(text, "tagger@3", stream=True)

OpenAI: a `chat.completion` object, or `chat.completion.chunk` events (role, content, finish) ending with
`data: [DONE]` (and a usage chunk with empty `choices` when the request set `stream_options.include_usage`).
Anthropic: a `message` object, or message_start / content_block_start / content_block_delta /
content_block_stop / message_delta / message_stop events. The whole answer exists before the first byte,
so a stream is sent in one write: SDKs iterate the events the same way.

`usage` counts the frontier tokens billed for the call, which for a local answer is none: every count is 0
(`kolm report` prices usage, and a local call costs no API spend).
"""

from __future__ import annotations

import json
import time
import uuid

SSE = "text/event-stream"
JSON = "application/json"
OPENAI_USAGE = {"prompt_tokens": 0, "completion_tokens": 0, "total_tokens": 0}
ANTHROPIC_USAGE = {"input_tokens": 0, "output_tokens": 0}


def _dumps(value: object) -> str:
    return json.dumps(value, ensure_ascii=False, separators=(",", ":"))


def _event(event: str | None, data: object) -> str:
    head = f"event: {event}\n" if event else ""
    return f"{head}data: {data if isinstance(data, str) else _dumps(data)}\n\n"


def openai_answer(text: str, model: str, stream: bool, include_usage: bool = False) -> tuple[bytes, str]:
    """The body (and media type) of an OpenAI chat completion whose assistant message is `text`."""
    cid, created = f"chatcmpl-kolm{uuid.uuid4().hex[:20]}", int(time.time())
    if not stream:
        body = {
            "id": cid,
            "object": "chat.completion",
            "created": created,
            "model": model,
            "system_fingerprint": None,
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": text, "refusal": None},
                    "logprobs": None,
                    "finish_reason": "stop",
                }
            ],
            "usage": OPENAI_USAGE,
        }
        return _dumps(body).encode(), JSON

    def chunk(delta: dict, finish: str | None = None) -> str:
        choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}
        return _event(None, {
            "id": cid, "object": "chat.completion.chunk", "created": created, "model": model,
            "system_fingerprint": None, "choices": [choice],
        })  # fmt: skip

    parts = [chunk({"role": "assistant", "content": ""}), chunk({"content": text}), chunk({}, "stop")]
    if include_usage:
        parts.append(_event(None, {
            "id": cid, "object": "chat.completion.chunk", "created": created, "model": model,
            "system_fingerprint": None, "choices": [], "usage": OPENAI_USAGE,
        }))  # fmt: skip
    parts.append(_event(None, "[DONE]"))
    return "".join(parts).encode(), SSE


def anthropic_answer(text: str, model: str, stream: bool) -> tuple[bytes, str]:
    """The body (and media type) of an Anthropic message whose one text block is `text`."""
    mid = f"msg_kolm{uuid.uuid4().hex[:20]}"
    message = {
        "id": mid,
        "type": "message",
        "role": "assistant",
        "model": model,
        "content": [{"type": "text", "text": text}],
        "stop_reason": "end_turn",
        "stop_sequence": None,
        "usage": ANTHROPIC_USAGE,
    }
    if not stream:
        return _dumps(message).encode(), JSON
    start = {**message, "content": [], "stop_reason": None}
    parts = [
        _event("message_start", {"type": "message_start", "message": start}),
        _event("content_block_start", {"type": "content_block_start", "index": 0,
                                       "content_block": {"type": "text", "text": ""}}),
        _event("content_block_delta", {"type": "content_block_delta", "index": 0,
                                       "delta": {"type": "text_delta", "text": text}}),
        _event("content_block_stop", {"type": "content_block_stop", "index": 0}),
        _event("message_delta", {"type": "message_delta", "delta": {"stop_reason": "end_turn", "stop_sequence": None},
                                 "usage": {"output_tokens": 0}}),
        _event("message_stop", {"type": "message_stop"}),
    ]  # fmt: skip
    return "".join(parts).encode(), SSE
