"""The proxy's upstream side: where a provider's calls go, which headers pass either way, and the
response that streams the upstream's answer to the client chunk by chunk while keeping a copy.
"""

from __future__ import annotations

import asyncio
from typing import Any

import aiohttp
import anyio
from fastapi.responses import Response
from multidict import CIMultiDict
from starlette.types import Receive, Scope, Send
from yarl import URL

from kolm_ray.errors import KolmError
from kolm_ray.settings import redact_url

DEFAULT_UPSTREAMS = {"openai": "https://api.openai.com", "anthropic": "https://api.anthropic.com"}
UPSTREAM_PATHS = {"openai": "/v1/chat/completions", "anthropic": "/v1/messages"}
# Long generations: up to 10 min between two reads; connect 10 s; waiting for a pooled connection
# counts in `connect` (aiohttp's name for pool wait + connect). No total: a stream may run long.
UPSTREAM_TIMEOUT = aiohttp.ClientTimeout(total=None, connect=70.0, sock_connect=10.0, sock_read=600.0)
UPSTREAM_CONNECTIONS = 1000  # concurrent upstream connections (the pool's limit; idle ones kept 30 s)
UPSTREAM_KEEPALIVE_S = 30.0
RECORD_MAX = 64 * 1024 * 1024  # the most of one streamed answer kept for its observation
# What the upstream client raises for a failed exchange (aiohttp's timeouts are TimeoutErrors).
UPSTREAM_ERRORS = (aiohttp.ClientError, asyncio.TimeoutError)
# Hop-by-hop (RFC 9110 7.6.1) or recomputed by us / the server: never forwarded either way.
_HOP = {
    b"connection",
    b"keep-alive",
    b"proxy-connection",
    b"transfer-encoding",
    b"te",
    b"trailer",
    b"upgrade",
    b"host",
    b"content-length",
    b"accept-encoding",
    b"content-encoding",  # a request body must be plain JSON (it is parsed); never forwarded
    b"proxy-authorization",
    b"proxy-authenticate",
}
# Responses keep Content-Encoding: the body is passed on undecoded, so the header must travel with it.
_RESPONSE_DROP = (_HOP - {b"content-encoding"}) | {b"date", b"server"}  # uvicorn writes its own


def upstream_endpoint(base: str, provider: str) -> str:
    """The URL the proxy posts to: base (with or without a trailing /v1) + the provider's path."""
    base = base.rstrip("/")
    if not base.startswith(("http://", "https://")):
        raise KolmError(f"{provider} upstream {redact_url(base)!r} must be an http:// or https:// URL")
    if base.endswith("/v1"):
        base = base[:-3]
    return base + UPSTREAM_PATHS[provider]


def split_credentials(endpoint: str) -> tuple[URL, str | None]:
    """An upstream URL as aiohttp is given it, without `user:password@` (so no client error, log or message
    can carry them), and those credentials as a Basic `Authorization` value (None when it has none). Shown
    anywhere, the URL is settings.redact_url(endpoint)."""
    url = URL(endpoint)
    if url.user is None and url.password is None:
        return url, None
    auth = aiohttp.BasicAuth(url.user or "", url.password or "").encode()
    return url.with_user(None), auth


def forward_headers(raw: list[tuple[bytes, bytes]], auth: str | None = None) -> CIMultiDict[str]:
    """The caller's headers as the upstream gets them. `auth` (the upstream URL's own credentials) is sent
    only when the caller sends no Authorization: the caller's own provider key is forwarded as it is."""
    out: CIMultiDict[str] = CIMultiDict(
        (k.decode("latin-1"), v.decode("latin-1"))
        for k, v in raw
        if k.lower() not in _HOP and not k.lower().startswith(b"x-kolm-")
    )
    if auth is not None and "Authorization" not in out:
        out["Authorization"] = auth
    # identity: the answer is both passed through and parsed, so ask for it plain. An upstream that
    # compresses anyway is passed through as sent (with its Content-Encoding) and decoded for the store.
    out["Accept-Encoding"] = "identity"
    return out


def response_headers(up: aiohttp.ClientResponse, overhead_ms: float) -> list[tuple[bytes, bytes]]:
    headers = [(k.lower(), v) for k, v in up.raw_headers if k.lower() not in _RESPONSE_DROP]
    headers.append((b"x-kolm-overhead-ms", f"{overhead_ms:.3f}".encode()))
    return headers


class PassthroughResponse(Response):
    """An upstream SSE stream sent on chunk by chunk; reports what was sent and how it ended.

    A task watches `receive` for the client's disconnect (uvicorn's send() just returns after one),
    cancels the copy and stops reading the upstream, so the model stops generating for nobody.
    """

    def __init__(
        self, upstream: aiohttp.ClientResponse, headers: list[tuple[bytes, bytes]], on_done: Any
    ) -> None:
        self.upstream = upstream
        self.status_code = upstream.status
        self.raw_headers = headers
        self.on_done = on_done  # (body: bytes, outcome: "done"|"client_closed"|"upstream_error", error)
        self.background = None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        chunks: list[bytes] = []
        kept = 0  # bytes of the stream kept for the observation (capped at RECORD_MAX)
        recorded = False

        def record(outcome: str, error: str | None = None) -> None:
            nonlocal recorded
            recorded = True
            self.on_done(b"".join(chunks), outcome, error)

        async def watch(scope_: anyio.CancelScope) -> None:
            while (await receive())["type"] != "http.disconnect":
                pass
            scope_.cancel()

        try:
            async with anyio.create_task_group() as tg:
                tg.start_soon(watch, tg.cancel_scope)
                start = {
                    "type": "http.response.start",
                    "status": self.status_code,
                    "headers": self.raw_headers,
                }
                try:
                    await send(start)
                    async for chunk in self.upstream.content.iter_any():  # as they arrive, undecoded
                        if kept < RECORD_MAX:
                            chunks.append(chunk)
                            kept += len(chunk)
                        await send({"type": "http.response.body", "body": chunk, "more_body": True})
                    record("done")
                except UPSTREAM_ERRORS as e:  # the upstream broke mid-stream: end ours cleanly
                    record("upstream_error", f"upstream stream broke: {type(e).__name__}: {e}")
                # Recorded before the last message: once a client has the whole answer, the
                # observation is already queued (so a bridge read right after sees it).
                await send({"type": "http.response.body", "body": b"", "more_body": False})
                tg.cancel_scope.cancel()
        finally:
            if not recorded:  # the client left (or we were cancelled) mid-stream: keep what was sent
                record("client_closed")
            # A finished answer hands its connection back to the pool; a cut one closes it (and so
            # stops the upstream generating for nobody).
            if self.upstream.content.is_eof():
                self.upstream.release()
            else:
                self.upstream.close()
