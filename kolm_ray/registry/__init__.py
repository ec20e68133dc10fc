"""The model registry: which promoted artifact answers each namespace, in the observation store.

    kolm models promote tagger.kolm --namespace support     # verify, copy under $KOLM_HOME/models, make live
    kolm models list [--namespace support] [--json]
    kolm models rollback --namespace support                # the previously live version is live again
    kolm models history [--namespace support] [--json]      # every promote and rollback, who and why

    from kolm_ray import registry
    row = registry.promote(store, "tagger.kolm", "support")  # ModelRow(namespace, version, name, ...)
    registry.live_models(store)                               # {namespace: ModelRow} (what the proxy polls)

Rows live in the store's `models` table (migration 2 in observations/store/migrations.py), each promote
and rollback also as an append-only event in `model_events` (history.py, same transaction), and shadow
checks in `shadow_pairs`; the SQL here is standard (`?` placeholders, rewritten to `%s` for psycopg), run over
the store's own connections (`_write(fn)`: fn(conn) inside one transaction; `_read()`: a connection), so the
registry follows whichever backend the store URL names. The artifact file is copied (atomically) to
$KOLM_HOME/models/NS/NAME-vN-SHA12.kolm: the row never points at a file the user may move or rebuild.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import sys
import tempfile
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from kolm_ray.errors import KolmError
from kolm_ray.observations.model import check_namespace
from kolm_ray.observations.store import Store, open_store
from kolm_ray.observations.store.base import TRAINABLE, portable_sql
from kolm_ray.registry import history
from kolm_ray.settings import kolm_home

FIT_SAMPLE = 200  # recent upstream outputs a spec is checked against at promotion
FIT_MIN_SHARE = 0.9  # below this share of them passing the spec, promotion is refused (exit 2)
SHAPE_PAGE = 1000  # observations read per query while looking for one of the model's request shape
_COLS = (
    "namespace, version, name, sha256, path, k_score, k_floor, threshold, shape, live, created_at,"
    " promoted_at, rolled_back_at"
)


@dataclass(frozen=True)
class ModelRow:
    """One promoted artifact version of a namespace."""

    namespace: str
    version: int
    name: str
    sha256: str
    path: str
    """The registry's own copy of the .kolm, under $KOLM_HOME/models/."""
    k_score: float | None
    k_floor: float | None
    threshold: float
    """Confidence below this: the proxy sends the call upstream instead of answering it."""
    shape: dict[str, Any]
    """The request shape the model answers (request_shape.shape_of_cluster)."""
    live: bool
    created_at: str
    promoted_at: str
    rolled_back_at: str | None = None

    @property
    def label(self) -> str:
        """NAME@VERSION, as `x-kolm-model` and the CLI print it."""
        return f"{self.name}@{self.version}"

    def public(self) -> dict[str, Any]:
        """The contract's `kolm models list` fields."""
        keys = (
            "namespace",
            "version",
            "name",
            "sha256",
            "k_score",
            "k_floor",
            "live",
            "created_at",
            "promoted_at",
        )
        d = asdict(self)
        return {k: d[k] for k in keys} | {"threshold": self.threshold} | selective_of(self.path)


def manifest_metrics(path: str) -> dict[str, Any]:
    """The artifact's manifest `metrics` ({} for a file that cannot be read). For listing and reports only:
    the file was verified when it was promoted, and the proxy verifies it again before loading it."""
    import zipfile

    from kolm_ray.artifact import MANIFEST

    try:
        with zipfile.ZipFile(path) as z:
            info = z.getinfo(MANIFEST)
            if info.file_size > 4 * 1024 * 1024:
                return {}
            metrics = json.loads(z.read(info)).get("metrics")
    except (OSError, KeyError, ValueError, zipfile.BadZipFile, AttributeError):
        return {}
    return metrics if isinstance(metrics, dict) else {}


def selective_of(path: str) -> dict[str, Any]:
    """`coverage` and `answered_accuracy` from the artifact's metrics (compile/selective.py: the share of
    its gate rows it answers at its threshold, and how many of those it gets right); None for an artifact
    compiled before the selective gate, or a file that cannot be read."""
    metrics = manifest_metrics(path)
    out: dict[str, Any] = {}
    for k in ("coverage", "answered_accuracy"):
        v = metrics.get(k)
        out[k] = v if isinstance(v, (int, float)) and not isinstance(v, bool) else None
    return out


_sql = portable_sql  # `?` SQL for either backend


def _row(r: tuple) -> ModelRow:
    return ModelRow(
        namespace=r[0], version=int(r[1]), name=r[2], sha256=r[3], path=r[4], k_score=r[5], k_floor=r[6],
        threshold=float(r[7]), shape=json.loads(r[8]), live=bool(r[9]), created_at=r[10], promoted_at=r[11],
        rolled_back_at=r[12],
    )  # fmt: skip


def _now() -> str:
    return datetime.now(timezone.utc).isoformat()


def list_models(store: Store, namespace: str | None = None) -> list[ModelRow]:
    """Every registered version (of one namespace), by namespace then version."""
    if namespace is None:
        rows = store._read().execute(f"SELECT {_COLS} FROM models ORDER BY namespace, version").fetchall()
    else:
        q = _sql(store, f"SELECT {_COLS} FROM models WHERE namespace = ? ORDER BY version")
        rows = store._read().execute(q, (namespace,)).fetchall()
    return [_row(r) for r in rows]


def live_models(store: Store) -> dict[str, ModelRow]:
    """namespace -> its live model. One indexed read: what the capture proxy polls about once a second."""
    rows = store._read().execute(f"SELECT {_COLS} FROM models WHERE live = 1").fetchall()
    return {r[0]: _row(r) for r in rows}


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def check_file(row: ModelRow) -> str | None:
    """Why the registry's copy cannot be served (missing, changed, no longer verifies), or None."""
    from kolm_ray.artifact import verify
    from kolm_ray.errors import ArtifactError

    p = Path(row.path)
    if not p.is_file():
        return f"{row.namespace}: {row.label}'s artifact file is missing"
    if _sha256(p) != row.sha256:
        return f"{row.namespace}: {row.label}'s artifact file changed since promotion (sha256 differs)"
    try:
        verify(p)
    except ArtifactError as e:
        return f"{row.namespace}: {row.label}'s artifact no longer verifies: {str(e).rsplit(': ', 1)[-1]}"
    return None


def threshold_of(manifest: dict[str, Any]) -> float:
    """The model's confidence threshold: an extractor's chosen one (compile/extract.py), else the one its
    compile chose for the selective gate (metrics.selective.threshold, compile/selective.py), never below its
    spec's low-confidence-fallback-broad
    one, else the default."""
    from kolm_ray.artifact.spec import validate_spec
    from kolm_ray.artifact.verifiers import DEFAULT_THRESHOLD

    chosen = (manifest.get("metrics") or {}).get("local_threshold")
    if manifest.get("kind") == "encoder-extractor" and isinstance(chosen, (int, float)):
        return float(chosen)  # chosen on its calibration rows (compile/extract.py)
    fb = validate_spec(manifest["spec"], "artifact spec").get("low-confidence-fallback-broad")
    spec_t = float(fb.threshold) if fb is not None and fb.threshold is not None else DEFAULT_THRESHOLD
    chosen = ((manifest.get("metrics") or {}).get("selective") or {}).get("threshold")
    if isinstance(chosen, (int, float)) and not isinstance(chosen, bool) and 0.0 <= chosen <= 1.0:
        return max(spec_t, float(chosen))
    return spec_t


def check_fit(store: Store, namespace: str, manifest: dict[str, Any], shape: dict[str, Any]) -> None:
    """Refuse (KolmError, exit 2) a spec that the namespace's recent upstream answers of this shape do not fit:
    a model trained on another task, or the task changed since it was compiled. No traffic of the shape
    (promote --force; shape_seen refuses it otherwise): nothing to contradict, so the promotion stands."""
    import jsonschema

    from kolm_ray.artifact.spec import validate_spec
    from kolm_ray.artifact.verifiers import build, hard_failures
    from kolm_ray.observations.request_shape import matches, shape_of_request

    spec = validate_spec(manifest["spec"], "artifact spec")
    verifiers = build(spec)
    vocab = spec.vocab()
    schema = jsonschema.Draft202012Validator(spec.output_schema) if spec.output_schema else None
    q = _sql(
        store,
        "SELECT input, output, request FROM observations WHERE namespace = ? AND provider <> 'local'"
        " AND verified IS NOT FALSE"
        f" AND {TRAINABLE} ORDER BY seq DESC LIMIT ?",  # IS NOT FALSE: 0/1 or boolean columns alike
    )
    rows = store._read().execute(q, (namespace, FIT_SAMPLE * 5)).fetchall()
    checked, failures = 0, []
    for inp, out, req in rows:
        # SQLite hands back JSON text, psycopg a parsed json column: the same value either way.
        req = json.loads(req) if isinstance(req, str) else req
        if not matches(shape, shape_of_request(req or None)):
            continue
        value = json.loads(out) if isinstance(out, str) and out else out
        if spec.output_kind == "json" and not isinstance(value, (dict, list)):
            failures.append("output is not JSON")
        elif spec.output_kind == "json":
            value = _without_model_fields(value, spec)
            missing = [f for f in vocab if not isinstance(value, dict) or value.get(f) not in vocab[f]]
            invalid = next(iter(schema.iter_errors(value)), None) if schema is not None else None
            bad = hard_failures(verifiers, value, inp)
            if missing:
                failures.append(f"field {missing[0]!r} missing or outside the model's vocabulary")
            elif invalid is not None:
                failures.append(f"schema: {invalid.message}")
            elif bad:
                failures.append(bad[0])
        checked += 1
        if checked >= FIT_SAMPLE:
            break
    if checked and (checked - len(failures)) / checked < FIT_MIN_SHARE:
        raise KolmError(
            f"artifact's spec does not fit namespace {namespace!r}: {len(failures)} of its {checked} recent "
            f"outputs fail it (first: {failures[0]}); compile from this namespace's recipe"
        )


def _without_model_fields(value: Any, spec: Any) -> Any:
    # A tagger answers its own confidence/fallback; the frontier's outputs have no such fields to check.
    from kolm_ray.artifact.spec import CONFIDENCE_FIELD, FALLBACK_FIELD

    if isinstance(value, dict):
        return {
            k: v for k, v in value.items() if k not in (CONFIDENCE_FIELD, FALLBACK_FIELD) or k in spec.vocab()
        }
    return value


def shape_seen(store: Store, namespace: str, shape: dict[str, Any]) -> bool:
    """Whether NS holds at least one observation of `shape` (newest first, a page at a time: a namespace
    that has such traffic usually answers on the first page; one that has none is read to the end once)."""
    from kolm_ray.observations.request_shape import matches, shape_of_request

    before: int | None = None
    while True:
        q = "SELECT seq, request FROM observations WHERE namespace = ?"
        params: tuple = (namespace,)
        if before is not None:
            q, params = q + " AND seq < ?", (namespace, before)
        rows = store._read().execute(_sql(store, q + " ORDER BY seq DESC LIMIT ?"), (*params, SHAPE_PAGE))
        rows = rows.fetchall()
        for _, req in rows:
            req = json.loads(req) if isinstance(req, str) else req  # SQLite: text; psycopg: parsed json
            if matches(shape, shape_of_request(req if isinstance(req, dict) else None)):
                return True
        if len(rows) < SHAPE_PAGE:
            return False
        before = int(rows[-1][0])


def _describe_shape(shape: dict[str, Any]) -> str:
    prompt = str(shape.get("system_prompt") or "")
    parts = [f"key {shape.get('key')}", f"system prompt {prompt[:60]!r}" if prompt else "no system prompt"]
    if shape.get("response_format"):
        parts.append(f"response format {str(shape['response_format'])[:60]!r}")
    return ", ".join(parts)


def promote(
    store: Store,
    artifact: str | Path,
    namespace: str,
    *,
    actor: str | None = None,
    reason: str | None = None,
    force: bool = False,
) -> ModelRow:
    """Verify `artifact` (ArtifactError, exit 4); check NS has traffic of its request shape (KolmError,
    exit 2, unless `force`: then the reason says "forced: ...") and that its spec fits that traffic (exit 2);
    copy it under $KOLM_HOME/models and make it NS's live version. The same file promoted again makes its
    existing version live; otherwise a new version. The row, its history event (actor: default_actor()
    unless given) and the copy appear together or not at all."""
    from kolm_ray.artifact import verify
    from kolm_ray.observations.request_shape import EMPTY_SHAPE, shape_key

    try:
        check_namespace(namespace)
    except ValueError as e:
        raise KolmError(f"--namespace: {e}") from None
    src = Path(artifact)
    if not src.is_file():
        raise KolmError(f"{src}: no such artifact file")
    manifest = verify(src)  # signature + every member hash, bounded (exit 4 on failure)
    digest = _sha256(src)
    shape = dict(manifest.get("request_shape") or EMPTY_SHAPE)
    shape["key"] = shape_key(shape)
    if not shape_seen(store, namespace, shape):
        shown = _describe_shape(shape)
        why = f"namespace {namespace!r} has no observations of the model's request shape ({shown})"
        if not force:
            raise KolmError(
                f"{why}; it would never answer a call there. Capture that traffic first, or pass --force"
            )
        reason = f"forced: {why}" + (f"; {reason}" if reason else "")
    check_fit(store, namespace, manifest, shape)
    metrics = manifest.get("metrics") or {}
    name = str(manifest.get("name") or src.stem)
    existing = [m for m in list_models(store, namespace) if m.sha256 == digest]
    dest_dir = kolm_home() / "models" / namespace
    dest_dir.mkdir(parents=True, exist_ok=True)
    copied: Path | None = None
    if not existing or not Path(existing[0].path).is_file():
        fd, tmp = tempfile.mkstemp(prefix=".promote-", dir=dest_dir)
        os.close(fd)
        shutil.copyfile(src, tmp)
        if _sha256(Path(tmp)) != digest:  # the source changed while we copied it
            os.unlink(tmp)
            raise KolmError(f"{src} changed while it was being promoted; try again")
        copied = Path(tmp)
    now = _now()

    def write(c: Any) -> ModelRow:
        c.execute(_sql(store, "UPDATE models SET live = 0 WHERE namespace = ? AND live = 1"), (namespace,))
        if existing:
            version = existing[0].version
            c.execute(
                _sql(store, "UPDATE models SET live = 1, promoted_at = ?, rolled_back_at = NULL, path = ?"
                            " WHERE namespace = ? AND version = ?"),
                (now, str(final(version)), namespace, version),
            )  # fmt: skip
        else:
            (top,) = c.execute(
                _sql(store, "SELECT COALESCE(MAX(version), 0) FROM models WHERE namespace = ?"), (namespace,)
            ).fetchone()
            version = int(top) + 1
            c.execute(
                _sql(store, f"INSERT INTO models ({_COLS}) VALUES ({', '.join('?' * 13)})"),
                (namespace, version, name, digest, str(final(version)), metrics.get("k_score"),
                 manifest.get("k_floor"), threshold_of(manifest), json.dumps(shape), 1,
                 str(manifest.get("created_at") or now), now, None),
            )  # fmt: skip
        q = _sql(store, f"SELECT {_COLS} FROM models WHERE namespace = ? AND version = ?")
        row = _row(c.execute(q, (namespace, version)).fetchone())
        history.record(c, store, "promote", row, actor, reason, now)
        if copied is not None:
            os.replace(copied, final(version))  # inside the transaction: a failed rename rolls the row back
        return row

    def final(version: int) -> Path:
        return dest_dir / f"{_safe(name)}-v{version}-{digest[:12]}.kolm"

    try:
        return store._write(write)
    finally:
        if copied is not None and copied.exists():
            copied.unlink()


def _safe(name: str) -> str:
    return "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in name)[:80] or "model"


def rollback(
    store: Store, namespace: str, *, actor: str | None = None, reason: str | None = None
) -> ModelRow:
    """Make the previously live version of NS live again (KolmError, exit 2, when there is none); its history
    event names the version made live, `actor` (default_actor() unless given) and `reason`."""

    def write(c: Any) -> ModelRow:
        q = _sql(store, f"SELECT {_COLS} FROM models WHERE namespace = ? ORDER BY promoted_at DESC")
        rows = [_row(r) for r in c.execute(q, (namespace,)).fetchall()]
        live = next((m for m in rows if m.live), None)
        if live is None:
            raise KolmError(f"namespace {namespace!r} has no live model to roll back")
        earlier = next((m for m in rows if not m.live and m.rolled_back_at is None), None)
        if earlier is None:
            raise KolmError(
                f"namespace {namespace!r}: {live.label} is the only version; nothing earlier to roll back to"
            )
        now = _now()
        c.execute(
            _sql(store, "UPDATE models SET live = 0, rolled_back_at = ? WHERE namespace = ? AND version = ?"),
            (now, namespace, live.version),
        )
        c.execute(
            _sql(store, "UPDATE models SET live = 1 WHERE namespace = ? AND version = ?"),
            (namespace, earlier.version),
        )
        row = ModelRow(**{**asdict(earlier), "live": True})
        history.record(c, store, "rollback", row, actor, reason, now)
        return row

    return store._write(write)


def record_shadow(
    store: Store, local_id: str, upstream_id: str | None, namespace: str, version: int, agree: bool | None,
    detail: dict[str, Any],
) -> None:  # fmt: skip
    """Store one shadow check: the local answer, the upstream's (None when that call failed), agreement."""
    store._write(
        lambda c: c.execute(
            _sql(store, "INSERT INTO shadow_pairs (local_id, upstream_id, namespace, version, agree, detail,"
                        " created_at) VALUES (?, ?, ?, ?, ?, ?, ?)"),
            (local_id, upstream_id, namespace, version, None if agree is None else int(agree),
             json.dumps(detail), _now()),
        )
    )  # fmt: skip


def shadow_pairs(store: Store, namespace: str) -> list[dict[str, Any]]:
    """The namespace's shadow checks, oldest first."""
    q = _sql(
        store,
        "SELECT local_id, upstream_id, version, agree, detail, created_at FROM shadow_pairs"
        " WHERE namespace = ? ORDER BY created_at",
    )
    return [
        {"local_id": a, "upstream_id": b, "version": v, "agree": None if g is None else bool(g),
         "detail": json.loads(d), "created_at": t}
        for a, b, v, g, d, t in store._read().execute(q, (namespace,)).fetchall()
    ]  # fmt: skip


def models_command(args: argparse.Namespace) -> int:
    """kolm models promote|list|rollback|history."""
    store = open_store(args.store)
    try:
        if args.action == "promote":
            row = promote(store, args.artifact, args.namespace, reason=args.reason, force=args.force)
            print(f"ok {row.namespace} -> {row.label}")
        elif args.action == "rollback":
            row = rollback(store, args.namespace, reason=args.reason)
            print(f"ok {row.namespace} -> {row.label}")
        elif args.action == "history":
            events = history.history(store, args.namespace)
            if args.json:
                print(json.dumps({"events": [e.public() for e in events]}, indent=2))
            else:
                history.print_history(events)
        else:
            rows = list_models(store, args.namespace)
            if args.json:
                print(json.dumps({"models": [m.public() for m in rows]}, indent=2))
            else:
                print(f"{'namespace':<20} {'model':<32} {'k_score':>7} {'k_floor':>7} {'answered':>8}"
                      f" {'coverage':>8}  live  promoted_at")  # fmt: skip
                for m in rows:
                    k = "-" if m.k_score is None else f"{m.k_score:.3f}"
                    f = "-" if m.k_floor is None else f"{m.k_floor:.3f}"
                    sel = selective_of(m.path)
                    a, c = (
                        ("-" if v is None else f"{v:.3f}")
                        for v in (sel["answered_accuracy"], sel["coverage"])
                    )
                    print(
                        f"{m.namespace:<20} {m.label:<32} {k:>7} {f:>7} {a:>8} {c:>8}  {'*' if m.live else ' ':^4}"
                        f"  {m.promoted_at}"
                    )
        sys.stdout.flush()
    finally:
        store.close()
    return 0
