"""Drift: live agreement of a namespace's live model with the upstream, over a sliding window of shadow pairs.

    agreement, n = live_agreement(store, "support", version=3)   # over the last WINDOW comparable pairs
    state_of(agreement, n, k_floor)                               # "ok" | "drifting" | "stopped"

The window is the last WINDOW (100) shadow pairs of the live version whose agreement is known (an upstream
failure is not a disagreement); with fewer than MIN_PAIRS (20) of them the agreement is reported but no
verdict is drawn (20 pairs put a binomial standard error of about 0.07 on a 0.85 agreement; fewer would
flag noise). Only the live version's pairs count: a newly promoted model starts with a fresh window.

- drifting: agreement below the live model's k_floor. `kolm report` says so, the capture proxy raises
  that namespace's shadow rate to DRIFT_SHADOW_RATE (0.5) so the next recompile has fresh upstream
  answers, and `kolm loop` recompiles it whatever the count of new observations.
- stopped: agreement below k_floor - STOP_MARGIN (0.15): the proxy stops answering that namespace
  locally (every call goes upstream, `x-kolm-upstream-reason: drift ...`) until another version is
  promoted.
"""

from __future__ import annotations

from typing import Any

from kolm_ray.observations.store.base import portable_sql

WINDOW = 100
MIN_PAIRS = 20
DRIFT_SHADOW_RATE = 0.5
STOP_MARGIN = 0.15


_sql = portable_sql  # `?` SQL for either backend


def live_agreement(
    store: Any, namespace: str, version: int, window: int = WINDOW
) -> tuple[float | None, int]:
    """(share of the last `window` comparable shadow pairs of this version that agree, how many there were).
    One indexed read (shadow_pairs by namespace, created_at)."""
    q = _sql(
        store,
        "SELECT agree FROM shadow_pairs WHERE namespace = ? AND version = ? AND agree IS NOT NULL"
        " ORDER BY created_at DESC LIMIT ?",
    )
    rows = store._read().execute(q, (namespace, version, window)).fetchall()
    if not rows:
        return None, 0
    return sum(int(a) for (a,) in rows) / len(rows), len(rows)


def state_of(agreement: float | None, n: int, k_floor: float | None) -> str:
    """ "ok", "drifting" (below k_floor) or "stopped" (below k_floor - STOP_MARGIN); "ok" on too few pairs."""
    if agreement is None or k_floor is None or n < MIN_PAIRS:
        return "ok"
    if agreement < k_floor - STOP_MARGIN:
        return "stopped"
    return "drifting" if agreement < k_floor else "ok"


def namespace_state(store: Any, row: Any) -> tuple[str, float | None, int]:
    """(state, agreement, pairs) of a live registry row."""
    agreement, n = live_agreement(store, row.namespace, row.version)
    return state_of(agreement, n, row.k_floor), agreement, n
