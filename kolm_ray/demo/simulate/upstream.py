"""The stand-in frontier API (OpenAI chat completions + Anthropic messages, JSON and SSE) and helpers
that run ASGI apps with uvicorn in a thread or in the foreground."""

from __future__ import annotations

import asyncio
import json
import socket
import threading
import time
import uuid
from collections import deque
from collections.abc import Callable
from typing import Any

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from kolm_ray.demo.simulate.workload import frontier_answer
from kolm_ray.providers import anthropic as anthropic_fmt
from kolm_ray.providers import openai as openai_fmt


def _openai_error(status: int, message: str) -> JSONResponse:
    kind = {400: "invalid_request_error", 401: "invalid_request_error", 429: "rate_limit_exceeded"}.get(
        status, "server_error"
    )
    return JSONResponse(
        {"error": {"message": message, "type": kind, "param": None, "code": None}}, status_code=status
    )


def _anthropic_error(status: int, message: str) -> JSONResponse:
    kind = {
        400: "invalid_request_error",
        401: "authentication_error",
        429: "rate_limit_error",
        529: "overloaded_error",
    }
    body = {"type": "error", "error": {"type": kind.get(status, "api_error"), "message": message}}
    return JSONResponse(body, status_code=status)


def _sse(event: str | None, data: Any) -> bytes:
    head = f"event: {event}\n" if event else ""
    return f"{head}data: {data if isinstance(data, str) else json.dumps(data)}\n\n".encode()


def _pieces(text: str) -> list[str]:
    """Split the answer the way a model streams tokens: a few small pieces."""
    step = max(1, len(text) // 4)
    return [text[i : i + step] for i in range(0, len(text), step)]


def make_upstream_app(
    latency_ms: float = 0.0,
    chunk_delay_ms: float = 0.0,
    noise: float = 0.02,
    answer: Callable[[str], str] | None = None,
) -> Starlette:
    """The stand-in frontier API: POST /v1/chat/completions (OpenAI) and POST /v1/messages (Anthropic).

    `answer(query) -> assistant text` replaces the built-in support-namespace answer (a benchmark's task).

    `app.state.seen` keeps the last 1000 (path, credential header) pairs so tests can check forwarding.
    """
    seen: deque = deque(maxlen=1000)

    async def prelude(request: Request, provider: str) -> tuple[dict | None, Response | None, float]:
        err = _openai_error if provider == "openai" else _anthropic_error
        key = request.headers.get("authorization")
        if provider == "anthropic":  # x-api-key classically; recent SDKs send a bearer token instead
            key = request.headers.get("x-api-key") or key
        seen.append((request.url.path, key))
        if not key or key.strip() in ("", "Bearer"):
            return None, err(401, "missing API key"), 0
        try:
            body = json.loads(await request.body())
        except ValueError:
            return None, err(400, "body is not valid JSON"), 0
        if not isinstance(body, dict) or not isinstance(body.get("messages"), list) or not body["messages"]:
            return None, err(400, "messages: a non-empty list is required"), 0
        delay = float(request.headers.get("x-sim-latency-ms", latency_ms)) / 1000
        if delay > 0:
            await asyncio.sleep(delay)
        model = str(body.get("model", ""))
        forced = request.headers.get("x-sim-status") or (
            model[len("sim-error-") :] if model.startswith("sim-error-") else None
        )
        if forced:
            return None, err(int(forced), f"simulated error {forced}"), 0
        chunk_delay = float(request.headers.get("x-sim-chunk-delay-ms", chunk_delay_ms)) / 1000
        return body, None, chunk_delay

    async def chat_completions(request: Request) -> Response:
        body, error, chunk_delay = await prelude(request, "openai")
        if error is not None:
            return error
        model = str(body.get("model") or "sim-frontier")
        query = openai_fmt.input_text(body)
        text = answer(query) if answer is not None else frontier_answer(query, noise)
        cid, created = f"chatcmpl-{uuid.uuid4().hex[:24]}", int(time.time())
        usage = {"prompt_tokens": len(query.split()) + 40, "completion_tokens": len(text.split()) + 3}
        usage["total_tokens"] = usage["prompt_tokens"] + usage["completion_tokens"]
        if not body.get("stream"):
            return JSONResponse(
                {
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
                    "usage": usage,
                }
            )
        include_usage = bool((body.get("stream_options") or {}).get("include_usage"))

        def chunk(delta: dict, finish: str | None = None) -> bytes:
            c = {
                "id": cid,
                "object": "chat.completion.chunk",
                "created": created,
                "model": model,
                "system_fingerprint": None,
                "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}],
            }
            if include_usage:
                c["usage"] = None
            return _sse(None, c)

        async def events():
            yield chunk({"role": "assistant", "content": "", "refusal": None})
            for i, piece in enumerate(_pieces(text)):
                if chunk_delay:
                    await asyncio.sleep(chunk_delay)
                if model == "sim-stream-cut" and i == 1:
                    raise RuntimeError("simulated upstream failure mid-stream")
                yield chunk({"content": piece})
            yield chunk({}, "stop")
            if include_usage:
                yield _sse(
                    None,
                    {
                        "id": cid,
                        "object": "chat.completion.chunk",
                        "created": created,
                        "model": model,
                        "system_fingerprint": None,
                        "choices": [],
                        "usage": usage,
                    },
                )
            yield b"data: [DONE]\n\n"

        return StreamingResponse(events(), media_type="text/event-stream")

    async def messages(request: Request) -> Response:
        body, error, chunk_delay = await prelude(request, "anthropic")
        if error is not None:
            return error
        model = str(body.get("model") or "sim-frontier")
        query = anthropic_fmt.input_text(body)
        text = answer(query) if answer is not None else frontier_answer(query, noise)
        mid = f"msg_{uuid.uuid4().hex[:24]}"
        in_tok, out_tok = len(query.split()) + 40, len(text.split()) + 3
        if not body.get("stream"):
            return JSONResponse(
                {
                    "id": mid,
                    "type": "message",
                    "role": "assistant",
                    "model": model,
                    "content": [{"type": "text", "text": text}],
                    "stop_reason": "end_turn",
                    "stop_sequence": None,
                    "usage": {"input_tokens": in_tok, "output_tokens": out_tok},
                }
            )

        async def events():
            yield _sse(
                "message_start",
                {
                    "type": "message_start",
                    "message": {
                        "id": mid,
                        "type": "message",
                        "role": "assistant",
                        "model": model,
                        "content": [],
                        "stop_reason": None,
                        "stop_sequence": None,
                        "usage": {"input_tokens": in_tok, "output_tokens": 1},
                    },
                },
            )
            yield _sse(
                "content_block_start",
                {"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}},
            )
            yield _sse("ping", {"type": "ping"})
            for i, piece in enumerate(_pieces(text)):
                if chunk_delay:
                    await asyncio.sleep(chunk_delay)
                if model == "sim-stream-cut" and i == 1:
                    raise RuntimeError("simulated upstream failure mid-stream")
                yield _sse(
                    "content_block_delta",
                    {
                        "type": "content_block_delta",
                        "index": 0,
                        "delta": {"type": "text_delta", "text": piece},
                    },
                )
            yield _sse("content_block_stop", {"type": "content_block_stop", "index": 0})
            yield _sse(
                "message_delta",
                {
                    "type": "message_delta",
                    "delta": {"stop_reason": "end_turn", "stop_sequence": None},
                    "usage": {"output_tokens": out_tok},
                },
            )
            yield _sse("message_stop", {"type": "message_stop"})

        return StreamingResponse(events(), media_type="text/event-stream")

    async def healthz(request: Request) -> Response:
        return JSONResponse({"ok": True})

    app = Starlette(
        routes=[
            Route("/v1/chat/completions", chat_completions, methods=["POST"]),
            Route("/v1/messages", messages, methods=["POST"]),
            Route("/healthz", healthz),
        ]
    )
    app.state.seen = seen
    return app


# ---------------------------------------------------------------- running servers


def serve_in_thread(
    app: Any, host: str = "127.0.0.1", port: int = 0, **config: Any
) -> tuple[str, Callable[[], None]]:
    """Run an ASGI app with uvicorn in a daemon thread; returns (base URL, stop). stop() waits for shutdown."""
    import uvicorn

    from kolm_ray.capture.server import uvicorn_config_kwargs

    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    sock.listen(2048)
    kwargs = {**uvicorn_config_kwargs(), **config}
    server = uvicorn.Server(uvicorn.Config(app, lifespan="auto", **kwargs))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True, name="uvicorn")
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError("server did not start")
        time.sleep(0.01)
    url = f"http://{host}:{sock.getsockname()[1]}"

    def stop() -> None:
        server.should_exit = True
        thread.join(timeout=90)
        sock.close()

    return url, stop


def start_upstream_in_thread(
    host: str = "127.0.0.1",
    port: int = 0,
    latency_ms: float = 0.0,
    chunk_delay_ms: float = 0.0,
    noise: float = 0.02,
    answer: Callable[[str], str] | None = None,
) -> tuple[str, Callable[[], None]]:
    """Start the stand-in upstream in this process; returns (base URL, stop). Use the URL as
    `kolm capture --openai-upstream URL --anthropic-upstream URL`."""
    return serve_in_thread(make_upstream_app(latency_ms, chunk_delay_ms, noise, answer), host, port)


def run_upstream(
    host: str = "127.0.0.1",
    port: int = 9100,
    latency_ms: float = 0.0,
    chunk_delay_ms: float = 0.0,
    noise: float = 0.02,
) -> None:
    """Run the stand-in upstream in the foreground until SIGINT/SIGTERM."""
    import uvicorn

    from kolm_ray.capture.server import uvicorn_config_kwargs

    print(f"stand-in upstream on http://{host}:{port}", flush=True)
    uvicorn.run(
        make_upstream_app(latency_ms, chunk_delay_ms, noise), host=host, port=port, **uvicorn_config_kwargs()
    )
