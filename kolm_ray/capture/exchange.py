"""One answered request as the proxy saw it, and how it becomes an Observation (off the hot path).

    problem = check_request(body)            # None, or why the body is refused (400) before forwarding
    obs = to_observation(Exchange(...))      # parse, decode, scrub; never raises
    clean = sanitize(obs)                    # the same observation with what a store cannot encode fixed

The handler keeps only the raw bytes (`Exchange.request_body`, `body`): a 32 MiB body of small JSON
objects is ~9x its size once parsed, so it is parsed here, in the writer's thread, one at a time.
"""

from __future__ import annotations

import io
import json
import re
import zlib
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from kolm_ray.observations.model import CLIENT_CLOSED, NAMESPACE_RE, Observation, Omitted, utcnow
from kolm_ray.providers import Extracted, scrub_credentials, scrub_text
from kolm_ray.providers import anthropic as anthropic_fmt
from kolm_ray.providers import openai as openai_fmt
from kolm_ray.providers.pii import redact_pii, redact_pii_json

FORMATS = {"openai": openai_fmt, "anthropic": anthropic_fmt}
MAX_DEPTH = 128  # JSON nesting a request may have: real schemas nest ~10-20; deeper is refused (400)
DECODED_MAX = 64 * 1024 * 1024  # an upstream answer decoded past this (a gzip/br bomb) is not stored


@dataclass
class Exchange:
    """One answered request, as raw as the handler had it (parsing happens in the writer thread)."""

    provider: str
    namespace: str
    tenant: str | None
    request_body: bytes
    """The client's request body as sent (validated UTF-8 JSON object)."""
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
    redact_pii: bool = False
    """Replace e-mails, phone numbers, card numbers, IBANs and SSNs by [EMAIL] ... in input, output and
    request (providers/pii.py): the proxy's `--redact pii`, or the caller's capture key's choice."""
    omit: Omitted | None = None
    """X-Kolm-Omit: store no text of this side ("request": input and request, "response": output, "all")."""
    local_cpu_ms: float | None = None
    """CPU milliseconds the namespace's local model spent on this call (answered locally, or tried and sent
    upstream below its threshold): stored as usage.kolm_local_cpu_ms, priced by `kolm report`'s net savings."""
    key_id: str | None = None
    """The capture key the call came with (auth.Identity.key_id): stored as the observation's key_id."""

    @property
    def nbytes(self) -> int:
        """What this exchange holds in memory until it is written (what the queue's byte bound counts)."""
        return len(self.request_body) + len(self.body) + 512


# ---------------------------------------------------------------- validating a request before forwarding

_NOT_BRACKETS = bytes(b for b in range(256) if b not in b"[]{}")


def nesting_depth(body: bytes) -> int:
    """How deep the JSON text nests, found without parsing (so no recursion at all), all in C.

    Escaped backslashes and quotes are removed, so every `"` left delimits a string; the pieces
    outside strings are every other one of a split on `"`; their brackets' running sum is the depth.
    """
    text = body.replace(b"\\\\", b"").replace(b'\\"', b"")
    brackets = b"".join(text.split(b'"')[::2]).translate(None, _NOT_BRACKETS)
    if not brackets:
        return 0
    a = np.frombuffer(brackets, dtype=np.uint8)
    steps = np.where((a == ord("[")) | (a == ord("{")), 1, -1).astype(np.int32)
    return int(np.cumsum(steps).max())


def _discard(pairs: list) -> None:
    return None  # validation only: no dict is built, so a big body's parse stays small in memory


FULL_PARSE_BYTES = 1024 * 1024  # bodies up to this are parsed to check them; bigger ones only scanned


def check_request(body: bytes) -> str | None:
    """Why a capture request body is refused before forwarding (400), or None when it is fine.

    Must be UTF-8 (json.loads would also take UTF-16/32), an object, nested at most MAX_DEPTH, and
    (up to FULL_PARSE_BYTES) JSON. A bigger body is scanned, not parsed: a parse holds the GIL, and so
    the event loop, for ~1 s per 32 MiB, and the writer parses it once anyway (a body that turns out
    not to be JSON is stored as sent, and the upstream answers it with its own 400).
    """
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError as e:
        return f"request body is not valid UTF-8 (byte {e.start}): send UTF-8 JSON"
    # Depth is at most the number of opening brackets (in strings or not): two C scans settle a typical
    # body, and only one with more than MAX_DEPTH of them pays for the exact scan.
    if body.count(b"{") + body.count(b"[") > MAX_DEPTH and nesting_depth(body) > MAX_DEPTH:
        return f"request body nests deeper than {MAX_DEPTH} levels"
    stripped = text[:64].lstrip(" \t\r\n")
    if len(body) > FULL_PARSE_BYTES:
        if not stripped.startswith("{") or not text.rstrip(" \t\r\n").endswith("}"):
            return "request body must be a JSON object"
        return None
    try:
        json.loads(text, object_pairs_hook=_discard)
    except RecursionError:  # pragma: no cover - the depth check runs first
        return f"request body nests deeper than {MAX_DEPTH} levels"
    except ValueError as e:
        return f"request body is not valid JSON: {e}"
    if not stripped.startswith("{"):
        kind = {"[": "array", '"': "string"}.get(stripped[:1], "scalar")
        return f"request body must be a JSON object, got {kind}"
    return None


OMIT_VALUES = ("request", "response", "all")


def parse_omit(header: str | None) -> Omitted | None:
    """The X-Kolm-Omit header's value (None when absent); ValueError (a 400 before forwarding) when bad."""
    if header is None:
        return None
    value = header.strip().lower()
    if value not in OMIT_VALUES:
        shown = "".join(ch for ch in header[:40] if ch.isprintable())
        raise ValueError(f"X-Kolm-Omit: {shown!r} is not one of request, response, all")
    return value  # type: ignore[return-value]


# ---------------------------------------------------------------- decoding the upstream's answer, capped


class _TooBig(ValueError):
    pass


def _zlib(b: bytes, wbits: int, cap: int) -> bytes:
    out: list[bytes] = []
    size = 0
    while b:
        d = zlib.decompressobj(wbits)
        chunk = d.decompress(b, cap + 1 - size)
        size += len(chunk)
        out.append(chunk)
        if size > cap or d.unconsumed_tail:
            raise _TooBig(f"decoded answer is over {cap} bytes")
        b = d.unused_data if wbits & 16 else b""  # concatenated gzip members
    return b"".join(out)


def _inflate(b: bytes, cap: int) -> bytes:
    try:  # RFC 9110 "deflate" is zlib-wrapped; some servers send raw deflate: try both
        return _zlib(b, zlib.MAX_WBITS, cap)
    except _TooBig:
        raise
    except zlib.error:
        return _zlib(b, -zlib.MAX_WBITS, cap)


def _brotli(b: bytes, cap: int) -> bytes:
    import brotli  # type: ignore[import-not-found]

    d = brotli.Decompressor()
    try:
        out = d.process(b, output_buffer_limit=cap + 1)  # brotli >= 1.2: a bounded output buffer
    except TypeError:
        raise ValueError("br answers need brotli>=1.2 to be decoded within a size cap") from None
    if len(out) > cap or not d.is_finished():
        raise _TooBig(f"decoded answer is over {cap} bytes")
    return out


def _zstd(b: bytes, cap: int) -> bytes:
    import zstandard  # type: ignore[import-not-found]

    out = zstandard.ZstdDecompressor().stream_reader(io.BytesIO(b)).read(cap + 1)
    if len(out) > cap:
        raise _TooBig(f"decoded answer is over {cap} bytes")
    return out


_DECODERS = {
    "identity": lambda b, cap: b,
    "gzip": lambda b, cap: _zlib(b, 16 + zlib.MAX_WBITS, cap),
    "x-gzip": lambda b, cap: _zlib(b, 16 + zlib.MAX_WBITS, cap),
    "deflate": _inflate,
    "br": _brotli,
    "zstd": _zstd,
}


def decode_body(body: bytes, content_encoding: str | None, cap: int = DECODED_MAX) -> bytes:
    """Undo a Content-Encoding (codings applied in order, so undone in reverse), never past `cap` bytes.

    ValueError when it cannot (unknown coding, corrupt or cut stream, decoded size over the cap)."""
    if not content_encoding or not body:
        return body
    for coding in reversed([c.strip().lower() for c in content_encoding.split(",") if c.strip()]):
        decode = _DECODERS.get(coding)
        if decode is None:
            raise ValueError(f"content-encoding {coding!r} is not one the store can decode")
        try:
            body = decode(body, cap)
        except ValueError:
            raise
        except ImportError:
            raise ValueError(f"content-encoding {coding!r} needs a package that is not installed") from None
        except Exception as e:  # zlib.error, brotli.error, ...: a truncated or corrupt body
            raise ValueError(f"cannot decode content-encoding {coding!r}: {e}") from None
    return body


# ---------------------------------------------------------------- building the observation


def _request(ex: Exchange) -> dict[str, Any]:
    try:
        value = json.loads(ex.request_body)
    except (ValueError, RecursionError):  # checked before forwarding; defensive for direct callers
        return {}
    return value if isinstance(value, dict) else {}


def _build(ex: Exchange) -> Observation:
    fmt = FORMATS[ex.provider]
    raw_request = _request(ex)
    request = scrub_credentials(raw_request)
    try:
        input_text = fmt.input_text(raw_request)
    except Exception:  # a strange request still yields its one observation
        input_text = json.dumps(raw_request.get("messages"), ensure_ascii=False)[:10000]
    parsed = Extracted()
    if ex.error is None or ex.body:
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
                    parsed = fmt.from_response(json.loads(raw) if raw else None)
            except (ValueError, RecursionError):
                parsed = Extracted(output=raw.decode("utf-8", "replace"), error="upstream answer is not JSON")
    ok = 200 <= ex.status < 300 and ex.error is None and parsed.error is None and not ex.client_closed
    if ex.streamed and not parsed.complete:
        ok = False
    output = parsed.output
    if ex.error is not None and not ex.body:
        output = {"error": ex.error}
    model = parsed.model or (raw_request.get("model") if isinstance(raw_request.get("model"), str) else None)
    input_text, output, request = _private(ex, scrub_text(input_text), scrub_credentials(output), request)
    return Observation(
        **({"id": ex.observation_id} if ex.observation_id else {}),
        namespace=ex.namespace,
        tenant=ex.tenant,
        provider="local" if ex.local else ex.provider,
        model=model,
        input=input_text,
        output=output,
        # Failures are known-bad (false); successes are not judged yet (null) until someone verifies.
        verified=None if ok else False,
        status=CLIENT_CLOSED if ex.client_closed else ex.status,
        latency_ms=round(ex.latency_ms, 3),
        usage=_with_local_cpu(parsed.usage, ex.local_cpu_ms),
        created_at=ex.created_at,
        request=request,
        omitted=ex.omit,
        key_id=ex.key_id,
    )


def _clip(value: Any, limit: int) -> str | None:
    return value[:limit] if isinstance(value, str) else None


def _private(ex: Exchange, input_text: str, output: Any, request: Any) -> tuple[str, Any, Any]:
    """What privacy leaves of the three texts: nothing of an omitted side, PII redacted in the rest."""
    if ex.omit in ("request", "all"):
        input_text, request = "", None
    if ex.omit in ("response", "all"):
        output = None
    if ex.redact_pii:
        input_text, output, request = (
            redact_pii(input_text),
            redact_pii_json(output),
            redact_pii_json(request),
        )
    return input_text, output, request


def _with_local_cpu(usage: Any, cpu_ms: float | None) -> Any:
    """The provider's usage, plus `kolm_local_cpu_ms` when the local model ran for this call (token counts
    are untouched: `kolm report` prices them as before)."""
    if cpu_ms is None:
        return usage
    return {**(usage if isinstance(usage, dict) else {}), "kolm_local_cpu_ms": round(float(cpu_ms), 3)}


def to_observation(ex: Exchange) -> Observation:
    """The one Observation for an exchange. Never raises: what cannot be parsed (or validated: a field
    over its bound from a direct caller) is stored as a failure, with every field clipped to its bound."""
    try:
        return _build(ex)
    except Exception as e:  # a provider parser's surprise must not cost the exchange its observation
        namespace = (
            ex.namespace
            if isinstance(ex.namespace, str) and NAMESPACE_RE.fullmatch(ex.namespace)
            else "default"
        )
        text = scrub_text(bytes(ex.request_body[:10000]).decode("utf-8", "replace"))
        text = _private(ex, text, None, None)[0]
        return Observation(
            **({"id": ex.observation_id[:128]} if ex.observation_id else {}),
            namespace=namespace,
            tenant=_clip(ex.tenant, 256),
            provider="local" if ex.local else ex.provider if ex.provider in FORMATS else "import",
            input=text,
            omitted=ex.omit if ex.omit in ("request", "response", "all") else None,
            output={"error": f"kolm could not parse this exchange: {type(e).__name__}: {e}"[:2000]},
            verified=False,
            status=CLIENT_CLOSED if ex.client_closed else ex.status if isinstance(ex.status, int) else None,
            latency_ms=round(float(ex.latency_ms), 3),
            created_at=ex.created_at,
            key_id=_clip(ex.key_id, 64),
        )


_SURROGATE = re.compile("[\ud800-\udfff]")  # in a str from json.loads, every surrogate is a lone one


def _fix_text(value: str) -> str:
    return _SURROGATE.sub("\ufffd", value.replace("\x00", "\ufffd"))


def _fix(value: Any) -> Any:
    if isinstance(value, str):
        return _fix_text(value)
    if value is None or isinstance(value, (bool, int, float)):
        return value
    text = json.dumps(value, ensure_ascii=False, default=str)
    return json.loads(_fix_text(text), parse_constant=lambda _: None)  # NaN, Infinity: null


def sanitize(obs: Observation) -> Observation:
    """The same observation with what stores refuse replaced by U+FFFD: lone surrogates (no UTF-8 form)
    and NUL characters (PostgreSQL text refuses them); NaN/Infinity numbers become null."""
    fields = obs.model_dump()
    for name in ("namespace", "tenant", "model", "input"):
        if isinstance(fields.get(name), str):
            fields[name] = _fix_text(fields[name])
    for name in ("output", "usage", "request"):
        fields[name] = _fix(fields.get(name))
    return Observation.model_validate(fields)
