"""Who a capture call is: the tenant and namespace come from the capture key, never from a header alone.

    ident = identify(request, provider)      # Identity, or the JSONResponse (400/401/403/415) to answer
    headers = upstream_headers(request, ident, provider)   # what goes upstream (a managed key swapped in)

Rules (CONTRACT.md "Capture keys"), all checked before anything is forwarded, answered locally or stored:
- Only `application/json` bodies (415): a browser page cannot send a "simple" cross-origin call here.
- Headers within bounds (400): at most MAX_HEADERS of them, each value at most MAX_HEADER_VALUE bytes,
  X-Kolm-Tenant at most 256 characters, X-Kolm-Namespace a valid namespace, X-Kolm-Key at most 128.
- A key is `X-Kolm-Key`, or (with KOLM_OPENAI_API_KEY / KOLM_ANTHROPIC_API_KEY set) the SDK's own api_key
  `Authorization: Bearer kolm-sk-...` / `x-api-key: kolm-sk-...`, then replaced by the managed provider
  key on the way upstream. A kolm key sent as the provider key without a managed key set is a 401: it is
  never forwarded to a provider.
- A presented key must be active (401 unknown or revoked), whether or not other keys exist.
- No key presented: 401 once the store holds an active key; with none, the proxy is open, and only on a
  loopback bind (tenant and namespace from the headers, rows never trained on).
- With a key: tenant = the key's (a differing X-Kolm-Tenant is a 403); namespace = X-Kolm-Namespace when
  the key may use it, the key's only namespace when the header is absent, else 403.
"""

from __future__ import annotations

import hmac
import os
from dataclasses import dataclass

from fastapi.responses import JSONResponse
from starlette.requests import Request

from kolm_ray.errors import KolmError
from kolm_ray.observations.keys import KEY_PREFIX, MAX_KEY_LENGTH, MAX_TENANT, CaptureKey, KeyTable
from kolm_ray.observations.model import check_namespace
from kolm_ray.settings import is_loopback

MAX_HEADERS = 100  # a real SDK call sends ~15-25
MAX_HEADER_VALUE = 8192  # bytes; a provider key is ~200, a W3C traceparent 55
MANAGED_ENV = {"openai": "KOLM_OPENAI_API_KEY", "anthropic": "KOLM_ANTHROPIC_API_KEY"}
_KEY_PREFIX_B = KEY_PREFIX.encode()


@dataclass(frozen=True, slots=True)
class Identity:
    """Whose call this is, as the proxy stores it."""

    tenant: str | None
    namespace: str
    key_id: str | None = None
    redact_pii: bool = False
    """The key was created with `--redact pii`: its Exchange carries redact_pii=True to the writer."""
    managed: str | None = None
    """The managed provider key to forward instead of the caller's (its kolm key came as the api_key)."""


def managed_keys() -> dict[str, str]:
    """KOLM_OPENAI_API_KEY / KOLM_ANTHROPIC_API_KEY, by provider (unset or empty: not managed)."""
    out = {}
    for provider, name in MANAGED_ENV.items():
        value = os.environ.get(name, "").strip()
        if value.startswith(KEY_PREFIX):
            raise KolmError(f"{name} holds a kolm capture key; set it to the provider's own API key")
        if value:
            out[provider] = value
    return out


def _error(status: int, message: str, **headers: str) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status, headers=headers or None)


def _unauthorized(message: str) -> JSONResponse:
    return _error(401, message, **{"WWW-Authenticate": 'Bearer realm="kolm capture"'})


def _bounds(raw: list[tuple[bytes, bytes]]) -> str | None:
    if len(raw) > MAX_HEADERS:
        return f"{len(raw)} request headers is over the limit of {MAX_HEADERS}"
    for k, v in raw:
        if len(v) > MAX_HEADER_VALUE:
            name = k.decode("latin-1")[:64]
            return f"header {name} is {len(v)} bytes, over the limit of {MAX_HEADER_VALUE}"
    return None


def _as_api_key(raw: list[tuple[bytes, bytes]]) -> str | None:
    """A kolm key sent where the SDK puts its provider key (Authorization: Bearer / x-api-key), or None."""
    for k, v in raw:
        name = k.lower()
        if name == b"authorization":
            scheme, _, value = v.partition(b" ")
            if scheme.lower() == b"bearer" and value.strip().startswith(_KEY_PREFIX_B):
                return value.strip().decode("latin-1")
        elif name == b"x-api-key" and v.strip().startswith(_KEY_PREFIX_B):
            return v.strip().decode("latin-1")
    return None


def json_only(request: Request) -> JSONResponse | None:
    """415 unless the body is declared application/json (checked before anything else is done with it)."""
    content_type = request.headers.get("content-type", "")
    if content_type.partition(";")[0].strip().lower() != "application/json":
        shown = "".join(ch for ch in content_type[:100] if ch.isprintable()) or "none"
        return _error(415, f"Content-Type {shown!r} is not accepted: capture routes take application/json")
    return None


def identify(request: Request, provider: str) -> Identity | JSONResponse:
    """The caller's Identity, or the 4xx response to answer instead (nothing forwarded, nothing stored)."""
    refused = json_only(request)
    if refused is not None:
        return refused
    raw = request.scope["headers"]
    problem = _bounds(raw)
    if problem is not None:
        return _error(400, problem)
    headers = request.headers
    tenant_header = headers.get("x-kolm-tenant") or None
    if tenant_header is not None and len(tenant_header) > MAX_TENANT:
        return _error(
            400, f"X-Kolm-Tenant is {len(tenant_header)} characters, over the limit of {MAX_TENANT}"
        )
    ns_header = headers.get("x-kolm-namespace") or None
    if ns_header is not None:
        try:
            check_namespace(ns_header)
        except ValueError as e:
            return _error(400, f"X-Kolm-Namespace: {e}")
    state = request.app.state
    keys: KeyTable = state.keys
    presented = headers.get("x-kolm-key") or None
    as_api_key = _as_api_key(raw)
    managed: str | None = None
    if as_api_key is not None:
        managed = state.managed_keys.get(provider)
        if managed is None:
            return _unauthorized(
                f"a kolm key was sent as the {provider} API key, but this proxy has no managed {provider} key "
                f"({MANAGED_ENV[provider]}): send it as X-Kolm-Key beside your own provider key"
            )
        if presented is not None and not hmac.compare_digest(presented.encode(), as_api_key.encode()):
            return _error(400, "X-Kolm-Key and the API key are two different kolm keys: send one")
        presented = as_api_key
    if presented is None:
        if keys.any_active:
            return _unauthorized("this proxy needs a capture key: send X-Kolm-Key (see `kolm keys create`)")
        server = request.scope.get("server")
        if not server or not is_loopback(str(server[0])):
            return _unauthorized("no capture keys exist, and an open proxy answers only on a loopback bind")
        return Identity(tenant=tenant_header, namespace=ns_header or "default")
    if len(presented) > MAX_KEY_LENGTH:
        return _error(400, f"X-Kolm-Key is {len(presented)} characters, over the limit of {MAX_KEY_LENGTH}")
    key: CaptureKey | None = keys.lookup(presented)
    if key is None:
        return _unauthorized("capture key is unknown or revoked")
    if tenant_header is not None and tenant_header != key.tenant:
        return _error(403, f"key {key.id} belongs to another tenant than X-Kolm-Tenant")
    if ns_header is None:
        namespace = key.namespaces[0] if len(key.namespaces) == 1 else "default"
    else:
        namespace = ns_header
    if namespace not in key.namespaces:
        return _error(403, f"key {key.id} may not use namespace {namespace}")
    return Identity(key.tenant, namespace, key.id, key.redact_pii, managed)


def apply_managed(headers, ident: Identity, provider: str):
    """Swap the caller's kolm key (sent as the api_key) for the managed provider key, in place."""
    if ident.managed is None:
        return headers
    headers.popall("Authorization", None)
    headers.popall("x-api-key", None)
    if provider == "anthropic":
        headers["x-api-key"] = ident.managed
    else:
        headers["Authorization"] = f"Bearer {ident.managed}"
    return headers


def is_admin(request: Request) -> bool:
    """`Authorization: Bearer $KOLM_ADMIN_TOKEN` (constant-time); with no token set, an open loopback
    proxy (no active key) counts as admin, as its bridge already is."""
    token = request.app.state.admin_token
    if token is None:
        return not request.app.state.keys.any_active
    scheme, _, value = request.headers.get("authorization", "").partition(" ")
    return scheme.lower() == "bearer" and hmac.compare_digest(value.strip().encode(), token.encode())
