"""What every store backend shares: the `Store` protocol, keyset cursors, row <-> Observation, message scrubbing."""

from __future__ import annotations

import base64
import json
import re
from collections.abc import Callable, Iterator
from datetime import datetime, timezone
from typing import Any, Protocol, runtime_checkable

from kolm_ray.observations.model import Observation
from kolm_ray.settings import redact_url, secrets_of

MAX_PAGE = 1000  # the bridge's largest page; bigger exports go through iter_observations
MAX_SEQ = 2**63 - 1  # the largest seq (64-bit in both backends)

# The columns every backend stores and reads back, in this order (`seq`, the insertion order, comes first
# in reads and is the keyset cursor).
COLUMNS = (
    "id",
    "namespace",
    "tenant",
    "provider",
    "model",
    "input",
    "output",
    "verified",
    "status",
    "latency_ms",
    "usage",
    "created_at",
    "request",
    "omitted",
    "key_id",
)
COLUMN_LIST = ", ".join(COLUMNS)
# Rows a model may learn from (CONTRACT.md "Training data you can trust"; SQL over `observations`, both
# dialects, never NULL so NOT(...) is exact): verified true, or imported without a capture key (the admin
# token, or the CLI, which holds the store itself), or captured/imported with a key whose train is true.
TRUSTED_SQL = (
    "(verified IS TRUE OR (key_id IS NULL AND provider = 'import') OR EXISTS "
    "(SELECT 1 FROM keys WHERE keys.id = observations.key_id AND keys.train = 1))"
)


@runtime_checkable
class Store(Protocol):
    """What every observation backend implements. Methods are thread-safe.

    `url` is the store's URL with any password replaced by `***`: safe to print, log and serve.
    """

    url: str

    def append(self, obs: Observation) -> int:
        """Insert one observation; returns 1."""

    def append_many(
        self, observations: list[Observation], ignore_existing: bool = False, timeout_s: float | None = None
    ) -> int:
        """Insert all in one transaction (all or none); returns how many rows were inserted.

        A duplicate id raises KeyError, unless `ignore_existing`: then rows whose id is already stored
        are skipped (`ON CONFLICT (id) DO NOTHING`: a replayed spool never duplicates) and the count is
        of the new rows only. `timeout_s`: give up (raise the driver's error) after that long waiting for
        the write lock / a connection / the statement, instead of the backend's default.
        """

    def get(self, id: str) -> Observation | None:
        """The observation with this id, or None."""

    def list(
        self,
        namespace: str | None = None,
        tenant: str | None = None,
        verified: bool | str | None = None,
        limit: int = 100,
        cursor: str | None = None,
    ) -> tuple[list[Observation], str | None]:
        """A page in insertion order and the cursor of the next page (None at the end).

        `verified`: True/False filter on that value, "null" on not-yet-judged, None = no filter.
        Raises ValueError on a bad cursor or limit.
        """

    def verify(self, id: str, verified: bool, output: Any = None) -> Observation | None:
        """Set `verified` (and replace `output` when given); the updated observation, or None if unknown."""

    def namespaces(self) -> list[dict[str, Any]]:
        """[{"name", "count", "verified"}] per namespace, by name; `verified` counts verified=true."""

    def iter_observations(
        self, namespace: str, verified: bool | str | None = None, batch_size: int = 1000
    ) -> Iterator[list[Observation]]:
        """Every observation of a namespace, in insertion order, in lists of up to batch_size."""

    def count(self, namespace: str | None = None) -> int:
        """How many observations (in a namespace, or in all)."""

    def delete(self, erasure: Any) -> int:
        """Delete the rows an `erase.Erasure` matches and their shadow pairs, in one transaction; how many
        observations were deleted."""

    def schema_version(self) -> int:
        """The highest migration applied."""

    def dataset_source(
        self, namespaces: list[str], include_untrusted: bool = False
    ) -> tuple[str, list[Any], Callable[[], Any]]:
        """(sql, params, connection_factory) for Ray Data's read_sql over these namespaces' rows: only the
        trusted ones (TRUSTED_SQL) unless `include_untrusted`; never local answers.

        Columns: seq, id, namespace, input, output (JSON text), verified (0/1/NULL), request (JSON text).
        The factory is picklable and opens a read-only DB-API connection inside each read task.
        """

    def close(self) -> None:
        """Release connections; the store is unusable afterwards."""


def dumps(value: Any) -> str | None:
    return None if value is None else json.dumps(value, ensure_ascii=False, separators=(",", ":"))


def to_row(obs: Observation, iso_time: bool = False) -> tuple:
    """An observation as the COLUMNS tuple: JSON fields as text, verified as 0/1/None, time in UTC
    (a datetime, or ISO-8601 text when `iso_time`: SQLite has no time type)."""
    created = obs.created_at.astimezone(timezone.utc)
    return (
        obs.id,
        obs.namespace,
        obs.tenant,
        obs.provider,
        obs.model,
        obs.input,
        json.dumps(obs.output, ensure_ascii=False, separators=(",", ":")),
        None if obs.verified is None else int(obs.verified),
        obs.status,
        obs.latency_ms,
        dumps(obs.usage),
        created.isoformat() if iso_time else created,
        dumps(obs.request),
        obs.omitted,
        obs.key_id,
    )


def from_row(r: tuple | list) -> Observation:
    """A COLUMNS row (JSON as text, created_at as ISO text or datetime) back to an Observation."""
    created = r[11] if isinstance(r[11], datetime) else datetime.fromisoformat(r[11])
    # Rows were validated on the way in; model_construct skips re-validating 100k rows on export.
    return Observation.model_construct(
        id=r[0],
        namespace=r[1],
        tenant=r[2],
        provider=r[3],
        model=r[4],
        input=r[5],
        output=None if r[6] is None else json.loads(r[6]),
        verified=None if r[7] is None else bool(r[7]),
        status=r[8],
        latency_ms=r[9],
        usage=None if r[10] is None else json.loads(r[10]),
        created_at=created.astimezone(timezone.utc),
        request=None if r[12] is None else json.loads(r[12]),
        omitted=r[13],
        key_id=r[14],
    )


# The rows any stage may train on, as far as privacy goes: those whose text was stored (no X-Kolm-Omit).
# One condition, kept apart from every other filter (provider, verified, trust) so that each reads alone.
TRAINABLE = "omitted IS NULL"


def encode_cursor(seq: int) -> str:
    return base64.urlsafe_b64encode(f"s{seq}".encode()).decode().rstrip("=")


def decode_cursor(cursor: str) -> int:
    """The seq a cursor points after; ValueError when it is not one this store issued."""
    try:
        if len(cursor) > 32:  # "s" + a 64-bit integer is 28 characters of base64
            raise ValueError
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)).decode("ascii")
        digits = raw[1:]
        if not raw.startswith("s") or not (digits.isascii() and digits.isdigit()):
            raise ValueError
        seq = int(digits)
        if seq > MAX_SEQ:  # SQLite INTEGER and PostgreSQL BIGINT are 64-bit: a bigger one cannot be bound
            raise ValueError
        return seq
    except (ValueError, UnicodeDecodeError):
        shown = cursor if len(cursor) <= 40 else cursor[:37] + "..."
        raise ValueError(f"cursor {shown!r} is not valid (use next_cursor from a previous page)") from None


def check_limit(limit: Any) -> None:
    if not isinstance(limit, int) or isinstance(limit, bool) or not 1 <= limit <= MAX_PAGE:
        raise ValueError(f"limit must be an integer in [1, {MAX_PAGE}], got {limit!r}")


def filters(
    ph: str,
    namespace: str | None,
    tenant: str | None,
    verified: bool | str | None,
    after: int,
    true: Any = 1,
    false: Any = 0,
) -> tuple[str, list[Any]]:
    """The WHERE clause (placeholder `ph`) of a page query: after a seq, optional namespace/tenant/verified."""
    where, params = f"seq > {ph}", [after]
    if namespace is not None:
        where += f" AND namespace = {ph}"
        params.append(namespace)
    if tenant is not None:
        where += f" AND tenant = {ph}"
        params.append(tenant)
    if verified is None:
        pass
    elif verified == "null":
        where += " AND verified IS NULL"
    elif isinstance(verified, bool):
        where += f" AND verified = {ph}"
        params.append(true if verified else false)
    else:
        raise ValueError(f"verified must be true, false or null, got {verified!r}")
    return where, params


def store_scheme(store: Store | str) -> str:
    """What a health check or a log may say about a store: its URL scheme only ("sqlite", "postgresql"),
    never a path, a host or a password."""
    url = store if isinstance(store, str) else store.url
    scheme = url.partition(":")[0].lower()
    return scheme if re.fullmatch(r"[a-z][a-z0-9+.\-]*", scheme) else "unknown"


def scrub(message: str, url: str) -> str:
    """A driver's message with the URL redacted and any password it carries removed."""
    message = message.replace(url, redact_url(url))
    for secret in secrets_of(url):
        message = message.replace(secret, "***")
    return redact_url(message)


def portable_sql(store: Any, sql: str) -> str:
    """`?`-placeholder SQL for this store's driver: sqlite3 takes `?`, psycopg `%s`. The registry, the
    report and the loop write their SQL once, in the standard subset both backends run."""
    return sql.replace("?", "%s") if getattr(store, "dialect", "sqlite") == "postgresql" else sql
