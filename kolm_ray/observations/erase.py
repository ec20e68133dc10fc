"""Deleting observations on request (an erasure request, a leaked secret): the store, the spool, dead letters.

    erasure = Erasure.parse("support", tenant="acme", before="2026-12-01", matching="jane.doe@example.com")
    erase(store, erasure, kolm_home())       # -> {"deleted": n}

What `kolm observations delete` and `DELETE /v1/bridges/observations` run. A row matches when it is in
the namespace, and (each only when given) of the tenant, created strictly before the time, and holding
the text in its input, output or request (ASCII letters compared case-insensitively, the same way in
SQLite, PostgreSQL and the files). Three places hold rows, done in this order so that a row moving
between them while the delete runs is still caught:

1. the capture spool (`$KOLM_HOME/spool/<store hash>/*.jsonl`): each segment is rewritten (a side file,
   fsync, rename) while holding its flock, the lock the capture writer's replay takes;
2. the dead-letter file (`$KOLM_HOME/dead-letter.jsonl`), rewritten under `dead-letter.lock`, the lock
   the writer takes to append to it;
3. the store: its rows and their shadow pairs (the local/upstream answer pairs of `kolm models`), in one
   transaction (all or none).
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import date, datetime, timezone
from pathlib import Path
from typing import Any

from kolm_ray.observations.model import check_namespace

DEAD_LETTER = "dead-letter.jsonl"
LOCK_TIMEOUT_S = 10.0  # a spool segment is sealed by its writer within ~1 s while the store is up
_LOWER = str.maketrans("ABCDEFGHIJKLMNOPQRSTUVWXYZ", "abcdefghijklmnopqrstuvwxyz")
_UPPER = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"


def spool_dir(home: Path, store_url: str) -> Path:
    """The spool directory for one store: a store URL's hash (never its text: it may hold a password)."""
    digest = hashlib.sha256(store_url.encode()).hexdigest()[:16]
    return home / "spool" / digest


def dead_letter_path(home: Path) -> Path:
    """Where the capture writer puts rows that no store takes even sanitised."""
    return home / DEAD_LETTER


@contextlib.contextmanager
def dead_letter_lock(path: Path) -> Iterator[None]:
    """The dead-letter file's lock (a side file, so that a rewrite's rename never strands a waiter)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path.with_suffix(".lock"), os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def _json_text(value: Any) -> str:
    """A JSON value as the store keeps it (compact, non-ASCII kept): what `matching` is compared with."""
    return json.dumps(value, ensure_ascii=False, separators=(",", ":"))


def parse_before(text: str) -> datetime:
    """An ISO date (`2026-12-01`: midnight UTC) or date-time (no zone: UTC) as an aware datetime."""
    try:
        if len(text) == 10:
            d = date.fromisoformat(text)
            return datetime(d.year, d.month, d.day, tzinfo=timezone.utc)
        value = datetime.fromisoformat(text.replace("Z", "+00:00") if text.endswith("Z") else text)
    except ValueError:
        raise ValueError(
            f"{text[:40]!r} is not an ISO date: use YYYY-MM-DD or YYYY-MM-DDTHH:MM[:SS][+HH:MM]"
        ) from None
    return value if value.tzinfo else value.replace(tzinfo=timezone.utc)


@dataclass(frozen=True)
class Erasure:
    """Which observations to delete: all of a namespace's, narrowed by each filter that is given."""

    namespace: str
    tenant: str | None = None
    before: datetime | None = None
    """Rows created strictly before this (UTC)."""
    matching: str | None = None
    """Rows holding this text in input, output or request (ASCII letters in either case)."""

    @classmethod
    def parse(
        cls,
        namespace: str | None,
        tenant: str | None = None,
        before: str | None = None,
        matching: str | None = None,
    ) -> Erasure:
        """From user input; ValueError naming the field when one is bad (every caller answers 400 / exit 2)."""
        if not namespace:
            raise ValueError("namespace is required (a delete never spans every namespace)")
        try:
            check_namespace(namespace)
        except ValueError as e:
            raise ValueError(f"namespace: {e}") from None
        if tenant is not None and not (0 < len(tenant) <= 256):
            raise ValueError("tenant: must be 1-256 characters")
        when = None
        if before is not None:
            try:
                when = parse_before(before)
            except ValueError as e:
                raise ValueError(f"before: {e}") from None
        if matching is not None and not matching.strip():
            raise ValueError("matching: must not be empty (it would match every row)")
        if matching is not None and len(matching) > 1000:
            raise ValueError("matching: at most 1000 characters")
        if matching is not None and ("\x00" in matching or any("\ud800" <= c <= "\udfff" for c in matching)):
            raise ValueError("matching: holds a character no store keeps (NUL or a lone surrogate)")
        return cls(namespace, tenant, when, matching)

    def needles(self) -> list[str]:
        """`matching` lower-cased (ASCII), as typed and as it appears inside JSON text (escaped)."""
        assert self.matching is not None
        raw = self.matching.translate(_LOWER)
        escaped = _json_text(raw)[1:-1]
        return [raw] if escaped == raw else [raw, escaped]

    def where(self, dialect: str) -> tuple[str, list[Any]]:
        """The SQL condition (and its parameters) for this store dialect's `observations` table."""
        ph = "%s" if dialect == "postgresql" else "?"
        where, params = f"namespace = {ph}", [self.namespace]
        if self.tenant is not None:
            where += f" AND tenant = {ph}"
            params.append(self.tenant)
        if self.before is not None:
            where += f" AND created_at < {ph}"
            at = self.before.astimezone(timezone.utc)
            params.append(at if dialect == "postgresql" else at.isoformat())
        if self.matching is not None:
            if dialect == "postgresql":  # translate, not lower(): ASCII only, as SQLite's lower() is
                cols = [f"translate({c}, '{_UPPER}', '{_UPPER.lower()}')" for c in _PG_TEXT]
                hit = "strpos({col}, %s) > 0"
            else:
                cols = [f"lower({c})" for c in _SQLITE_TEXT]
                hit = "instr({col}, ?) > 0"
            ors = [hit.format(col=c) for c in cols for _ in self.needles()]
            params.extend(n for _ in cols for n in self.needles())
            where += " AND (" + " OR ".join(ors) + ")"
        return where, params

    def matches(self, row: dict[str, Any]) -> bool:
        """Whether an observation's fields (a spooled or dead-lettered row, parsed) match, as `where` would."""
        if row.get("namespace") != self.namespace:
            return False
        if self.tenant is not None and row.get("tenant") != self.tenant:
            return False
        if self.before is not None:
            try:
                created = parse_before(str(row.get("created_at")).replace(" ", "T"))
            except ValueError:
                return False
            if not created < self.before:
                return False
        if self.matching is not None:
            texts = [
                str(row.get("input") or "").translate(_LOWER),
                _json_text(row.get("output")).translate(_LOWER),
                _json_text(row.get("request")).translate(_LOWER),
            ]
            return any(n in t for n in self.needles() for t in texts)
        return True


_SQLITE_TEXT = ("input", "COALESCE(output, '')", "COALESCE(request, '')")
_PG_TEXT = ("input", "COALESCE(output::text, '')", "COALESCE(request::text, '')")


# ---------------------------------------------------------------- the files: spool segments, dead letters


def _rewrite(path: Path, keep: Callable[[bytes], bool]) -> int:
    """Drop the lines `keep` refuses, atomically (side file, fsync, rename); how many were dropped.

    The caller holds the file's lock. A torn last line (no newline) is judged like the others."""
    raw = path.read_bytes()
    lines = raw.split(b"\n")
    tail = lines.pop()  # b"" after a final newline; else a torn last line
    kept = [ln for ln in lines if keep(ln)]
    kept_tail = tail if tail and keep(tail) else b""
    dropped = len(lines) - len(kept) + (1 if tail and not kept_tail else 0)
    if not dropped:
        return 0
    data = b"".join(ln + b"\n" for ln in kept) + kept_tail
    if not data.strip():
        path.unlink(missing_ok=True)
    else:
        tmp = path.with_name(f".{path.name}.erase-tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view) :]
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    dfd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)
    return dropped


def _line_keeper(erasure: Erasure, unwrap: Callable[[dict], dict | None]) -> Callable[[bytes], bool]:
    def keep(line: bytes) -> bool:
        if not line.strip():
            return False
        try:
            value = json.loads(line)
        except ValueError:  # a torn line: drop it when it could be one of these rows
            return erasure.namespace.encode() not in line
        row = unwrap(value) if isinstance(value, dict) else None
        return row is None or not erasure.matches(row)

    return keep


def _lock_segment(path: Path, deadline: float) -> int | None:
    """An fd holding the segment's flock (None when the segment is gone); TimeoutError past the deadline."""
    while True:
        try:
            fd = os.open(path, os.O_RDONLY)
        except FileNotFoundError:
            return None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            if time.monotonic() >= deadline:
                raise TimeoutError(
                    f"spool segment {path.name} stayed locked by a capture process for {LOCK_TIMEOUT_S:.0f} s;"
                    " nothing was deleted: retry"
                ) from None
            time.sleep(0.05)
            continue
        try:
            if os.fstat(fd).st_ino == os.stat(path).st_ino:
                return fd
        except FileNotFoundError:
            pass
        os.close(fd)  # replayed and deleted (or rewritten) while we waited: look again
        if not path.exists():
            return None


def erase_spool(directory: Path, erasure: Erasure, timeout_s: float = LOCK_TIMEOUT_S) -> int:
    """Drop the matching rows from every spool segment under `directory`; how many were dropped."""
    if not directory.is_dir():
        return 0
    deadline = time.monotonic() + timeout_s
    dropped = 0
    keep = _line_keeper(erasure, lambda row: row)
    for path in sorted(directory.glob("*.jsonl")):
        fd = _lock_segment(path, deadline)
        if fd is None:
            continue
        try:
            dropped += _rewrite(path, keep)
        finally:
            os.close(fd)
    return dropped


def _dead_row(value: dict) -> dict | None:
    if isinstance(value.get("observation"), dict):
        return value["observation"]
    return {"namespace": value.get("namespace"), "id": value.get("id")}  # a row that could not be dumped


def erase_dead_letters(path: Path, erasure: Erasure) -> int:
    """Drop the matching rows from the dead-letter file; how many were dropped.

    A line that kept only the row's id and namespace (its fields could not be dumped) matches on the
    namespace alone, holding no text that another filter could look at."""
    if not path.exists():
        return 0
    keep = _line_keeper(erasure, _dead_row)
    with dead_letter_lock(path):
        if not path.exists():
            return 0
        return _rewrite(path, keep)


def erase(store: Any, erasure: Erasure, home: Path, spool: Any = None) -> dict[str, int]:
    """Delete what `erasure` matches from the spool, the dead letters and the store: {"deleted": n}.

    `spool`: the running proxy's own Spool (its in-process lock is held and its open segment sealed);
    None: the spool directory of `store` under `home`, by its files' locks only (another process's proxy).
    """
    if spool is not None:
        in_spool = spool.erase(erasure)
    else:
        in_spool = erase_spool(spool_dir(home, store.url), erasure)
    dead = erase_dead_letters(dead_letter_path(home), erasure)
    return {"deleted": store.delete(erasure) + in_spool + dead}
