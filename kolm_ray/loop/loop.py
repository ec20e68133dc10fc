"""`kolm loop`: recompile a namespace from its new traffic, test the candidate against the live model on the
newest held-out calls, and promote it only when it is not worse.

    kolm loop --once --min-new 500            # one pass; one line per namespace on stdout
    kolm loop --interval 3600                 # a pass an hour, until interrupted
    ray job submit -- kolm loop --once        # the same pass as a Ray job (RAY_ADDRESS via ray_session)

Per namespace, in one pass:
1. Due? At least --min-new new usable upstream observations (provider openai/anthropic/import, not
   verified false) since the live model was compiled (its manifest's created_at), or the namespace drifts
   (drift.py). Otherwise `NS: skipped (...)`.
2. Lease: a row in the store's `loop_leases` table (namespace, owner, expires_at), taken in one write
   transaction and renewed right before promoting. A second loop on the same store finds it held and skips
   the namespace, so two loops never both promote; a crashed loop's lease expires after LEASE_S.
3. Held out: the newest quarter (20 to HOLDOUT = 200) of the new usable upstream observations after the live
   model's compile (neither model trained on them: the live one was compiled before them, the candidate's recipe excludes them).
4. Candidate: cluster the namespace (Ray Data) and write a recipe from the live model's cluster (same
   request shape key; the largest cluster when nothing is live), minus the held-out rows, then compile it
   (a Ray Train run, K-score gate, signed .kolm) - the same functions `kolm recipe` and `kolm compile` run.
   A drifting namespace's recipe also leaves out everything up to the live model's compile: the upstream
   answers differently now, and the older answers would teach the candidate the old task.
5. Decide on the held-out rows of the candidate's request shape: both models answer them; a row is right
   when every field equals the upstream's (the K-score's field rules). Two checks, each of which can refuse:
   - The selective gate (compile/selective.py, the same function `kolm compile` gates with): at the
     threshold in its manifest (chosen at compile on other rows), the candidate's answered-accuracy on the
     held-out rows it would answer must be >= its k_floor and its coverage >= selective.COVERAGE_FLOOR.
   - Not worse than the live model, decided by a test: b = rows only the live model gets right, c = rows
     only the candidate gets right; keep the live model when McNemar's exact one-sided test says the
     candidate is worse, p = P[X >= b] < ALPHA = 0.05 with X ~ Binomial(b + c, 1/2). Otherwise promote: the
     candidate saw the newer traffic, and a difference the test cannot tell from chance (b = 3, c = 1:
     p = 0.31) is no reason to keep serving an older model. (The rule this replaces kept the live model
     whenever b > c, which the test could never overrule: p < 0.05 implies b > c.)
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import os
import shutil
import socket
import sys
import tempfile
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

from kolm_ray.errors import KolmError
from kolm_ray.observations.store.base import TRAINABLE, TRUSTED_SQL, portable_sql

DEFAULT_MIN_NEW = 500
HOLDOUT = 200  # newest upstream calls held out per pass: a quarter of the new ones, 20 to 200
MIN_HOLDOUT = 20  # fewer rows of the candidate's shape: no verdict, the live model stays
ALPHA = 0.05
LEASE_S = 6 * 3600  # longer than any compile on a small cluster; renewed before promoting
ACTOR = "kolm loop"  # who promoted, in `kolm models history`
USABLE = "provider IN ('openai', 'anthropic', 'import') AND verified IS NOT FALSE"
USABLE += f" AND {TRAINABLE}"  # privacy: rows stored without their text (X-Kolm-Omit) never train
# ... and trusted (observations/keys.py): --no-train keys' and open-proxy rows neither start nor judge a
# recompile, unless --include-untrusted.
USABLE_TRUSTED = f"{USABLE} AND {TRUSTED_SQL}"


def _usable(include_untrusted: bool) -> str:
    return USABLE if include_untrusted else USABLE_TRUSTED


# (store, namespace, exclude ids, workdir, name) -> candidate .kolm path; raises KolmError/GateError
Builder = Callable[[Any, str, set[str], Path, str, Any], Path]


_sql = portable_sql  # `?` SQL for either backend


def _iso(text: str) -> str:
    """An ISO timestamp as the store writes them (UTC, +00:00), so string order is time order."""
    return datetime.fromisoformat(text).astimezone(timezone.utc).isoformat()


# ---- the lease ---------------------------------------------------------------------------------------------
# The loop_leases table is the store's migration 3 (observations/store/migrations.py), on both backends.
def acquire(store: Any, namespace: str, owner: str, seconds: float = LEASE_S) -> str | None:
    """Take or renew the namespace's lease for `owner`; None on success, else who holds it until when."""
    now = datetime.now(timezone.utc)

    def write(c: Any) -> str | None:
        # One atomic upsert (SQLite >= 3.24 and PostgreSQL alike): two loops racing for a free or expired
        # lease cannot both take it, under SQLite's write lock or PostgreSQL's unique index.
        taken = c.execute(
            _sql(store, "INSERT INTO loop_leases (namespace, owner, expires_at) VALUES (?, ?, ?)"
                        " ON CONFLICT (namespace) DO UPDATE SET owner = excluded.owner,"
                        " expires_at = excluded.expires_at"
                        " WHERE loop_leases.owner = excluded.owner OR loop_leases.expires_at <= ?"),
            (namespace, owner, (now + timedelta(seconds=seconds)).isoformat(), now.isoformat()),
        ).rowcount  # fmt: skip
        if taken:
            return None
        row = c.execute(
            _sql(store, "SELECT owner, expires_at FROM loop_leases WHERE namespace = ?"), (namespace,)
        ).fetchone()
        return f"another kolm loop ({row[0]}) holds its lease until {row[1][:19]}"

    return store._write(write)


def release(store: Any, namespace: str, owner: str) -> None:
    store._write(lambda c: c.execute(
        _sql(store, "DELETE FROM loop_leases WHERE namespace = ? AND owner = ?"), (namespace, owner)
    ))  # fmt: skip


# ---- what is due, what is held out -------------------------------------------------------------------------
def new_usable(store: Any, namespace: str, after: str | None, include_untrusted: bool = False) -> int:
    q = f"SELECT COUNT(*) FROM observations WHERE namespace = ? AND {_usable(include_untrusted)}"
    params: tuple = (namespace,)
    if after is not None:
        q, params = q + " AND created_at > ?", (namespace, _iso(after))
    return int(store._read().execute(_sql(store, q), params).fetchone()[0])


def holdout_rows(
    store: Any, namespace: str, after: str | None, n: int = HOLDOUT, include_untrusted: bool = False
) -> list[dict[str, Any]]:
    """The newest `n` usable (trusted) upstream calls after `after` (the live model's compile), newest first."""
    q = f"SELECT id, input, output, request FROM observations WHERE namespace = ? AND {_usable(include_untrusted)} AND provider <> 'import'"
    params: list[Any] = [namespace]
    if after is not None:
        q += " AND created_at > ?"
        params.append(_iso(after))
    rows = store._read().execute(_sql(store, q + " ORDER BY seq DESC LIMIT ?"), (*params, n)).fetchall()
    return [
        {"id": i, "input": t, "output": json.loads(o) if o else None, "request": json.loads(r) if r else None}
        for i, t, o, r in rows
    ]


def older_than(store: Any, namespace: str, when: str) -> set[str]:
    """Ids of the namespace's observations up to `when` (what a drifting namespace's candidate leaves out)."""
    q = _sql(store, "SELECT id FROM observations WHERE namespace = ? AND created_at <= ?")
    return {i for (i,) in store._read().execute(q, (namespace, _iso(when))).fetchall()}


# ---- the paired comparison ---------------------------------------------------------------------------------
def mcnemar_worse_p(b: int, c: int) -> float:
    """One-sided exact McNemar p-value for "the candidate is worse": P[X >= b], X ~ Binomial(b + c, 1/2)."""
    n = b + c
    if n == 0:
        return 1.0
    return sum(math.comb(n, k) for k in range(b, n + 1)) / 2**n


@dataclass
class Verdict:
    promote: bool
    candidate: float
    live: float | None
    n: int
    b: int
    c: int
    p: float
    reason: str
    selective: dict[str, Any] | None = None  # the candidate's selective gate on these rows (to_json)
    live_selective: dict[str, Any] | None = None  # the live model's, at its own threshold (reported only)


def decide(
    cand_right: list[bool], live_right: list[bool] | None, cand_floor: float,
    cand_conf: list[float] | None = None, threshold: float = 0.0,
    live_conf: list[float] | None = None, live_threshold: float = 0.0,
) -> Verdict:  # fmt: skip
    """The promotion rule of the module docstring, on paired per-row correctness. Without confidences every
    row counts as answered (coverage 1, answered-accuracy = accuracy)."""
    from kolm_ray.compile.selective import gate

    n = len(cand_right)
    acc = sum(cand_right) / n
    sel = gate(cand_conf if cand_conf is not None else [1.0] * n, cand_right, threshold, cand_floor)
    sj = sel.to_json()
    if live_right is None:
        why = f"held-out {acc:.3f} on {n} rows; {sel.reason}"
        return Verdict(sel.passed, acc, None, n, 0, 0, 1.0, why, sj)
    b = sum(lv and not cv for cv, lv in zip(cand_right, live_right, strict=True))
    c = sum(cv and not lv for cv, lv in zip(cand_right, live_right, strict=True))
    p = mcnemar_worse_p(b, c)
    live_acc = sum(live_right) / n
    lj = None
    if live_conf is not None:
        lj = gate(live_conf, live_right, live_threshold, cand_floor).to_json()
    base = (
        f"candidate {acc:.3f} vs live {live_acc:.3f} on {n} held-out rows, b={b} c={c}, McNemar p={p:.3g}; "
        f"candidate {sel.reason}"
    )
    if lj is not None and lj["answered_accuracy"] is not None:
        base += f"; live answered-accuracy {lj['answered_accuracy']:.3f}, coverage {lj['coverage']:.2f}"
    if not sel.passed:
        return Verdict(
            False, acc, live_acc, n, b, c, p, f"{base}; candidate fails the selective gate", sj, lj
        )
    if p < ALPHA:
        return Verdict(False, acc, live_acc, n, b, c, p, f"{base}; candidate worse (p < {ALPHA})", sj, lj)
    return Verdict(True, acc, live_acc, n, b, c, p, base, sj, lj)


def judge(artifact: str | Path, rows: list[dict[str, Any]]) -> tuple[list[bool], list[float]]:
    """Per row: does the model's answer equal the upstream's on every field (the K-score's rules), and the
    confidence the proxy would compare with the model's threshold (0 for an answer it routes broad)."""
    from kolm_ray.artifact.kscore import field_correct
    from kolm_ray.artifact.spec import CONFIDENCE_FIELD, FALLBACK_FIELD
    from kolm_ray.inference.predictors import open_predictor

    predictor = open_predictor(artifact)
    try:
        answers = predictor.predict([r["input"] for r in rows])
        right, conf = [], []
        for r, a in zip(rows, answers, strict=True):
            gold = r["output"]
            if isinstance(gold, dict):
                gold = {k: v for k, v in gold.items() if k not in (CONFIDENCE_FIELD, FALLBACK_FIELD)}
            right.append(all(field_correct(a, gold, predictor.spec.tolerance).values()))
            broad = a.get(FALLBACK_FIELD) == "broad"
            conf.append(0.0 if broad else float(a.get(CONFIDENCE_FIELD, 0.0)))
        return right, conf
    finally:
        predictor.close()


def correctness(artifact: str | Path, rows: list[dict[str, Any]]) -> list[bool]:
    """Per row: does the model's answer equal the upstream's on every field (the K-score's rules)?"""
    return judge(artifact, rows)[0]


# ---- the candidate: recipe -> compile ----------------------------------------------------------------------
def recipe_and_compile(
    store: Any,
    namespace: str,
    exclude: set[str],
    workdir: Path,
    name: str,
    live: Any,
    include_untrusted: bool = False,
) -> Path:
    """Cluster, recipe (the live model's cluster, minus `exclude`), compile on Ray Train; the .kolm path.
    KolmError when no recipe can be made, GateError when the candidate misses its K-floor at compile."""
    import numpy as np

    from kolm_ray.clustering import cluster_members, cluster_namespace
    from kolm_ray.compile.args import compile_args
    from kolm_ray.compile.compile import build_artifact, train
    from kolm_ray.compile.compute import Meter
    from kolm_ray.compile.plan import validate
    from kolm_ray.observations.request_shape import shape_of_cluster
    from kolm_ray.placement import ray_session
    from kolm_ray.recipe import recipe_from_observations

    meter = Meter()  # the clustering, recipe and compile's CPU/GPU seconds: metrics.compute
    with ray_session(worker_logs=False):  # RAY_ADDRESS (a Ray job) or a fresh local Ray
        # The URL the store connects with: PostgresStore.url is the redacted one, for display only.
        url = getattr(store, "_dsn", None) or store.url
        result = cluster_namespace(url, namespace, summarize=False, include_untrusted=include_untrusted)
        if not result.clusters:
            raise KolmError("no observations to cluster")
        chosen = None
        for cl in result.clusters:  # largest first
            obs, emb = cluster_members(result, cl["id"])
            if live is None or shape_of_cluster([o["request"] for o in obs])["key"] == live.shape.get("key"):
                chosen = (cl["id"], obs, emb)
                break
    if chosen is None:
        raise KolmError(f"no cluster has {live.label}'s request shape any more")
    cid, obs, emb = chosen
    keep = [i for i, o in enumerate(obs) if o["id"] not in exclude]
    info = recipe_from_observations(
        [obs[i] for i in keep], out_dir=str(workdir / "recipe"), embeddings=np.asarray(emb)[keep],
        namespace=namespace, cluster=cid, store=store,
    )  # fmt: skip
    out = workdir / f"{name}.kolm"
    plan = validate(compile_args(["--recipe", info["recipe_dir"], "--output", str(out)]))
    result_t, _ = train(plan, workdir)  # a Ray Train run (its own ray_session: the job's cluster or local)
    training = {"seconds": round(result_t.seconds, 2), "worker_cpu_s": result_t.metrics.get("worker_cpu_s"),
                "gpus": result_t.metrics.get("gpus")}  # fmt: skip
    build_artifact(plan, result_t.checkpoint_dir, training, workdir, started=meter)
    return out


# ---- one pass ----------------------------------------------------------------------------------------------
def run_namespace(
    store: Any, namespace: str, min_new: int, owner: str, build: Builder, include_untrusted: bool = False
) -> str:
    """One namespace's line: promoted / kept / skipped (trusted rows only, unless `include_untrusted`)."""
    from kolm_ray import registry
    from kolm_ray.errors import GateError
    from kolm_ray.observations.request_shape import matches, shape_of_request
    from kolm_ray.registry import drift

    held = acquire(store, namespace, owner)
    if held is not None:
        return f"{namespace}: skipped ({held})"
    try:
        live = registry.live_models(store).get(namespace)
        after = live.created_at if live is not None else None
        new = new_usable(store, namespace, after, include_untrusted)
        state = drift.namespace_state(store, live)[0] if live is not None else "ok"
        if new < min_new and state == "ok":
            return f"{namespace}: skipped ({new} new usable observations, fewer than {min_new})"
        rows = holdout_rows(
            store, namespace, after, min(HOLDOUT, max(MIN_HOLDOUT, new // 4)), include_untrusted
        )
        if len(rows) < MIN_HOLDOUT:
            return f"{namespace}: skipped ({len(rows)} held-out calls, fewer than {MIN_HOLDOUT})"
        name = live.name if live is not None else namespace
        workdir = Path(tempfile.mkdtemp(prefix=f"kolm-loop-{namespace}-"))
        try:
            try:
                exclude = {r["id"] for r in rows}
                if state != "ok":  # the upstream's answers changed: learn from what it says now
                    exclude |= older_than(store, namespace, after)
                artifact = build(store, namespace, exclude, workdir, name, live)
            except (KolmError, GateError) as e:
                if live is None:
                    return f"{namespace}: skipped (candidate: {e})"
                return f"{namespace}: kept {live.label} (candidate: {e})"
            from kolm_ray.artifact import verify

            manifest = verify(artifact)
            shape = manifest.get("request_shape") or {}
            rows = [r for r in rows if matches(shape, shape_of_request(r["request"]))] if shape else rows
            if len(rows) < MIN_HOLDOUT:
                why = f"{len(rows)} held-out calls of the candidate's request shape, fewer than {MIN_HOLDOUT}"
                return f"{namespace}: kept {live.label} ({why})" if live else f"{namespace}: skipped ({why})"
            floor = float(manifest.get("k_floor") or 0.0)
            cand, cand_conf = judge(artifact, rows)
            # A live model whose file is gone or broken is not answering anything (the proxy skips it):
            # the candidate then only has to pass its own gate.
            usable_live = live is not None and registry.check_file(live) is None
            live_right, live_conf = judge(live.path, rows) if usable_live else (None, None)
            v = decide(cand, live_right, floor, cand_conf, registry.threshold_of(manifest),
                       live_conf, live.threshold if usable_live else 0.0)  # fmt: skip
            print(f"{namespace}: {v.reason}", file=sys.stderr)
            if not v.promote:
                return (
                    f"{namespace}: kept {live.label} ({v.reason})"
                    if live
                    else f"{namespace}: skipped ({v.reason})"
                )
            held = acquire(store, namespace, owner)  # renew: only the lease holder promotes
            if held is not None:
                return f"{namespace}: skipped ({held})"
            try:
                # The history names the loop as the actor and its decision line as the reason.
                row = registry.promote(store, artifact, namespace, actor=ACTOR, reason=v.reason)
            except KolmError as e:  # e.g. the spec no longer fits the newest outputs (registry.check_fit)
                kept = f"kept {live.label}" if live is not None else "skipped"
                return f"{namespace}: {kept} (promotion refused: {e})"
            k = (manifest.get("metrics") or {}).get("k_score")
            return (
                f"{namespace}: promoted {row.label} (k={k:.2f})"
                if k is not None
                else f"{namespace}: promoted {row.label}"
            )
        finally:
            shutil.rmtree(workdir, ignore_errors=True)
    finally:
        release(store, namespace, owner)


def loop_once(store: Any, min_new: int = DEFAULT_MIN_NEW, namespaces: list[str] | None = None,
              build: Builder | None = None, owner: str | None = None,
              include_untrusted: bool = False) -> list[str]:  # fmt: skip
    """One pass: a line per namespace (every namespace with observations or a live model, or `namespaces`)."""
    from kolm_ray import registry

    owner = owner or f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:6]}"
    names = namespaces or sorted({n["name"] for n in store.namespaces()} | set(registry.live_models(store)))
    lines = []
    for ns in names:
        try:
            default = functools.partial(recipe_and_compile, include_untrusted=include_untrusted)
            line = run_namespace(store, ns, min_new, owner, build or default, include_untrusted)
        except Exception as e:  # one namespace's failure (Ray, disk) must not end the others' pass
            import traceback

            traceback.print_exc(file=sys.stderr)
            line = f"{ns}: skipped (error: {type(e).__name__}: {str(e)[:200]})"
        print(line, flush=True)
        lines.append(line)
    return lines


def loop_command(args: argparse.Namespace) -> int:
    """kolm loop [--once] [--min-new N] [--interval S] [--namespace NS ...] [--store URL]."""
    from kolm_ray.observations.model import check_namespace
    from kolm_ray.observations.store import open_store
    from kolm_ray.placement import quiet_deepspeed_on_cpu

    min_new = DEFAULT_MIN_NEW if args.min_new is None else args.min_new
    if min_new < 1:
        raise KolmError(f"--min-new must be at least 1, got {min_new}")
    if not args.once and not args.interval > 0:
        raise KolmError(f"--interval must be a positive number of seconds, got {args.interval}")
    for ns in args.namespace or []:
        try:
            check_namespace(ns)
        except ValueError as e:
            raise KolmError(f"--namespace: {e}") from None
    quiet_deepspeed_on_cpu()
    store = open_store(args.store)
    try:
        while True:
            # Ray starts only for a namespace that is due
            loop_once(
                store, min_new, args.namespace, include_untrusted=getattr(args, "include_untrusted", False)
            )
            if args.once:
                return 0
            time.sleep(args.interval)
    finally:
        store.close()
