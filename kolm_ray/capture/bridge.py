"""The bridge API: read, import and verify observations over HTTP (same server as the proxy).

    GET  /v1/bridges/observations?namespace=&tenant=&verified=true|false|null&limit=&cursor=
         -> {"observations": [...], "next_cursor": str|null}
    POST /v1/bridges/observations          JSON list or JSON lines of {namespace, input, output, ...}
         -> {"inserted": n}
    POST /v1/bridges/observations/{id}/verify   {"verified": bool, "output"?: corrected} -> the observation
    GET  /v1/bridges/namespaces            -> {"namespaces": [{"name", "count", "verified"}]}
    DELETE /v1/bridges/observations?namespace=&tenant=&before=&matching=   (admin token only)
         -> {"deleted": n}: the rows, their shadow pairs, their spool and dead-letter copies

Who may do what (CONTRACT.md "Training data you can trust"): `Authorization: Bearer $KOLM_ADMIN_TOKEN`
reads and writes everything; a capture key (`Authorization: Bearer kolm-sk-...`) reads only its tenant's
rows in its namespaces and imports only into them, each row stored with its tenant, its key_id and
`provider: "import"` (it may not import `verified: true` rows, verify rows or list every namespace's
counts). With no admin token set and no capture key in the store, the bridge is open on loopback as before;
once a key exists, a call with neither credential is a 401. No import claims `provider: openai|anthropic`:
every row the bridge inserts is stored as `provider: "import"`. Every bad input is a 4xx with
`{"error": "..."}` naming the problem, and an import is all-or-nothing (one transaction).

A browser must not be able to write here: the write routes take only JSON bodies (415 otherwise; a page
can send text/plain or a form across origins without asking, but not application/json), and on a
loopback bind every route checks the Host header (403 unless localhost, 127.0.0.1 or [::1] with this
port), so a DNS-rebound page on another name cannot reach the bridge either. `kolm capture` refuses a
non-loopback bind without KOLM_ADMIN_TOKEN (settings.check_bind).
"""

from __future__ import annotations

import hmac
import json
from dataclasses import dataclass
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Depends, FastAPI, HTTPException, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, StrictBool, ValidationError
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from kolm_ray.observations.erase import Erasure
from kolm_ray.observations.keys import KEY_PREFIX, CaptureKey
from kolm_ray.observations.model import MalformedInput, loads_strict, parse_import
from kolm_ray.observations.store import MAX_PAGE, Store
from kolm_ray.settings import is_loopback

BRIDGE_MAX_BODY = 16 * 1024 * 1024  # an import of ~10k observations; bigger sets go through the CLI
JSON_TYPES = frozenset({"application/json", "application/x-ndjson", "application/jsonl"})
LOOPBACK_NAMES = ("localhost", "127.0.0.1", "[::1]")


async def read_body(request: Request, limit: int) -> bytes:
    """The request body, refusing (413) past `limit` bytes without reading the rest."""
    declared = request.headers.get("content-length")
    if declared is not None:
        if not declared.isdigit():
            raise HTTPException(400, "Content-Length is not a number")
        if int(declared) > limit:
            raise HTTPException(413, f"body of {declared} bytes is over the limit of {limit} bytes")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise HTTPException(413, f"body is over the limit of {limit} bytes")
        chunks.append(chunk)
    return b"".join(chunks)


def check_host(request: Request) -> None:
    """On a loopback bind, refuse (403) a Host header that is not this server by a loopback name.

    DNS rebinding points an attacker's name at 127.0.0.1 so that a page from it reaches a local server as
    "same origin"; its requests still carry the attacker's name in Host. `server` is the address the
    connection was accepted on, so a proxy bound to 0.0.0.0 and reached through 127.0.0.1 is checked too.
    """
    server = request.scope.get("server")
    if not server or not is_loopback(str(server[0])):
        return
    bound, port = str(server[0]), server[1]
    host = request.headers.get("host", "").strip().lower()
    names = {*LOOPBACK_NAMES, f"[{bound}]" if ":" in bound else bound}
    allowed = {f"{n}:{port}" for n in names} | (names if port == 80 else set())
    if host not in allowed:
        shown = "".join(ch for ch in host[:100] if ch.isprintable()) or "(none)"
        raise HTTPException(
            403,
            f"Host header {shown!r} is not this server: on a loopback bind the bridge answers only "
            f"localhost, 127.0.0.1 or [::1] with port {port} (a guard against DNS rebinding)",
        )


def require_json_body(request: Request) -> None:
    """Write routes take JSON or JSON lines only (415 otherwise), so a cross-origin form cannot write."""
    content_type = request.headers.get("content-type", "")
    media = content_type.partition(";")[0].strip().lower()
    if media not in JSON_TYPES:
        shown = "".join(ch for ch in content_type[:100] if ch.isprintable()) or "none"
        raise HTTPException(
            415,
            f"Content-Type {shown!r} is not accepted: send application/json "
            "(or JSON lines as application/x-ndjson or application/jsonl)",
        )


@dataclass(frozen=True)
class Caller:
    """Who is calling the bridge: the admin (token, or an open loopback bridge), or one capture key."""

    key: CaptureKey | None = None

    @property
    def admin(self) -> bool:
        return self.key is None


def _caller(request: Request) -> Caller:
    state = request.app.state
    keys = getattr(state, "keys", None)
    scheme, _, value = request.headers.get("authorization", "").partition(" ")
    value = value.strip()
    bearer = scheme.lower() == "bearer"
    if bearer and value.startswith(KEY_PREFIX) and keys is not None:
        key = keys.lookup(value)
        if key is None:
            raise HTTPException(401, "capture key is unknown or revoked", {"WWW-Authenticate": "Bearer"})
        return Caller(key)
    token = state.admin_token
    if token is None:
        if keys is not None and keys.any_active:
            raise HTTPException(
                401,
                "capture keys exist: send Authorization: Bearer <capture key>, or set KOLM_ADMIN_TOKEN and "
                "send it",
                {"WWW-Authenticate": "Bearer"},
            )
        return Caller()
    if not bearer or not hmac.compare_digest(value.encode(), token.encode()):
        raise HTTPException(
            401,
            "missing or wrong bearer token (Authorization: Bearer $KOLM_ADMIN_TOKEN or a capture key)",
            {"WWW-Authenticate": "Bearer"},
        )
    return Caller()


def _admin_only(caller: Caller, what: str) -> None:
    if not caller.admin:
        raise HTTPException(403, f"key {caller.key.id} may not {what}: that needs the admin token")


def _store(request: Request) -> Store:
    writer = getattr(request.app.state, "writer", None)
    if writer is not None:
        writer.flush(timeout=5.0)  # read your writes: what the proxy answered is visible here
    return request.app.state.store


# Dependencies run in this order: Host first (a rebound page learns nothing), then the token.
router = APIRouter(prefix="/v1/bridges", dependencies=[Depends(check_host)])
StoreDep = Annotated[Store, Depends(_store)]
CallerDep = Annotated[Caller, Depends(_caller)]


class VerifyBody(BaseModel):
    """Body of POST .../verify: the verdict, and optionally the corrected output."""

    model_config = ConfigDict(extra="forbid")
    verified: StrictBool
    output: Any = None


def _load_json(body: bytes) -> Any:
    try:
        return loads_strict(body)
    except RecursionError:
        raise HTTPException(400, "malformed JSON: nested too deeply") from None
    except ValueError as e:
        raise HTTPException(400, f"malformed JSON: {e}") from None


@router.get("/observations")
def list_observations(
    caller: CallerDep,
    store: StoreDep,
    namespace: str | None = None,
    tenant: str | None = None,
    verified: Literal["true", "false", "null"] | None = None,
    limit: Annotated[int, Query(ge=1, le=MAX_PAGE)] = 100,
    cursor: str | None = None,
) -> dict:
    """A page of observations in insertion order; pass next_cursor back for the next page."""
    flag = {"true": True, "false": False, "null": "null", None: None}[verified]
    if caller.key is not None:  # a capture key reads its tenant's rows in its namespaces, nothing else
        key = caller.key
        if tenant is not None and tenant != key.tenant:
            raise HTTPException(403, f"key {key.id} may not read another tenant's observations")
        tenant = key.tenant
        if namespace is None:
            if len(key.namespaces) > 1:
                raise HTTPException(400, f"key {key.id} has several namespaces: pass namespace=")
            namespace = key.namespaces[0]
        if namespace not in key.namespaces:
            raise HTTPException(403, f"key {key.id} may not use namespace {namespace}")
    try:
        page, next_cursor = store.list(
            namespace=namespace, tenant=tenant, verified=flag, limit=limit, cursor=cursor
        )
    except ValueError as e:
        raise HTTPException(400, str(e)) from None
    return {"observations": [o.model_dump(mode="json") for o in page], "next_cursor": next_cursor}


@router.post("/observations", dependencies=[Depends(require_json_body)])
async def import_observations(request: Request, caller: CallerDep, store: StoreDep) -> dict:
    """Insert a JSON list or JSON lines of observations, all or nothing, each as provider "import"."""
    body = await read_body(request, getattr(request.app.state, "bridge_max_body", BRIDGE_MAX_BODY))
    try:
        observations = parse_import(body)
    except UnicodeDecodeError:
        raise HTTPException(400, "body is not UTF-8 text") from None
    except MalformedInput as e:
        raise HTTPException(400, str(e)) from None
    except ValueError as e:
        raise HTTPException(422, str(e)) from None
    observations = [_as_import(o, caller) for o in observations]
    try:
        inserted = await run_in_threadpool(store.append_many, observations)
    except KeyError as e:
        raise HTTPException(409, str(e.args[0])) from None
    return {"inserted": inserted}


def _as_import(obs: Any, caller: Caller) -> Any:
    """The row as the bridge stores it: provider "import"; for a capture key, its tenant, namespaces, key_id."""
    update: dict[str, Any] = {"provider": "import"}
    key = caller.key
    if key is not None:
        if obs.namespace not in key.namespaces:
            raise HTTPException(403, f"key {key.id} may not use namespace {obs.namespace}")
        if obs.tenant is not None and obs.tenant != key.tenant:
            raise HTTPException(403, f"key {key.id} may not import rows of another tenant")
        if obs.verified is True:
            raise HTTPException(403, f"key {key.id} may not import verified rows: that needs the admin token")
        update.update(tenant=key.tenant, key_id=key.id)
    return obs.model_copy(update=update)


@router.post("/observations/{obs_id}/verify", dependencies=[Depends(require_json_body)])
async def verify_observation(obs_id: str, request: Request, caller: CallerDep, store: StoreDep) -> dict:
    """Mark an observation verified true/false, optionally replacing its output (admin only)."""
    _admin_only(caller, "verify observations")
    body = await read_body(request, getattr(request.app.state, "bridge_max_body", BRIDGE_MAX_BODY))
    try:
        verdict = VerifyBody.model_validate(_load_json(body))
    except ValidationError as e:
        raise HTTPException(422, _describe(e.errors())) from None
    obs = await run_in_threadpool(store.verify, obs_id, verdict.verified, verdict.output)
    if obs is None:
        raise HTTPException(404, f"observation {obs_id!r} not found")
    return obs.model_dump(mode="json")


ERASE_PARAMS = ("namespace", "tenant", "before", "matching")


@router.delete("/observations")
async def delete_observations(request: Request, caller: CallerDep) -> dict:
    """Delete what the query matches (observations/erase.py), with the admin token only: {"deleted": n}.

    Filters come only from the query string: an unknown or repeated parameter, or any body, is a 400
    (a typo such as `tenat=` must not widen a delete to the whole namespace)."""
    _admin_only(caller, "delete observations")  # a wrong or missing token: 401 (_caller); a capture key: 403
    if request.app.state.admin_token is None:
        raise HTTPException(
            403, "deleting observations needs the admin token: start kolm capture with KOLM_ADMIN_TOKEN set"
        )
    query = request.query_params
    unknown = sorted(set(query.keys()) - set(ERASE_PARAMS))
    if unknown:
        shown = ", ".join(repr(k[:40]) for k in unknown[:5])
        raise HTTPException(400, f"unknown parameter(s) {shown}; known: {', '.join(ERASE_PARAMS)}")
    repeated = [k for k in ERASE_PARAMS if len(query.getlist(k)) > 1]
    if repeated:
        raise HTTPException(400, f"parameter {repeated[0]!r} given more than once")
    if await read_body(request, 1024):
        raise HTTPException(400, "DELETE takes its filters in the query string: send no body")
    try:
        erasure = Erasure.parse(*(query.get(k) for k in ERASE_PARAMS))
    except ValueError as e:
        raise HTTPException(400, str(e)) from None
    writer = request.app.state.writer
    try:
        return await run_in_threadpool(writer.erase, erasure, request.app.state.home)
    except TimeoutError as e:
        raise HTTPException(503, str(e), {"Retry-After": "1"}) from None


@router.get("/namespaces")
def list_namespaces(caller: CallerDep, store: StoreDep) -> dict:
    """Every namespace with its observation count and how many are verified true (admin only)."""
    _admin_only(caller, "list every namespace")
    return {"namespaces": store.namespaces()}


def _describe(errors: list[dict[str, Any]]) -> str:
    parts = []
    for e in errors:
        loc = ".".join(str(p) for p in e.get("loc", ()) if p != "body") or "body"
        parts.append(f"{loc}: {e.get('msg')}")
    return "; ".join(parts)


def install_error_handlers(app: FastAPI) -> None:
    """Every error the app answers is `{"error": "..."}`: validation (422), HTTP errors, and a last-resort
    500 that says so without a traceback (none is expected: bad input is caught before it)."""

    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        detail = exc.detail if isinstance(exc.detail, str) else json.dumps(exc.detail)
        if exc.status_code == 404 and detail == "Not Found":
            detail = f"no route {request.method} {request.url.path}"
        return JSONResponse(
            {"error": detail}, status_code=exc.status_code, headers=getattr(exc, "headers", None)
        )

    async def validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        return JSONResponse({"error": _describe(list(exc.errors()))}, status_code=422)

    async def unexpected(request: Request, exc: Exception) -> JSONResponse:
        return JSONResponse({"error": f"internal error: {type(exc).__name__}"}, status_code=500)

    app.add_exception_handler(StarletteHTTPException, http_error)
    app.add_exception_handler(RequestValidationError, validation_error)
    app.add_exception_handler(Exception, unexpected)
