"""Local answers in the capture proxy: a namespace with a live model answers its own calls.

    kolm models promote tagger.kolm --namespace support    # the proxy picks it up within ~1 s, no restart

For a request whose namespace has a live model (registry.live_models) and whose shape is the one the model
was compiled for (request_shape.matches: same system prompt and response format, one user turn when it
only saw those), the proxy runs the model, the same Predictor `kolm run` uses, on a worker thread (never
on the event loop) and answers in the provider's wire format (providers.local_wire), the assistant text
being the model's JSON output in the field order of the spec's schema. Below the model's confidence
threshold, for any other shape, for parameters a single answer cannot honour (n > 1, logprobs), with
`X-Kolm-Local: off`, or while the model is loading or broken: the call goes upstream, captured as before,
and the response says why in `x-kolm-upstream-reason`.

A poller thread reads the live versions about once a second (one indexed query) off the hot path; a newly
promoted (or rolled back) version is verified and loaded there, then swapped in by one reference
assignment, so no request ever waits for a load or sees a half-loaded model. A row whose file went missing
or no longer verifies is dropped from serving and reported by `status()` (merged into /healthz).

Shadow: a share of local answers (KOLM_SHADOW_RATE, default 0.05) is also sent upstream after the answer
has left, with the caller's own headers (held in memory by that task only, never stored); the upstream's
answer is an ordinary observation (it trains the next model, the local one never does), and the pair with
its agreement under the K-score's field rules goes to the store's shadow_pairs table.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import random
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from starlette.requests import Request
from starlette.responses import Response

from kolm_ray.errors import KolmError
from kolm_ray.observations.model import new_id
from kolm_ray.observations.store import Store

LOCAL_MAX_BODY = 256 * 1024  # a classifier call is a few KiB; bigger ones go the bounded upstream path
log = logging.getLogger("kolm.local")
DEFAULT_SHADOW_RATE = 0.05  # 1 in 20 local answers re-asked upstream: live agreement at 5% of the spend
POLL_S = 1.0  # how often the registry's live versions are read (a promotion is served within about this)
RETIRE_S = 30.0  # a replaced predictor is closed this long after the swap (in-flight calls finish first)
UNSUPPORTED = ("n", "logprobs", "top_logprobs", "tools", "tool_choice", "functions")  # one JSON answer can't


def shadow_rate() -> float:
    """KOLM_SHADOW_RATE in [0, 1] (default 0.05); KolmError (exit 2) on anything else."""
    raw = os.environ.get("KOLM_SHADOW_RATE")
    if raw is None or raw.strip() == "":
        return DEFAULT_SHADOW_RATE
    try:
        rate = float(raw)
    except ValueError:
        rate = -1.0
    if not 0.0 <= rate <= 1.0:
        raise KolmError(f"KOLM_SHADOW_RATE must be a number in [0, 1], got {raw!r}")
    return rate


@dataclass
class Loaded:
    """A live model, loaded: its registry row, its predictor and the file state it was verified at."""

    row: Any  # registry.ModelRow
    predictor: Any  # predictors.Predictor
    stat: tuple[int, int]
    fields: list[str] | None  # the spec schema's property order (None: a non-object output)

    def answer(self, text: str) -> dict[str, Any]:
        return self.predictor.predict([text])[0]

    def render(self, prediction: dict[str, Any]) -> Any:
        """The model's output value, fields in the schema's order (confidence only where the schema has it)."""
        if self.fields is None:
            return prediction.get("output")
        return {k: prediction[k] for k in self.fields if k in prediction}


def _timed(loaded: Loaded, text: str) -> tuple[dict[str, Any], float]:
    """The model's answer and the CPU milliseconds it took: the process's CPU time over the call (torch's
    intra-op threads included, which a per-thread clock would miss). Anything else the proxy computes on
    other threads meanwhile is counted too, so this is an upper bound: net savings err on the low side."""
    c0 = time.process_time()
    out = loaded.answer(text)
    return out, (time.process_time() - c0) * 1000


def _stat(path: str) -> tuple[int, int]:
    st = Path(path).stat()
    return st.st_mtime_ns, st.st_size


class LocalAnswers:
    """The proxy's local-answer state: loaded live models, the predict thread, shadow tasks. Thread-safe."""

    def __init__(self, store: Store, rate: float | None = None, poll_s: float = POLL_S) -> None:
        self.store = store
        self.rate = shadow_rate() if rate is None else rate
        self.poll_s = poll_s
        self.live: dict[str, Loaded] = {}  # replaced whole (never mutated): readers need no lock
        self.problems: dict[str, str] = {}
        self.drift: dict[str, tuple[str, float | None, int]] = {}  # ns -> drift.namespace_state (poller)
        self.served = {"local": 0, "upstream": 0, "shadowed": 0}
        # One thread: the model is CPU-bound and uses torch's intra-op threads; two calls at once would
        # only contend for the same cores.
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="kolm-local")
        self._retired: list[tuple[float, Any]] = []
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._tasks: set[asyncio.Task] = set()

    # ---- registry following (poller thread) -------------------------------------------------------------
    def start(self) -> None:
        """Follow the registry from a daemon thread (its first read is immediate; loading never blocks)."""
        self._thread = threading.Thread(target=self._poll, name="kolm-local-poll", daemon=True)
        self._thread.start()

    def _poll(self) -> None:
        wait = 0.0
        while not self._stop.wait(wait):
            wait = self.poll_s
            try:
                self.refresh()
            except Exception as e:  # the store is down: keep serving what is loaded, say why
                self.problems = {
                    **self.problems,
                    "registry": f"cannot read the registry: {type(e).__name__}: {e}",
                }

    def refresh(self) -> None:
        """Read live versions; load new ones, drop gone or broken ones; swap the map in one assignment."""
        from kolm_ray import registry

        rows = registry.live_models(self.store)
        live, problems = dict(self.live), {}
        for ns in set(live) - set(rows):
            self._retire(live.pop(ns))
        for ns, row in rows.items():
            have = live.get(ns)
            try:
                if have is not None and (have.row.version, have.row.sha256) == (row.version, row.sha256):
                    if _stat(row.path) == have.stat:
                        continue
                    problem = registry.check_file(row)  # the file changed on disk: verify it again
                    if problem is None:
                        live[ns] = Loaded(row, have.predictor, _stat(row.path), have.fields)
                        continue
                else:
                    problem = registry.check_file(row)
                    if problem is None:
                        if have is not None:
                            self._retire(have)
                        live[ns] = self._load(row)
                        log.info("local answers for %s: %s", ns, row.label)
                        continue
            except FileNotFoundError:
                problem = f"{ns}: {row.label}'s artifact file is missing"
            except Exception as e:  # KolmError (bad artifact) or anything the loader raises: serve upstream
                problem = f"{ns}: {row.label} cannot be loaded: {type(e).__name__}: {e}"
            problems[ns] = problem + "; answering upstream"
            if ns in live:
                self._retire(live.pop(ns))
        self.live, self.problems = live, problems
        from kolm_ray.registry.drift import namespace_state

        # Live agreement per namespace: one indexed read each, here off the hot path (kolm_ray/registry/drift.py).
        self.drift = {ns: namespace_state(self.store, m.row) for ns, m in live.items()}
        now = time.monotonic()
        for t, p in [r for r in self._retired if now - r[0] > RETIRE_S]:
            self._retired.remove((t, p))
            p.close()

    def _load(self, row: Any) -> Loaded:
        import kolm_ray.observations.request_shape  # noqa: F401  (first import here, off the hot path)
        from kolm_ray.inference.predictors import open_predictor

        predictor = open_predictor(row.path)
        schema = predictor.spec.output_schema if predictor.spec.output_kind == "json" else {}
        props = schema.get("properties") if isinstance(schema, dict) else None
        fields = list(props) if isinstance(props, dict) else None
        predictor.predict(["warm-up"])  # first call allocates; never on a caller's time
        return Loaded(row, predictor, _stat(row.path), fields)

    def _retire(self, loaded: Loaded) -> None:
        self._retired.append((time.monotonic(), loaded.predictor))

    def status(self) -> dict[str, Any]:
        """For /healthz: live models per namespace and why any registered model is not being served
        (nothing while the registry has no model for this proxy: /healthz keeps its plain shape)."""
        if not self.live and not self.problems:
            return {}
        return {
            "local": {
                "models": {ns: m.row.label for ns, m in sorted(self.live.items())},
                "problems": dict(self.problems),
                "served": dict(self.served),
                "shadow_rate": self.rate,
                "drift": {
                    ns: {"state": st, "live_agreement": a, "pairs": n, "shadow_rate": self._rate(ns)}
                    for ns, (st, a, n) in sorted(self.drift.items())
                    if st != "ok"
                },
            }
        }

    # ---- the hot path ------------------------------------------------------------------------------------
    async def answer(self, request: Request, provider: str, ident: Any) -> Response | None:
        """A local answer for this request, or None (then it goes upstream; the reason is kept for a header).
        Reads (and re-offers) the body only when the namespace has a live model. `ident` (auth.Identity) is
        the caller as its capture key allows: only a key that may use the namespace reaches its model."""
        if not self.live:
            return None
        namespace = ident.namespace
        loaded = self.live.get(namespace)
        if loaded is None:
            return None
        reason = await self._try(request, provider, namespace, loaded)
        if isinstance(reason, Response):
            self.served["local"] += 1
            return reason
        request.state.kolm_upstream_reason = reason
        self.served["upstream"] += 1
        return None

    async def _try(self, request: Request, provider: str, namespace: str, loaded: Loaded) -> Response | str:
        from kolm_ray.capture.bridge import read_body
        from kolm_ray.observations.request_shape import matches, shape_of_request

        t0 = time.perf_counter()
        if request.headers.get("x-kolm-local", "").strip().lower() == "off":
            return "x-kolm-local off"
        state, agreement, _ = self.drift.get(namespace, ("ok", None, 0))
        if state == "stopped":  # until another version is promoted (drift.py): every call goes upstream
            return f"drift: live agreement {agreement:.3f} far below k_floor {loaded.row.k_floor}"
        body = await read_body(request, request.app.state.capture_max_body)
        request._body = body  # Starlette replays a cached body: the upstream path reads it again
        # The upstream path bounds, validates (400s) and parses big bodies off the loop: leave those to it.
        if len(body) > LOCAL_MAX_BODY:
            return "body too large for a local answer"
        from kolm_ray.capture.exchange import check_request

        if check_request(body) is not None:
            return "body refused by validation"
        try:
            payload = json.loads(body)
        except ValueError:
            return "body is not JSON"
        if not isinstance(payload, dict):
            return "body is not a JSON object"
        if any(payload.get(k) not in (None, 1, False, []) for k in UNSUPPORTED):
            return "parameters a local answer cannot honour"
        if not matches(loaded.row.shape, shape_of_request(payload)):
            return "another request shape"
        from kolm_ray.capture.exchange import FORMATS

        try:
            text = FORMATS[provider].input_text(payload)
        except Exception:
            return "no input text"
        loop = asyncio.get_running_loop()
        try:
            prediction, cpu_ms = await loop.run_in_executor(self._pool, _timed, loaded, text)
        except Exception as e:  # a model failure is never the caller's failure
            log.warning("local model %s failed: %s", loaded.row.label, e)
            return f"local model failed: {type(e).__name__}"
        confidence = float(prediction.get("confidence", 0.0))
        if confidence < loaded.row.threshold or prediction.get("fallback") == "broad":
            request.state.kolm_local_cpu_ms = cpu_ms  # the upstream call's observation carries it
            return f"confidence {confidence:.3f} below {loaded.row.threshold}"
        output = loaded.render(prediction)
        text_out = json.dumps(output, ensure_ascii=False)
        stream = bool(payload.get("stream"))
        from kolm_ray.providers import local_wire

        if provider == "openai":
            include = bool((payload.get("stream_options") or {}).get("include_usage"))
            content, media = local_wire.openai_answer(text_out, loaded.row.label, stream, include)
        else:
            content, media = local_wire.anthropic_answer(text_out, loaded.row.label, stream)
        latency_ms = (time.perf_counter() - t0) * 1000
        local_id = new_id()
        self._record(
            request, provider, namespace, payload, content, stream, latency_ms, local_id, cpu_ms=cpu_ms
        )
        rate = self._rate(namespace)
        if rate > 0 and random.random() < rate:
            task = asyncio.create_task(
                self._shadow(request, provider, namespace, payload, output, loaded, local_id)
            )
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
        headers = {
            "x-kolm-served-by": "local",
            "x-kolm-model": loaded.row.label,
            "x-kolm-overhead-ms": f"{latency_ms:.3f}",
            "cache-control": "no-cache",
        }
        return Response(content=content, media_type=media, headers=headers)

    def _record(self, request: Request, provider: str, namespace: str, payload: dict, content: bytes,
                stream: bool, latency_ms: float, obs_id: str, local: bool = True, status: int = 200,
                cpu_ms: float | None = None) -> None:  # fmt: skip
        from kolm_ray.capture.exchange import Exchange

        ident = request.state.kolm_identity
        request.app.state.writer.submit(
            # ASCII JSON of the parsed request: a lone surrogate stays an escape, as the client sent it.
            Exchange(provider, namespace, ident.tenant, json.dumps(payload).encode(),
                     status, latency_ms,
                     body=content, streamed=stream, local=local, observation_id=obs_id, local_cpu_ms=cpu_ms,
                     key_id=ident.key_id, **getattr(request.state, "kolm_privacy", {}))
        )  # fmt: skip

    def _rate(self, namespace: str) -> float:
        """The shadow rate: raised to drift.DRIFT_SHADOW_RATE while the namespace drifts."""
        from kolm_ray.registry.drift import DRIFT_SHADOW_RATE

        if self.drift.get(namespace, ("ok",))[0] == "drifting":
            return max(self.rate, DRIFT_SHADOW_RATE)
        return self.rate

    # ---- shadow ------------------------------------------------------------------------------------------
    async def _shadow(self, request: Request, provider: str, namespace: str, payload: dict, local_output: Any,
                      loaded: Loaded, local_id: str) -> None:  # fmt: skip
        """Ask the upstream the same question (non-streamed), store its answer and the pair's agreement."""
        from kolm_ray.capture.auth import apply_managed
        from kolm_ray.capture.exchange import FORMATS
        from kolm_ray.capture.upstream import UPSTREAM_ERRORS, forward_headers

        state = request.app.state
        ident = request.state.kolm_identity
        shadow = {k: v for k, v in payload.items() if k not in ("stream", "stream_options")}
        shadow_body = json.dumps(shadow).encode()
        # the caller's own key (or the managed one, or the upstream URL's credentials), in this task's memory only
        headers = apply_managed(
            forward_headers(request.headers.raw, state.upstream_auth[provider]), ident, provider
        )
        up_id, detail, agree = new_id(), {}, None
        t0 = time.perf_counter()
        try:
            async with state.http.post(state.upstream_urls[provider], data=shadow_body,
                                       headers=headers, allow_redirects=False) as up:  # fmt: skip
                content = await up.read()
                status, encoding = up.status, up.headers.get("content-encoding")
        except UPSTREAM_ERRORS as e:
            detail = {"error": f"shadow upstream call failed: {type(e).__name__}: {e}"}
            up_id = None
        else:
            from kolm_ray.capture.exchange import Exchange

            state.writer.submit(
                Exchange(provider, namespace, ident.tenant, shadow_body, status,
                         (time.perf_counter() - t0) * 1000, body=content, content_encoding=encoding,
                         observation_id=up_id, key_id=ident.key_id, **getattr(request.state, "kolm_privacy", {}))
            )  # fmt: skip
            agree, detail = _agreement(FORMATS[provider], content, encoding, status, local_output, loaded)
        self.served["shadowed"] += 1
        from kolm_ray import registry

        version = loaded.row.version
        await asyncio.to_thread(
            registry.record_shadow, self.store, local_id, up_id, namespace, version, agree, detail
        )

    async def aclose(self, timeout: float = 30.0) -> None:
        """Stop polling; let in-flight shadow calls finish (bounded) so their answers are stored."""
        self._stop.set()
        if self._tasks:
            await asyncio.wait(list(self._tasks), timeout=timeout)
        self._pool.shutdown(wait=False)


def _agreement(
    fmt: Any, content: bytes, encoding: str | None, status: int, local_output: Any, loaded: Loaded
):
    """(agree, detail) under the K-score's field rules; agree None when the upstream gave no usable answer."""
    from kolm_ray.artifact.kscore import field_correct
    from kolm_ray.artifact.spec import CONFIDENCE_FIELD, FALLBACK_FIELD
    from kolm_ray.capture.exchange import decode_body

    if not 200 <= status < 300:
        return None, {"error": f"upstream status {status}"}
    try:
        extracted = fmt.from_response(json.loads(decode_body(content, encoding)))
    except ValueError as e:
        return None, {"error": f"upstream answer unreadable: {e}"}
    if extracted.error:
        return None, {"error": extracted.error}
    gold = extracted.output
    if isinstance(gold, dict):  # a confidence is judged by calibration, never by equality (K-score rules)
        gold = {k: v for k, v in gold.items() if k not in (CONFIDENCE_FIELD, FALLBACK_FIELD)}
    answer = local_output if isinstance(local_output, dict) else {"output": local_output}
    fields = field_correct(answer, gold, loaded.predictor.spec.tolerance)
    return all(fields.values()), {"fields": fields, "local": local_output, "upstream": gold}
