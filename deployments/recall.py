"""The recall namespace router on Ray Serve: which namespace should this tenant's query search?

    serve run deployments/recall.yaml          # or: kolm serve deployments/recall.yaml
    curl -s localhost:8000/v1/recall/route -H 'Authorization: Bearer demo-acme-key' \\
         -d '{"query": "what is the interest rate on my savings account"}'
    # {"mode": "narrow", "namespace": "banking", "confidence": 0.97, "fallback": "narrow"}

Two deployments:
- RecallIngress: HTTP edge. Bearer key -> tenant (configs/tenants.yaml), request validation (401/422),
  the cascade's first stage (the artifact's static-embedding student, kolm_ray.inference.student, ~0.1 ms: it
  answers the queries it is sure of without a hop), the rest to the tagger in batches (one call per
  batch of what queued), the latency budget around that, narrow/broad decision (kolm_ray.serve.router.Router). Tagger slow or down -> 200 broad with "reason";
  never a 5xx for those causes; no tagger replica ready -> healthz 503 and broad at once.
- NamespaceTagger: loads and verifies the signed .kolm, builds its fastest agreeing form
  (kolm_ray.inference.fastpath) and scores batches of queries, each against its own caller's namespaces only.
"""

from __future__ import annotations

import asyncio
import logging
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from pydantic import BaseModel, Field
from ray import serve
from ray.serve import Application
from ray.serve.handle import DeploymentHandle
from starlette.requests import Request
from starlette.responses import JSONResponse

from kolm_ray.artifact import verify
from kolm_ray.serve.router import (
    DEFAULT_BUDGET_MS,
    DEFAULT_THRESHOLD,
    MAX_BODY_BYTES,
    Router,
    TaggerHealth,
    load_tenants,
)

log = logging.getLogger("ray.serve")

ROUTE = "/v1/recall/route"
HEALTH = "/v1/recall/healthz"
REPO = Path(__file__).resolve().parent.parent
# How often the ingress asks Serve's controller whether a tagger replica is RUNNING. A replica that dies is
# also seen at once by the route (the call fails: broad, "tagger unavailable (...)"); this bounds how long
# healthz and the route's fast path lag the controller.
READINESS_POLL_S = 0.25
# A CPU batch is scored in groups whose padded tokens are at most this much more than their real tokens.
PAD_SLACK = 1.25


class Args(BaseModel):
    """The application's arguments: the four keys under `args:` in deployments/recall.yaml."""

    artifact: str = "demo-out/namespace-tagger.kolm"
    """Signed namespace-tagger .kolm (written by `make demo` or `kolm compile`); relative to the working dir.
    `registry:NS` serves NS's live model from the registry (`kolm models promote`) and follows promotions."""
    tenants: str = "configs/tenants.yaml"
    """Tenants file: bearer-key sha256 -> authorized namespaces."""
    threshold: float = Field(DEFAULT_THRESHOLD, ge=0.0, le=1.0)
    """Confidence below this routes broad (search every authorized namespace)."""
    budget_ms: float = Field(DEFAULT_BUDGET_MS, gt=0.0)
    """Routing budget per request in milliseconds; a tagger slower than this yields broad with a reason."""


def _resolve(path: str) -> str:
    """An absolute path: as given when it exists from the working directory, else relative to the repo."""
    p = Path(path).expanduser()
    if p.is_absolute() or p.exists():
        return str(p.resolve())
    return str((REPO / p).resolve())


@serve.deployment(
    # One replica per CPU it asks for; ONNX Runtime runs 1 intra-op thread per replica (KOLM_SERVE_THREADS),
    # so two replicas on a 2-core machine do not fight over cores.
    ray_actor_options={"num_cpus": 1},
    # A CPU replica scores one query in ~6-9 ms (ONNX Runtime fp32, one thread, on a 2-core AVX2 machine), so
    # 12 in flight is ~75-105 ms of work: about the budget. Further requests wait in the caller's queue for a
    # free replica (where the budget cuts them off and the route answers broad) instead of behind a backlog
    # they cannot outlive.
    max_ongoing_requests=12,
    autoscaling_config={
        "min_replicas": 1,  # always one warm replica: a cold start (verify + ONNX export) takes seconds
        "max_replicas": 2,  # 2 cores here; raise with the cluster's CPUs (each replica takes num_cpus=1)
        # The ingress sends its escalations in batches, at most four calls in flight (RecallIngress._escalate):
        # more than two on average at one replica is one batch running and more than one waiting behind it,
        # a replica that has stopped keeping up. (With KOLM_SERVE_BATCH=0, one call per escalated query,
        # that is ~3-4 queries: ~25-35 ms of queueing, a third of the budget.)
        "target_ongoing_requests": 2,
        "upscale_delay_s": 3,  # react within a few seconds to a load step
        "downscale_delay_s": 60,  # keep the second replica through short lulls (restart costs seconds)
        "metrics_interval_s": 1,
        "look_back_period_s": 5,
    },
    # A replica that stops answering health checks is replaced; the ingress routes broad meanwhile.
    health_check_period_s=2,
    health_check_timeout_s=10,
    graceful_shutdown_timeout_s=5,
)
class NamespaceTagger:
    """Verifies the artifact, builds its fastest form, and scores batches of (query, caller's namespaces)."""

    def __init__(self, artifact: str, follow: str | None = None):
        from kolm_ray.placement import pick_device

        self.device = pick_device()  # cuda, then mps, then cpu
        self.batched = self.device != "cpu"
        self.artifact = artifact
        self._load(artifact)
        self.pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="tagger")
        # `artifact: registry:NS`: load NS's next live model on the follower's thread, then swap it in.
        self.follower = None
        if follow is not None:
            from kolm_ray.registry.follow import RegistryFollower

            self.follower = RegistryFollower(follow, artifact, self._load)
        log.info(
            "NamespaceTagger ready: device=%s backend=%s batched=%s", self.device, self.backend, self.batched
        )

    def _load(self, artifact: str) -> None:
        """Verify and load `artifact`, build its fastest form, then swap it in (one assignment each)."""
        from kolm_ray.inference.fastpath import EncoderParts, build_fast_tagger
        from kolm_ray.inference.predictors import open_predictor

        # open_predictor verifies the HMAC signature and every file hash before reading a weight.
        predictor = open_predictor(artifact, device=self.device)
        report: list[dict[str, Any]] = []
        fast = None
        if predictor.kind == "encoder-tagger" and "namespace" in predictor.labels:
            parts = EncoderParts.from_predictor(predictor)
            if self.device == "cpu":
                fast, report = build_fast_tagger(parts)
            else:  # on a GPU the torch module is already fast; ONNX Runtime here is the CPU build
                fast, report = build_fast_tagger(parts, candidates=("torch-inference",))
            backend = fast.backend
        else:
            backend = f"predictor:{predictor.kind}"
        # Everything is in memory now: remove the extracted artifact, so a replica that is killed (not
        # shut down) leaves no copy of the weights in /tmp.
        predictor.close()
        self.predictor, self.fast, self.report, self.backend = predictor, fast, report, backend
        self.artifact = artifact

    def _score(self, queries: list[str], namespaces: list[list[str]]) -> list[dict[str, Any]]:
        if self.fast is not None:
            if self.batched or len(queries) == 1:
                return self.fast.score(queries, namespaces)
            # On CPU a batch costs what its padded tokens cost: score it in groups of similar length.
            out: list[dict[str, Any]] = [{} for _ in queries]
            for group in self._length_groups(queries):
                answers = self.fast.score([queries[i] for i in group], [namespaces[i] for i in group])
                for i, ans in zip(group, answers, strict=True):
                    out[i] = ans
            return out
        # Other artifact kinds: the Predictor itself, one call per distinct namespace list.
        out: list[dict[str, Any]] = [{} for _ in queries]
        groups: dict[tuple[str, ...], list[int]] = {}
        for i, ns in enumerate(namespaces):
            groups.setdefault(tuple(ns), []).append(i)
        for ns, idx in groups.items():
            for i, ans in zip(
                idx, self.predictor.predict([queries[i] for i in idx], allowed=list(ns)), strict=True
            ):
                out[i] = {"namespace": ans.get("namespace"), "confidence": ans.get("confidence", 0.0)}
        return out

    def _length_groups(self, queries: list[str]) -> list[list[int]]:
        """Indices of `queries`, shortest first, in groups whose padding adds at most PAD_SLACK to their tokens.

        MiniLM's forward on CPU costs about what its tokens cost, padding included (a batch pads to its
        longest query), plus a per-call overhead that a batch shares: so similar lengths go together.
        """
        backend = getattr(self.fast.parts.tokenizer, "backend_tokenizer", None)  # the Rust tokenizer: ~50 us
        if backend is not None:
            lengths = [len(e.ids) for e in backend.encode_batch(queries)]
        else:
            lengths = [len(q.split()) + 2 for q in queries]
        groups: list[list[int]] = []
        total = 0
        for i in sorted(range(len(queries)), key=lengths.__getitem__):
            if groups and (len(groups[-1]) + 1) * lengths[i] <= PAD_SLACK * (total + lengths[i]):
                groups[-1].append(i)
                total += lengths[i]
            else:
                groups.append([i])
                total = lengths[i]
        return groups

    async def score_many(self, queries: list[str], namespaces: list[list[str]]) -> list[dict[str, Any]]:
        """Several callers' queries (a batch of the ingress's escalations), each against its own namespaces."""
        return await self._run(self._score, queries, namespaces)

    async def score(self, query: str, namespaces: list[str]) -> dict[str, Any]:
        """One caller's query against its own namespaces."""
        if self.batched:
            return await self._score_batch(query, namespaces)
        return (await self._run(self._score, [query], [namespaces]))[0]

    # Single-query calls (`score`: the ingress with KOLM_SERVE_BATCH=0, other callers) are batched here on
    # GPUs only, where a batch of 16 costs about what one query does. On CPU a 2 ms batching wait only adds
    # latency to a lone query; the ingress's own batches (score_many) wait for nothing.
    @serve.batch(max_batch_size=16, batch_wait_timeout_s=0.002)
    async def _score_batch(self, queries: list[str], namespaces: list[list[str]]) -> list[dict[str, Any]]:
        return await self._run(self._score, queries, namespaces)

    async def _run(self, fn, *args):
        # One inference thread (ONNX Runtime and torch release the GIL): the event loop keeps taking requests
        # and health checks; queued calls whose caller gave up (budget) are cancelled before they run.
        return await asyncio.get_running_loop().run_in_executor(self.pool, fn, *args)

    def info(self) -> dict[str, Any]:
        return {
            "artifact": self.artifact,
            "device": self.device,
            "backend": self.backend,
            "batched": self.batched,
            "report": self.report,
        }


@serve.deployment(
    # Mostly asyncio I/O (it waits on the tagger) plus the student's ~0.2-0.8 ms per query (numpy). No CPU
    # reservation, so both cores stay schedulable for tagger replicas.
    ray_actor_options={"num_cpus": 0},
    # Requests in flight per ingress replica. Each is bounded by the budget (100 ms), so 256 covers
    # 2500 rps of waiting before the proxy queues; Serve's default of 5 queued requests in the proxy.
    max_ongoing_requests=256,
    num_replicas=1,
)
class RecallIngress:
    """POST /v1/recall/route: tenant from the bearer key, validation, budget, narrow or broad."""

    def __init__(
        self,
        tagger: DeploymentHandle,
        tenants: str,
        threshold: float,
        budget_ms: float,
        artifact: str,
        use_student: bool = True,  # False: every query goes to the tagger (benchmarks/recall.py's baseline)
    ):
        from kolm_ray.artifact import open_artifact
        from kolm_ray.inference.student import META_FILE, STUDENT_DIR, Student

        self.tagger = tagger
        # KOLM_SERVE_BATCH=0: one tagger call per escalated query (benchmarks/recall.py's comparison).
        self.batch_escalations = os.environ.get("KOLM_SERVE_BATCH", "1") != "0"
        # The same student Predictor.predict runs first (`kolm run`, compile's scoring): verified with the
        # artifact, then held in memory; None when the artifact was compiled without one.
        self.student: Student | None = None
        if use_student:
            with open_artifact(artifact) as opened:
                if (opened.dir / STUDENT_DIR / META_FILE).is_file():
                    self.student = Student.load(opened.dir / STUDENT_DIR)
        self.health = TaggerHealth()
        self.router = Router(
            load_tenants(tenants), threshold=threshold, budget_ms=budget_ms, health=self.health
        )
        # Serve runs the constructor on the replica's event loop: the watcher lives as long as the replica.
        self._watcher = asyncio.get_running_loop().create_task(self._watch_tagger())

    async def _watch_tagger(self) -> None:
        """Keep self.health current from the controller's view of the tagger's replicas."""
        from ray.serve._private.common import ReplicaState
        from ray.serve.context import _get_global_client

        controller = _get_global_client()._controller
        app, name = self.tagger.app_name, self.tagger.deployment_name
        failing = False
        while True:
            try:
                details = await controller.get_deployment_details.remote(app, name)
                running = sum(1 for r in details.replicas if r.state == ReplicaState.RUNNING)
                before, failing = self.health.status, False
                if self.health.update(running) != before:
                    log.info("tagger %s -> %s (%d replicas running)", before, self.health.status, running)
            except Exception as e:  # controller restarting: keep the last known state, ask again
                if not failing:  # once per outage, not every poll
                    log.warning("tagger readiness unknown: %s: %s", type(e).__name__, e)
                failing = True
            await asyncio.sleep(READINESS_POLL_S)

    async def _tag(self, query: str, namespaces: list[str]) -> dict[str, Any]:
        if self.student is not None:
            sure = self.student.sure(query, namespaces)  # masked to the caller's namespaces, like the tagger
            if sure is not None:
                return sure
        if self.batch_escalations:
            return await self._escalate(query, namespaces)
        response = self.tagger.score.remote(query, namespaces)
        try:
            return await response
        except asyncio.CancelledError:
            # Over budget: the router stops waiting. Cancel the call too, so the tagger drops it from its
            # batch queue instead of scoring a query nobody will read (Serve does not do this by itself).
            response.cancel()
            raise

    # The escalations go to the tagger in batches, one handle call each: what the hop costs per call (the
    # handle's routing and metrics here, the replica's request path there: measured ~1.5 + ~2.5 ms of CPU
    # on this 2-core machine, py-spy in benchmarks/recall.py) is then shared by the batch, and so is ONNX
    # Runtime's per-call overhead. No wait: a batch is whatever queued while the previous calls were out,
    # so a lone query goes at once. Four calls in flight: two per tagger replica (max_replicas), so each
    # has its next batch waiting when the last returns. A caller over its budget leaves the queue (its
    # future is cancelled, and @serve.batch drops cancelled requests before a batch goes out).
    @serve.batch(max_batch_size=8, batch_wait_timeout_s=0.0, max_concurrent_batches=4)
    async def _escalate(self, queries: list[str], namespaces: list[list[str]]) -> list[dict[str, Any]]:
        return await self.tagger.score_many.remote(queries, namespaces)

    async def __call__(self, request: Request) -> JSONResponse:
        path = request.url.path.rstrip("/")
        if path == HEALTH and request.method == "GET":
            status, payload = self.health.healthz()
            return JSONResponse(payload, status_code=status)
        if path != ROUTE:
            return JSONResponse({"error": f"no route {request.url.path}; POST {ROUTE}"}, status_code=404)
        if request.method != "POST":
            return JSONResponse({"error": f"{request.method} not allowed; POST {ROUTE}"}, status_code=405)
        declared = request.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > MAX_BODY_BYTES:
            return JSONResponse({"error": f"body is larger than {MAX_BODY_BYTES} bytes"}, status_code=422)
        body = await request.body()
        status, payload = await self.router.route(request.headers.get("authorization"), body, self._tag)
        return JSONResponse(payload, status_code=status)


def app_builder(args: Args) -> Application:
    """Build the application from the YAML's `args` (Ray Serve app builder)."""
    if isinstance(args, dict):  # serve.run(app_builder({...})) from Python
        args = Args.model_validate(args)
    from kolm_ray.registry.follow import live_artifact, registry_namespace

    follow = registry_namespace(args.artifact)  # `registry:NS`: NS's live model, followed as it changes
    artifact = live_artifact(follow) if follow is not None else _resolve(args.artifact)
    tenants = _resolve(args.tenants)
    load_tenants(tenants)  # fail at deploy time, with every problem listed, not on the first request
    if not Path(artifact).is_file():
        raise FileNotFoundError(
            f"artifact {artifact} does not exist; run `make demo` or `kolm compile` first"
        )
    # Refuse a tampered or wrongly keyed artifact at deploy time, not by answering broad on every request
    # while the replica fails to start (each replica verifies it again before reading a weight).
    verify(artifact)
    tagger = NamespaceTagger.bind(artifact, follow)
    # The ingress's student belongs to one artifact; a tagger that follows the registry moves on without
    # it, so a followed namespace routes every query through the (followed) tagger.
    return RecallIngress.bind(tagger, tenants, args.threshold, args.budget_ms, artifact, follow is None)
