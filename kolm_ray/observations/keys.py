"""Capture keys: who may write (and read) which tenant's namespaces through the proxy and the bridge.

    kolm keys create --tenant acme --namespace support [--namespace billing] [--name LABEL] [--no-train]
    kolm keys list [--json]
    kolm keys revoke key_0123456789abcdef

A key is `kolm-sk-` + 43 url-safe characters from `secrets` (256 bits), shown once by `create`; the
store's `keys` table (migration 4, both backends) keeps only its SHA-256. No slow KDF (bcrypt, scrypt,
argon2) is needed: those stretch low-entropy passwords a person chose, while a 256-bit random key cannot
be guessed however fast the hash is (2^256 tries), and a KDF would cost milliseconds on every proxied call.

The proxy holds a `KeyTable`: the active keys by hash, read from the store at start and then every
REFRESH_S by a daemon thread (one small query), so `kolm keys revoke` reaches every worker of
`kolm capture --workers N` within REFRESH_S plus one query. A lookup hashes the presented key, finds the
row by its hash and confirms it with `hmac.compare_digest` (constant time), about 2 us.

Trust (`TRUSTED_SQL`): a row may train a model when it is verified true, or was imported without a key
(the admin token or the CLI, which has the store itself), or came with a key whose `train` is true. Rows of
`--no-train` keys and of an open (keyless) proxy are kept for spend and reports only.
"""

from __future__ import annotations

import argparse
import hashlib
import hmac
import json
import logging
import secrets
import threading
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from typing import Any

from kolm_ray.errors import KolmError
from kolm_ray.observations.model import check_namespace
from kolm_ray.observations.store.base import TRUSTED_SQL, portable_sql

log = logging.getLogger("kolm.keys")

KEY_PREFIX = "kolm-sk-"
KEY_BYTES = 32  # 256 bits of randomness (the contract asks for >= 128)
REFRESH_S = 0.5  # how often a running proxy re-reads the active keys: a revoke is seen within ~0.5-1 s
MAX_TENANT = 256  # the Observation's tenant bound
MAX_KEY_LENGTH = 128  # a presented key longer than this is not one of ours (400 before any lookup)
REDACT_CHOICES = ("pii",)

_UNTRUSTED_WHY = (
    "CASE WHEN key_id IS NULL THEN 'open proxy (no capture key)' "
    "WHEN EXISTS (SELECT 1 FROM keys WHERE keys.id = observations.key_id) THEN 'key created with --no-train' "
    "ELSE 'unknown key' END"
)


@dataclass(frozen=True)
class CaptureKey:
    """One row of the keys table (never the key itself)."""

    id: str
    tenant: str
    namespaces: tuple[str, ...]
    train: bool
    redact: str | None
    """"pii": the proxy asks for the key's rows to be PII-redacted before they are stored (Exchange.redact_pii)."""
    name: str | None
    created_at: str
    revoked_at: str | None
    key_sha256: str

    @property
    def redact_pii(self) -> bool:
        return self.redact == "pii"

    def public(self) -> dict[str, Any]:
        """What `kolm keys list --json` shows: everything but the hash."""
        out = asdict(self)
        out.pop("key_sha256")
        out["namespaces"] = list(self.namespaces)
        return out


def hash_key(key: str) -> str:
    return hashlib.sha256(key.encode("utf-8", "surrogatepass")).hexdigest()


def _now() -> str:
    return datetime.now(timezone.utc).isoformat()


def _row(r: Any) -> CaptureKey:
    i, h, name, tenant, nss, train, redact, created, revoked = r
    return CaptureKey(i, tenant, tuple(json.loads(nss)), bool(train), redact, name, created, revoked, h)


_SELECT = "SELECT id, key_sha256, name, tenant, namespaces, train, redact, created_at, revoked_at FROM keys"


def check_tenant(tenant: Any) -> str:
    if not isinstance(tenant, str) or not tenant.strip():
        raise ValueError("tenant must be a non-empty string")
    if len(tenant) > MAX_TENANT:
        raise ValueError(f"tenant is {len(tenant)} characters, over the limit of {MAX_TENANT}")
    if not tenant.isprintable():
        raise ValueError("tenant holds control characters")
    return tenant


def create_key(
    store: Any,
    tenant: str,
    namespaces: list[str],
    *,
    name: str | None = None,
    train: bool = True,
    redact: str | None = None,
) -> tuple[CaptureKey, str]:
    """Make a key: (its row, the key itself, which nothing else ever sees). ValueError on bad arguments."""
    check_tenant(tenant)
    if not namespaces:
        raise ValueError("a key needs at least one --namespace")
    for ns in namespaces:
        check_namespace(ns)
    if name is not None and (len(name) > 128 or not name.isprintable()):
        raise ValueError("--name must be at most 128 printable characters")
    if redact is not None and redact not in REDACT_CHOICES:
        raise ValueError(f"--redact must be one of {', '.join(REDACT_CHOICES)}, got {redact!r}")
    key = KEY_PREFIX + secrets.token_urlsafe(KEY_BYTES)
    row = CaptureKey(
        id=f"key_{secrets.token_hex(8)}",
        tenant=tenant,
        namespaces=tuple(dict.fromkeys(namespaces)),  # order kept, duplicates dropped
        train=train,
        redact=redact,
        name=name,
        created_at=_now(),
        revoked_at=None,
        key_sha256=hash_key(key),
    )
    sql = portable_sql(
        store,
        "INSERT INTO keys (id, key_sha256, name, tenant, namespaces, train, redact, created_at, revoked_at)"
        " VALUES (?, ?, ?, ?, ?, ?, ?, ?, NULL)",
    )
    params = (row.id, row.key_sha256, name, tenant, json.dumps(list(row.namespaces)), int(train), redact,
              row.created_at)  # fmt: skip
    store._write(lambda c: c.execute(sql, params))
    return row, key


def list_keys(store: Any) -> list[CaptureKey]:
    """Every key, active and revoked, oldest first."""
    rows = store._read().execute(_SELECT + " ORDER BY created_at, id").fetchall()
    return [_row(r) for r in rows]


def active_keys(store: Any) -> dict[str, CaptureKey]:
    """The keys not revoked, by the SHA-256 of the key."""
    rows = store._read().execute(_SELECT + " WHERE revoked_at IS NULL").fetchall()
    return {k.key_sha256: k for k in map(_row, rows)}


def revoke_key(store: Any, key_id: str) -> CaptureKey | None:
    """Revoke a key (idempotent: an already revoked key keeps its first revoked_at); None when unknown."""
    sql = portable_sql(store, "UPDATE keys SET revoked_at = ? WHERE id = ? AND revoked_at IS NULL")
    store._write(lambda c: c.execute(sql, (_now(), key_id)))
    rows = store._read().execute(portable_sql(store, _SELECT + " WHERE id = ?"), (key_id,)).fetchall()
    return _row(rows[0]) if rows else None


def untrusted_counts(store: Any, namespace: str) -> dict[str, int]:
    """Why the namespace's rows that are left out of training were left out: {reason: rows}."""
    sql = portable_sql(
        store,
        f"SELECT {_UNTRUSTED_WHY}, COUNT(*) FROM observations WHERE namespace = ? AND provider <> 'local' "
        f"AND NOT {TRUSTED_SQL} GROUP BY 1",
    )
    return {why: int(n) for why, n in store._read().execute(sql, (namespace,)).fetchall()}


class KeyTable:
    """The active keys as a running proxy sees them: loaded at start, refreshed every `refresh_s`.

    `lookup` runs on the event loop and only reads `self._by_hash`, which the refresher replaces whole.
    A refresh that fails (the store is down) keeps the last table: a revoke cannot be written then either.
    """

    def __init__(self, store: Any, refresh_s: float = REFRESH_S) -> None:
        self.store = store
        self.refresh_s = refresh_s
        self._by_hash: dict[str, CaptureKey] = {}
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.problem: str | None = None

    def refresh(self) -> None:
        self._by_hash = active_keys(self.store)

    def start(self) -> None:
        """First read now (raises if the store cannot be read), then a daemon thread keeps it fresh."""
        self.refresh()
        self._thread = threading.Thread(target=self._poll, name="kolm-keys", daemon=True)
        self._thread.start()

    def _poll(self) -> None:
        while not self._stop.wait(self.refresh_s):
            try:
                self.refresh()
                self.problem = None
            except Exception as e:  # keep the last table; /healthz shows why to the admin
                self.problem = f"cannot read the keys table: {type(e).__name__}"

    def stop(self) -> None:
        self._stop.set()

    @property
    def any_active(self) -> bool:
        """True once the store holds at least one active key: from then on every capture call needs one."""
        return bool(self._by_hash)

    def lookup(self, key: str) -> CaptureKey | None:
        """The active key row for a presented key, or None (unknown or revoked). Constant-time confirm."""
        digest = hash_key(key)
        row = self._by_hash.get(digest)
        if row is None or not hmac.compare_digest(row.key_sha256, digest):
            return None
        return row


# ---- `kolm keys` ---------------------------------------------------------------------------------------------


def keys_command(args: argparse.Namespace) -> int:
    """`kolm keys create|list|revoke`: issue, show and revoke capture keys (the key is printed only by create)."""
    from kolm_ray.observations.store import open_store

    with open_store(args.store) as store:
        if args.action == "create":
            try:
                row, key = create_key(
                    store, args.tenant, args.namespace, name=args.name, train=not args.no_train,
                    redact=args.redact,
                )  # fmt: skip
            except ValueError as e:
                raise KolmError(str(e)) from None
            shown = {"id": row.id, "key": key, "tenant": row.tenant, "namespaces": list(row.namespaces),
                     "train": row.train, "created_at": row.created_at}  # fmt: skip
            if row.name is not None:
                shown["name"] = row.name
            if row.redact is not None:
                shown["redact"] = row.redact
            print(json.dumps(shown))
            return 0
        if args.action == "list":
            keys = list_keys(store)
            if args.json:
                print(json.dumps({"keys": [k.public() for k in keys]}, indent=2))
                return 0
            if not keys:
                print(
                    "no capture keys (the proxy is open on loopback only): kolm keys create --tenant T --namespace NS"
                )
                return 0
            for k in keys:
                state = f"revoked {k.revoked_at[:19]}" if k.revoked_at else "active"
                flags = ("" if k.train else " no-train") + (f" redact={k.redact}" if k.redact else "")
                label = f" ({k.name})" if k.name else ""
                print(
                    f"{k.id}{label}  tenant={k.tenant}  namespaces={','.join(k.namespaces)}{flags}  {state}"
                )
            return 0
        row = revoke_key(store, args.id)
        if row is None:
            raise KolmError(f"no capture key {args.id!r} (kolm keys list shows them)")
        print(
            f"revoked {row.id} (tenant {row.tenant}); a running proxy refuses it within {2 * REFRESH_S:g} s"
        )
        return 0
