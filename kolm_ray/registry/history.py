"""The registry's memory: one append-only event per promote and rollback, with who did it and why.

    kolm models history [--namespace support] [--json]      # oldest first
    KOLM_ACTOR=alice kolm models promote m.kolm --namespace support --reason "ticket 42"

Events live in the store's `model_events` table (migration 5), written by `record` inside the very
transaction that changes `models` (registry.promote / registry.rollback pass their connection), so a
promotion never exists without its event. Nothing here updates or deletes an event, and both databases
refuse it (triggers), so the history only grows.
"""

from __future__ import annotations

import getpass
import os
import socket
from dataclasses import asdict, dataclass
from typing import Any, Literal

from kolm_ray.observations.store.base import portable_sql

MAX_ACTOR = 200  # characters; an actor is a name, not a document
MAX_REASON = 2000  # characters; the loop's decision line is ~150
_COLS = "namespace, version, name, action, actor, reason, at, k_score, sha256"


@dataclass(frozen=True)
class Event:
    """One promote or rollback: the version it made live, by whom, why, when."""

    namespace: str
    version: int
    name: str
    action: Literal["promote", "rollback"]
    actor: str
    reason: str | None
    at: str
    k_score: float | None
    sha256: str

    def public(self) -> dict[str, Any]:
        """The contract's `kolm models history --json` fields."""
        return asdict(self)


def default_actor() -> str:
    """$KOLM_ACTOR when set, else user@host (the uid when the user has no name, as in some containers)."""
    actor = os.environ.get("KOLM_ACTOR", "").strip()
    if actor:
        return actor
    try:
        user = getpass.getuser()
    except (KeyError, OSError):  # no passwd entry and no LOGNAME/USER
        user = f"uid{os.getuid()}"
    return f"{user}@{socket.gethostname()}"


def _clean(text: str | None, limit: int) -> str | None:
    # One line of printable text: an event is shown in a terminal table as is.
    if text is None:
        return None
    text = "".join(ch if ch.isprintable() else " " for ch in str(text)).strip()
    return (text[: limit - 1] + "…" if len(text) > limit else text) or None


def record(
    conn: Any, store: Any, action: Literal["promote", "rollback"], row: Any, actor: str | None,
    reason: str | None, at: str,
) -> None:  # fmt: skip
    """Append one event for `row` (a ModelRow now live) on `conn`, inside the caller's write transaction."""
    conn.execute(
        portable_sql(store, f"INSERT INTO model_events ({_COLS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)"),
        (row.namespace, row.version, row.name, action, _clean(actor, MAX_ACTOR) or default_actor(),
         _clean(reason, MAX_REASON), at, row.k_score, row.sha256),
    )  # fmt: skip


def history(store: Any, namespace: str | None = None) -> list[Event]:
    """Every event (of one namespace), oldest first."""
    q = f"SELECT {_COLS} FROM model_events"
    params: tuple = ()
    if namespace is not None:
        q, params = q + " WHERE namespace = ?", (namespace,)
    rows = store._read().execute(portable_sql(store, q + " ORDER BY seq"), params).fetchall()
    return [
        Event(namespace=r[0], version=int(r[1]), name=r[2], action=r[3], actor=r[4], reason=r[5], at=r[6],
              k_score=r[7], sha256=r[8])
        for r in rows
    ]  # fmt: skip


def print_history(events: list[Event]) -> None:
    """The readable table: one line per event, oldest first."""
    print(f"{'at':<20} {'namespace':<20} {'action':<8} {'model':<28} {'k_score':>7}  {'actor':<24} reason")
    for e in events:
        k = "-" if e.k_score is None else f"{e.k_score:.3f}"
        label = f"{e.name}@{e.version}"
        who = f"{e.at[:19]:<20} {e.namespace:<20} {e.action:<8} {label:<28} {k:>7}  {e.actor:<24}"
        print(f"{who} {e.reason or ''}")
