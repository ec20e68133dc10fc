"""The capture proxy's background writer: turn finished exchanges into observations off the hot path.

The request handler only does `writer.submit(exchange)` (a queue put, microseconds) after the answer
is on its way; a thread assembles each Observation (parsing the response or SSE stream) and inserts
them in batches, one transaction per batch. `close()` drains the queue fully before returning, which
is how SIGTERM loses nothing: uvicorn finishes in-flight requests, then the app's shutdown closes this.
"""

from __future__ import annotations

import json
import logging
import queue
import threading
import time
import zlib
from dataclasses import dataclass, field
from typing import Any

from kolm_ray.observations.model import CLIENT_CLOSED, Observation, utcnow
from kolm_ray.observations.store import Store
from kolm_ray.providers import Extracted, scrub_credentials
from kolm_ray.providers import anthropic as anthropic_fmt
from kolm_ray.providers import openai as openai_fmt

log = logging.getLogger("kolm.capture")
FORMATS = {"openai": openai_fmt, "anthropic": anthropic_fmt}


@dataclass
class Exchange:
    """One answered request, as raw as the handler had it (parsing happens in the writer thread)."""

    provider: str
    namespace: str
    tenant: str | None
    request: dict[str, Any]
    status: int
    latency_ms: float
    body: bytes = b""
    """The upstream's full answer (JSON), or the SSE bytes received when `streamed`."""
    streamed: bool = False
    client_closed: bool = False
    """The client left before the stream ended: stored verified=false, status 499."""
    error: str | None = None
    """The proxy's own failure (upstream unreachable, stream cut by the upstream)."""
    created_at: Any = field(default_factory=utcnow)
    content_encoding: str | None = None
    """The answer's Content-Encoding: `body` is the bytes as the upstream sent them (passed on undecoded)."""
    local: bool = False
    """Answered by the namespace's promoted model (observations/local.py): stored with provider "local"."""
    observation_id: str | None = None
    """The observation's id when the caller must know it (a shadow pair links the two); else a fresh one."""


def _decoders() -> dict[str, Any]:
    out: dict[str, Any] = {
        "identity": lambda b: b,
        "gzip": _gunzip,
        "x-gzip": _gunzip,
        # RFC 9110 "deflate" is zlib-wrapped; some servers send raw deflate: try both.
        "deflate": _inflate,
    }
    try:
        import brotli  # type: ignore[import-not-found]

        out["br"] = brotli.decompress
    except ImportError:
        pass
    try:
        import zstandard  # type: ignore[import-not-found]

        out["zstd"] = lambda b: zstandard.ZstdDecompressor().decompressobj().decompress(b)
    except ImportError:
        pass
    return out


def _gunzip(b: bytes) -> bytes:
    # A decompressobj, not zlib.decompress: a stream cut mid-answer still yields what it carried.
    out = []
    while b:
        d = zlib.decompressobj(16 + zlib.MAX_WBITS)
        out.append(d.decompress(b))
        b = d.unused_data  # concatenated gzip members
    return b"".join(out)


def _inflate(b: bytes) -> bytes:
    try:
        return zlib.decompressobj().decompress(b)
    except zlib.error:
        return zlib.decompressobj(-zlib.MAX_WBITS).decompress(b)


_DECODERS = _decoders()


def decode_body(body: bytes, content_encoding: str | None) -> bytes:
    """Undo a Content-Encoding (codings applied in order, so undone in reverse). ValueError if it can't."""
    if not content_encoding or not body:
        return body
    for coding in reversed([c.strip().lower() for c in content_encoding.split(",") if c.strip()]):
        decode = _DECODERS.get(coding)
        if decode is None:
            raise ValueError(f"content-encoding {coding!r} is not one the store can decode")
        try:
            body = decode(body)
        except Exception as e:  # zlib.error, brotli.error, ...: a truncated or corrupt body
            raise ValueError(f"cannot decode content-encoding {coding!r}: {e}") from None
    return body


def to_observation(ex: Exchange) -> Observation:
    """Build the one Observation for an exchange. Never raises on a malformed answer: it is stored as-is."""
    fmt = FORMATS[ex.provider]
    request = scrub_credentials(ex.request)
    try:
        input_text = fmt.input_text(ex.request)
    except Exception:  # a strange request still yields its one observation
        input_text = json.dumps(ex.request.get("messages"), ensure_ascii=False)[:10000]
    parsed = Extracted()
    if ex.error is None or ex.body:
        raw = ex.body
        try:
            raw = decode_body(ex.body, ex.content_encoding)
        except ValueError as e:
            # A cut compressed stream ends mid-block: nothing usable to parse, and it is known-bad.
            parsed = Extracted(output=None, error=str(e))
        else:
            try:
                if ex.streamed:
                    parsed = fmt.from_stream(raw)
                else:
                    body = json.loads(raw) if raw else None
                    parsed = fmt.from_response(body)
            except ValueError:
                parsed = Extracted(output=raw.decode("utf-8", "replace"), error="upstream answer is not JSON")
    ok = 200 <= ex.status < 300 and ex.error is None and parsed.error is None and not ex.client_closed
    if ex.streamed and not parsed.complete:
        ok = False
    output = parsed.output
    if ex.error is not None and not ex.body:
        output = {"error": ex.error}
    return Observation(
        **({"id": ex.observation_id} if ex.observation_id else {}),
        namespace=ex.namespace,
        tenant=ex.tenant,
        provider="local" if ex.local else ex.provider,
        model=parsed.model or (ex.request.get("model") if isinstance(ex.request.get("model"), str) else None),
        input=input_text,
        output=output,
        # Failures are known-bad (false); successes are not judged yet (null) until someone verifies.
        verified=None if ok else False,
        status=CLIENT_CLOSED if ex.client_closed else ex.status,
        latency_ms=round(ex.latency_ms, 3),
        usage=parsed.usage,
        created_at=ex.created_at,
        request=request,
    )


_STOP = object()


class BackgroundWriter:
    """A queue and one thread doing batched inserts. Thread-safe `submit`; `close` drains everything."""

    def __init__(self, store: Store, max_batch: int = 500, retries: int = 5) -> None:
        self.store = store
        self.max_batch = max_batch
        self.retries = retries
        self._q: queue.SimpleQueue = queue.SimpleQueue()
        self._cond = threading.Condition()
        self.submitted = 0
        self.written = 0
        self.lost = 0
        self._closed = False
        self._thread = threading.Thread(target=self._run, name="kolm-capture-writer", daemon=False)
        self._thread.start()

    def submit(self, ex: Exchange) -> None:
        """Queue an exchange for storage (after close, it is written synchronously: never dropped)."""
        with self._cond:
            self.submitted += 1
            if not self._closed:
                self._q.put(ex)  # under the lock, so it cannot land behind close()'s stop marker
                return
        self._write([ex])

    def flush(self, timeout: float = 10.0) -> bool:
        """Wait until everything submitted before this call is stored; False on timeout."""
        with self._cond:
            target = self.submitted
            return self._cond.wait_for(lambda: self.written + self.lost >= target, timeout=timeout)

    def _run(self) -> None:
        while True:
            item = self._q.get()
            batch = [] if item is _STOP else [item]
            stop = item is _STOP
            while not stop and len(batch) < self.max_batch:
                try:
                    nxt = self._q.get_nowait()
                except queue.Empty:
                    break
                if nxt is _STOP:
                    stop = True
                else:
                    batch.append(nxt)
            if batch:
                self._write(batch)
            if stop:
                return

    def _write(self, batch: list[Exchange]) -> None:
        observations = []
        for ex in batch:
            # Give the GIL back between items: the event loop thread must not wait out a whole
            # batch of parsing (the interpreter's switch interval is 5 ms) on a busy answer.
            time.sleep(0)
            try:
                observations.append(to_observation(ex))
            except Exception:  # pragma: no cover - to_observation is defensive; count, never crash
                log.exception("could not build an observation; dropping it")
                with self._cond:
                    self.lost += 1
                    self._cond.notify_all()
        delay = 0.05
        for attempt in range(self.retries + 1):
            try:
                self.store.append_many(observations)
                break
            except Exception as e:  # e.g. database locked by another process for too long
                if attempt == self.retries:
                    log.error("lost %d observations: %s", len(observations), e)
                    with self._cond:
                        self.lost += len(observations)
                        self._cond.notify_all()
                    return
                time.sleep(delay)
                delay *= 2
        with self._cond:
            self.written += len(observations)
            self._cond.notify_all()

    def close(self, timeout: float | None = None) -> None:
        """Stop accepting queued work and drain what is queued (idempotent)."""
        with self._cond:
            if self._closed:
                return
            self._closed = True
            self._q.put(_STOP)
        self._thread.join(timeout)
