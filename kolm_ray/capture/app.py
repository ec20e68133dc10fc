"""The capture proxy: forward OpenAI / Anthropic calls unchanged, record one observation per answer.

    kolm capture --port 8700 --openai-upstream https://api.openai.com

    client = openai.OpenAI(base_url="http://127.0.0.1:8700/v1/capture/openai")          # your own key
    client = anthropic.Anthropic(base_url="http://127.0.0.1:8700/v1/capture/anthropic")
    # optional headers: X-Kolm-Namespace (default "default"), X-Kolm-Tenant

The hot path reads the body, checks it is a JSON object, forwards the same bytes with the client's
own key over one shared aiohttp.ClientSession and returns the upstream's answer as-is (SSE chunk by
chunk). aiohttp, not httpx: CPU is what bounds a one-worker proxy on a small machine, and measured
in this proxy the whole process spent ~1.6-1.8 ms of CPU per forwarded request with aiohttp against
~4.7-4.8 ms with httpx. The session never decompresses (`auto_decompress=False`): the upstream's
bytes and its Content-Encoding go to the client unchanged, and the writer decodes its copy for the
stored observation. Everything else (parsing the answer, scrubbing credentials, the insert) happens
after the answer has left, in the BackgroundWriter's thread. `x-kolm-overhead-ms` on every proxied
response is the proxy's own time: total handler time minus the upstream's.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import time
from contextlib import asynccontextmanager
from typing import Any

import aiohttp
import anyio
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response

from kolm_ray.capture.auth import Identity, apply_managed, identify, is_admin, managed_keys
from kolm_ray.capture.bridge import install_error_handlers, read_body
from kolm_ray.capture.bridge import router as bridge_router
from kolm_ray.capture.exchange import Exchange, check_request, parse_omit
from kolm_ray.capture.local import LocalAnswers
from kolm_ray.capture.server import bind_socket, guarded_protocol, uvicorn_config_kwargs
from kolm_ray.capture.spool import Spool, spool_dir
from kolm_ray.capture.upstream import (
    DEFAULT_UPSTREAMS,
    UPSTREAM_CONNECTIONS,
    UPSTREAM_ERRORS,
    UPSTREAM_KEEPALIVE_S,
    UPSTREAM_TIMEOUT,
    PassthroughResponse,
    forward_headers,
    response_headers,
    split_credentials,
    upstream_endpoint,
)
from kolm_ray.capture.workers import mark_ready, run_workers, worker_index, write_report
from kolm_ray.capture.writer import BackgroundWriter
from kolm_ray.errors import KolmError
from kolm_ray.observations.keys import REFRESH_S, KeyTable
from kolm_ray.observations.store import Store, open_store
from kolm_ray.settings import admin_token, kolm_home, redact_url, store_url

log = logging.getLogger("kolm.capture")

CAPTURE_MAX_BODY = 32 * 1024 * 1024  # requests with images can be large; anything bigger is a mistake
MAX_IN_FLIGHT = 2000  # requests being handled at once; past it: 503 + Retry-After, nothing forwarded
PARSE_INLINE_BYTES = 256 * 1024  # bigger request bodies are validated in a worker thread, one at a time


def _error(status: int, message: str) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status)


def _busy(message: str) -> JSONResponse:
    # 503, not 429: the bound is the proxy's capacity, not this client's rate; both SDKs retry a 503
    # with backoff, and Retry-After tells them when.
    return JSONResponse({"error": message}, status_code=503, headers={"Retry-After": "1"})


async def _proxy(request: Request, provider: str, ident: Identity) -> Response:
    state = request.app.state
    if state.in_flight >= state.max_in_flight:
        return _busy(f"capture proxy is at its bound of {state.max_in_flight} requests in flight")
    state.in_flight += 1
    held = 0
    try:
        declared = request.headers.get("content-length", "")
        writer: BackgroundWriter = state.writer
        if declared.isdigit() and not writer.admit(state.held_bytes + int(declared)):
            return _busy("capture backlog is at its byte bound; retry shortly")
        body = await read_body(request, state.capture_max_body)
        held = len(body)
        state.held_bytes += held
        return await _proxy_body(request, provider, body, ident)
    finally:
        state.in_flight -= 1
        state.held_bytes -= held


async def _proxy_body(request: Request, provider: str, body: bytes, ident: Identity) -> Response:
    t0 = time.perf_counter()
    state = request.app.state
    if len(body) <= PARSE_INLINE_BYTES:
        problem = check_request(body)
    else:  # off the event loop, and one at a time: a big body's parse is transient memory
        async with state.parse_lock:
            problem = await anyio.to_thread.run_sync(check_request, body)
    if problem is not None:
        return _error(400, problem)
    namespace, tenant = ident.namespace, ident.tenant  # checked against the capture key (auth.identify)
    url = state.upstreams[provider]
    writer: BackgroundWriter = state.writer
    session: aiohttp.ClientSession = state.http
    encoding: str | None = None  # the upstream answer's Content-Encoding, for the writer to decode

    privacy = getattr(request.state, "kolm_privacy", {})  # set by _answer: redact_pii, omit

    def record(status: int, latency_ms: float, answer: bytes = b"", **kw: Any) -> None:
        writer.submit(
            Exchange(
                provider,
                namespace,
                tenant,
                body,
                status,
                latency_ms,
                body=answer,
                content_encoding=encoding,
                **privacy,
                local_cpu_ms=getattr(request.state, "kolm_local_cpu_ms", None),  # a local try before it
                key_id=ident.key_id,
                **kw,
            )
        )

    t_up = time.perf_counter()
    try:
        up = await session.post(
            state.upstream_urls[provider],
            data=body,
            headers=apply_managed(
                forward_headers(request.headers.raw, state.upstream_auth[provider]), ident, provider
            ),
            allow_redirects=False,  # a redirect goes back to the client, as any response does
        )
    except UPSTREAM_ERRORS as e:
        timed_out = isinstance(e, asyncio.TimeoutError)
        status = 504 if timed_out else 502
        what = "did not answer in time" if timed_out else "unreachable"
        message = f"upstream {url} {what}: {type(e).__name__}: {e}".rstrip(": ")
        record(status, (time.perf_counter() - t_up) * 1000, error=message)
        return _error(status, message)
    t_headers = time.perf_counter()
    encoding = up.headers.get("content-encoding")

    if up.headers.get("content-type", "").startswith("text/event-stream"):

        def on_done(data: bytes, outcome: str, error: str | None) -> None:
            latency = (time.perf_counter() - t_up) * 1000
            record(
                up.status,
                latency,
                data,
                streamed=True,
                client_closed=outcome == "client_closed",
                error=error,
            )

        overhead = (time.perf_counter() - t0 - (t_headers - t_up)) * 1000
        return PassthroughResponse(up, response_headers(up, overhead), on_done)

    try:
        content = await up.read()
    except UPSTREAM_ERRORS as e:
        up.close()
        message = f"upstream {url} broke mid-answer: {type(e).__name__}: {e}"
        record(502, (time.perf_counter() - t_up) * 1000, error=message)
        return _error(502, message)
    except BaseException:  # cancelled (client gone, shutdown): the connection is in an unknown state
        up.close()
        raise
    up.release()
    t_done = time.perf_counter()
    record(up.status, (t_done - t_up) * 1000, content)
    response = Response(content=content, status_code=up.status)
    response.raw_headers = [h for h in response.raw_headers if h[0] == b"content-length"]
    overhead = (time.perf_counter() - t0 - (t_done - t_up)) * 1000
    response.raw_headers.extend(response_headers(up, overhead))
    return response


async def _answer(request: Request, provider: str) -> Response:
    # Who is calling first (capture key, JSON only, header bounds): a refusal forwards and stores nothing.
    ident = identify(request, provider)
    if not isinstance(ident, Identity):
        return ident
    request.state.kolm_identity = ident
    # What this call's observations may keep (docs/privacy.md): settled before anything is forwarded.
    try:
        omit = parse_omit(request.headers.get("x-kolm-omit"))
    except ValueError as e:
        return _error(400, str(e))
    # Per request: the proxy's --redact pii, or the capture key's own `kolm keys create --redact pii`.
    request.state.kolm_privacy = {
        "redact_pii": request.app.state.redact_pii or ident.redact_pii,
        "omit": omit,
    }
    # A promoted model answers its namespace's calls itself (observations/local.py); the rest go upstream.
    local = request.app.state.local
    response = await local.answer(request, provider, ident) if local is not None else None
    if response is None:
        response = await _proxy(request, provider, ident)
        response.raw_headers.append((b"x-kolm-served-by", b"upstream"))
        reason = getattr(request.state, "kolm_upstream_reason", None)
        if reason:
            response.raw_headers.append((b"x-kolm-upstream-reason", reason.encode("latin-1", "replace")))
    return response


async def openai_chat_completions(request: Request) -> Response:
    """POST /v1/capture/openai/chat/completions: OpenAI SDK base_url .../v1/capture/openai."""
    return await _answer(request, "openai")


async def anthropic_messages(request: Request) -> Response:
    """POST /v1/capture/anthropic/v1/messages: Anthropic SDK base_url .../v1/capture/anthropic."""
    return await _answer(request, "anthropic")


def create_app(
    store: Store,
    *,
    openai_upstream: str | None = None,
    anthropic_upstream: str | None = None,
    token: str | None = None,
    capture_max_body: int = CAPTURE_MAX_BODY,
    bridge_max_body: int | None = None,
    own_store: bool = False,
    upstream_timeout: aiohttp.ClientTimeout = UPSTREAM_TIMEOUT,
    retry_window_s: float = 30.0,
    drain_s: float = 10.0,
    max_in_flight: int = MAX_IN_FLIGHT,
    max_queued_bytes: int = 512 * 1024 * 1024,
    spool_max_bytes: int = 1 << 30,
    local_answers: bool = True,
    redact_pii: bool = False,
    keys_refresh_s: float = REFRESH_S,
) -> FastAPI:
    """The capture proxy + bridge API as one ASGI app over `store`.

    token: the bridge's bearer token (None: open). own_store: close the store on shutdown.
    upstream_timeout: connect / between-reads limits for upstream calls (a timeout answers 504).
    retry_window_s: how long a failing store is retried before observations go to the spool.
    drain_s: the most shutdown waits on the store before spooling what is left.
    max_in_flight / max_queued_bytes: past either, requests get 503 + Retry-After before forwarding.
    spool_max_bytes: the spool's size bound (past it observations are counted lost, loudly).
    local_answers: let promoted models answer their namespaces (kolm models promote; observations/local.py).
    redact_pii: store every call's e-mails, phones, cards, IBANs, SSNs as [EMAIL] ... (`--redact pii`).
    keys_refresh_s: how often the capture keys are re-read (a revoke is refused within about this).
    The writer and the shared aiohttp session live for the app's lifespan; shutdown drains the writer.
    """
    upstreams = {
        "openai": upstream_endpoint(openai_upstream or DEFAULT_UPSTREAMS["openai"], "openai"),
        "anthropic": upstream_endpoint(anthropic_upstream or DEFAULT_UPSTREAMS["anthropic"], "anthropic"),
    }

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        connector = aiohttp.TCPConnector(
            limit=UPSTREAM_CONNECTIONS,
            limit_per_host=0,  # one upstream host per provider: the global limit is the one that counts
            keepalive_timeout=UPSTREAM_KEEPALIVE_S,
            ttl_dns_cache=300,
        )
        app.state.http = aiohttp.ClientSession(
            connector=connector,
            timeout=upstream_timeout,
            auto_decompress=False,  # pass the upstream's bytes on as sent; the writer decodes its copy
            cookie_jar=aiohttp.DummyCookieJar(),  # shared by all clients: never replay one's cookies
            raise_for_status=False,
        )
        home = kolm_home()
        app.state.home = home  # where the spool and the dead letters are: a delete reaches them too
        app.state.writer = BackgroundWriter(
            store,
            Spool(spool_dir(home, store.url), max_bytes=spool_max_bytes),
            home / "dead-letter.jsonl",
            retry_window_s=retry_window_s,
            max_queued_bytes=max_queued_bytes,
        )
        app.state.parse_lock = anyio.Lock()
        await anyio.to_thread.run_sync(app.state.keys.start)  # the first read before any call is served
        if app.state.local is not None:
            app.state.local.start()
        try:
            yield
        finally:
            app.state.keys.stop()
            if app.state.local is not None:
                await app.state.local.aclose()  # in-flight shadow calls finish and are stored
            await app.state.http.close()
            # drain: every answer is stored, or (past drain_s, or the store failing) spooled
            await anyio.to_thread.run_sync(lambda: app.state.writer.close(drain_s))
            if own_store:
                store.close()

    app = FastAPI(title="kolm capture", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.store = store
    # Shown (banner, 502/504 messages, stored errors): password redacted. Posted to: parsed once, without
    # its credentials, which travel as Basic auth when the caller sends no Authorization of its own.
    app.state.upstreams = {k: redact_url(v) for k, v in upstreams.items()}
    parts = {k: split_credentials(v) for k, v in upstreams.items()}
    app.state.upstream_urls = {k: u for k, (u, _) in parts.items()}
    app.state.upstream_auth = {k: auth for k, (_, auth) in parts.items()}
    app.state.admin_token = token
    app.state.redact_pii = redact_pii
    app.state.keys = KeyTable(store, refresh_s=keys_refresh_s)  # capture keys (observations/keys.py)
    app.state.managed_keys = managed_keys()  # KOLM_OPENAI_API_KEY / KOLM_ANTHROPIC_API_KEY (auth.py)
    app.state.capture_max_body = capture_max_body
    app.state.max_in_flight = max_in_flight
    app.state.in_flight = 0
    app.state.held_bytes = 0  # request bodies being handled (the writer's queue counts the rest)
    app.state.local = LocalAnswers(store) if local_answers else None  # KOLM_SHADOW_RATE is checked here
    if bridge_max_body is not None:
        app.state.bridge_max_body = bridge_max_body
    install_error_handlers(app)
    # Plain Starlette routes: no dependency solving on the hot path.
    app.router.add_route("/v1/capture/openai/chat/completions", openai_chat_completions, methods=["POST"])
    app.router.add_route("/v1/capture/anthropic/v1/messages", anthropic_messages, methods=["POST"])
    app.include_router(bridge_router)

    scheme = store.url.split(":", 1)[0]  # never the path or a password

    async def healthz(request: Request) -> JSONResponse:
        """200 {"ok": true, "store": scheme, "pending": n} while every answer is being stored; else 503.

        Live models, problems and this worker's own details only with the admin token (auth.is_admin)."""
        w: BackgroundWriter | None = getattr(app.state, "writer", None)
        if w is None:
            return JSONResponse({"ok": False, "reason": "starting"}, status_code=503)
        ok, reason = w.health()
        if not is_admin(request):
            return JSONResponse(
                {"ok": ok, "store": scheme, "pending": w.pending}, status_code=200 if ok else 503
            )
        if app.state.keys.problem:
            extra_problem = {"keys": app.state.keys.problem}
        else:
            extra_problem = {}
        # Rows no store would take even sanitised (in $KOLM_HOME/dead-letter.jsonl): shown once there are any.
        extra = {"dead_lettered": w.dead_lettered} if w.dead_lettered else {}
        # This process's own state: with --workers N each worker answers for itself (pid, "i/N").
        me = {"pid": os.getpid(), "worker": worker_index()} if worker_index() is not None else {}
        # Promoted models: which namespaces answer locally, and why one does not (a missing file, say).
        me.update({} if app.state.local is None else app.state.local.status())
        me.update(extra_problem)
        if not ok:
            body = {"ok": False, "reason": reason, "pending": w.pending, **extra, **me}
            return JSONResponse(body, status_code=503)
        return JSONResponse({"ok": True, "store": scheme, "pending": w.pending, **extra, **me})

    app.router.add_route("/healthz", healthz, methods=["GET"])

    return app


def _banner(upstreams: dict[str, str], token: str | None, store_shown: str, base: str) -> list[str]:
    return [
        f"  OpenAI SDK:    base_url={base}/v1/capture/openai    -> {redact_url(upstreams['openai'])}",
        f"  Anthropic SDK: base_url={base}/v1/capture/anthropic -> {redact_url(upstreams['anthropic'])}",
        f"  bridge API:    {base}/v1/bridges/observations{' (bearer token required)' if token else ''}",
        f"  store:         {store_shown}",
    ]


# Operational limits of `kolm capture`, from the environment (seconds unless named otherwise).
CAPTURE_ENV = {
    "KOLM_CAPTURE_RETRY_S": 30.0,  # a failing store is retried this long, then observations are spooled
    "KOLM_CAPTURE_DRAIN_S": 10.0,  # SIGTERM waits this long on a failing store, then spools the rest
    "KOLM_CAPTURE_HEADER_TIMEOUT_S": 10.0,  # request line + headers must arrive within this
    "KOLM_CAPTURE_BODY_TIMEOUT_S": 60.0,  # the body must arrive within this after the headers
    "KOLM_CAPTURE_IDLE_TIMEOUT_S": 15.0,  # an idle keep-alive connection is closed after this
    "KOLM_CAPTURE_MAX_IN_FLIGHT": float(MAX_IN_FLIGHT),
    "KOLM_CAPTURE_MAX_QUEUED_MB": 512.0,  # answered-but-unwritten bytes held in memory, at most
    "KOLM_SPOOL_MAX_MB": 1024.0,  # the on-disk spool's bound
}


def capture_settings() -> dict[str, float]:
    """CAPTURE_ENV with the environment's values; KolmError naming a variable that is not a positive number."""

    out = {}
    for name, default in CAPTURE_ENV.items():
        raw = os.environ.get(name)
        if raw is None or raw == "":
            out[name] = default
            continue
        try:
            value = float(raw)
        except ValueError:
            value = -1.0
        if not value > 0 or value != value or value == float("inf"):
            raise KolmError(f"{name}={raw!r}: expected a positive number")
        out[name] = value
    return out


def capture_command(args: argparse.Namespace) -> int:
    """`kolm capture`: run the proxy until SIGINT/SIGTERM, then finish in-flight answers and drain.

    --workers N (N > 1): N such processes on one port, supervised by this one (see workers.py).
    """
    import uvicorn

    token = admin_token()
    env = capture_settings()
    workers = getattr(args, "workers", 1) or 1
    worker = worker_index()
    if workers > 1 and worker is None:
        url = store_url(args.store)
        open_store(url).close()  # migrations once, and a bad URL is exit 2 here, before any worker
        upstreams = {
            "openai": upstream_endpoint(args.openai_upstream or DEFAULT_UPSTREAMS["openai"], "openai"),
            "anthropic": upstream_endpoint(
                args.anthropic_upstream or DEFAULT_UPSTREAMS["anthropic"], "anthropic"
            ),
        }
        return run_workers(args, url, lambda base: _banner(upstreams, token, redact_url(url), base))
    store = open_store(args.store)
    try:
        app = create_app(
            store,
            openai_upstream=args.openai_upstream,
            anthropic_upstream=args.anthropic_upstream,
            token=token,
            own_store=True,
            retry_window_s=env["KOLM_CAPTURE_RETRY_S"],
            drain_s=env["KOLM_CAPTURE_DRAIN_S"],
            max_in_flight=int(env["KOLM_CAPTURE_MAX_IN_FLIGHT"]),
            max_queued_bytes=int(env["KOLM_CAPTURE_MAX_QUEUED_MB"] * 1024 * 1024),
            spool_max_bytes=int(env["KOLM_SPOOL_MAX_MB"] * 1024 * 1024),
            redact_pii=getattr(args, "redact", None) == "pii",
        )
        sock = bind_socket(args.host, args.port, reuse_port=worker is not None)
    except BaseException:
        store.close()
        raise
    host, port = sock.getsockname()[:2]
    shown = f"[{host}]" if ":" in host else host
    if worker is None:
        lines = _banner(app.state.upstreams, token, redact_url(store.url), f"http://{shown}:{port}")
        print(f"kolm capture listening on http://{shown}:{port}\n" + "\n".join(lines), flush=True)
    else:
        mark_ready()  # listening: connections wait in this socket's backlog until the loop runs
    config = {
        **uvicorn_config_kwargs(),
        "http": guarded_protocol(env["KOLM_CAPTURE_HEADER_TIMEOUT_S"], env["KOLM_CAPTURE_BODY_TIMEOUT_S"]),
        "timeout_keep_alive": env["KOLM_CAPTURE_IDLE_TIMEOUT_S"],
    }
    server = uvicorn.Server(uvicorn.Config(app, lifespan="on", **config))
    # uvicorn re-raises the signal it stopped on after its graceful shutdown; with SIGTERM's default
    # action that would kill us before the summary line. The shutdown already happened: ignore it then.
    previous = signal.signal(signal.SIGTERM, lambda *_: None)
    try:
        server.run(sockets=[sock])
    finally:
        signal.signal(signal.SIGTERM, previous)
        sock.close()
        writer = getattr(app.state, "writer", None)
        if writer is not None:
            writer.close(env["KOLM_CAPTURE_DRAIN_S"])
        store.close()
    if writer is not None:
        if worker is None:
            print(
                f"kolm capture stopped: {writer.written} observations stored, {writer.lost} lost, "
                f"{writer.spool_rows} in the spool (replayed at the next start), "
                f"{writer.dead_lettered} dead-lettered, {writer.sanitized} sanitised",
                flush=True,
            )
        else:
            write_report(writer.written, writer.lost)
    return 0
