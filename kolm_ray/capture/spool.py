"""The capture writer's durable local spool: where observations wait while the store cannot take them.

    spool = Spool(kolm_home() / "spool", store.url, max_bytes=1 << 30)
    spool.append([obs, ...])            # one write + one fsync for the group; SpoolFull past max_bytes
    for path, batch in spool.segments(): store.append_many(batch, ignore_existing=True); spool.ack(path)

Plain append-only JSON lines, one file per segment, chosen over persist-queue and diskcache: the
spool needs exactly "append a group durably, read back in order, delete what was stored", which is
~100 lines here, with no second database on the disk that may be the one that is full, no pickle
(persist-queue's default serialiser) of rows that came from clients, and files an operator can read,
or feed to `kolm observations import`, by hand. Durability: each group is one write() and one fsync
(plus the directory's fsync when a segment is created), so a crash keeps every group appended before
it; a torn last line (power loss mid-write) is skipped on replay. Replay is exactly once because the
store insert is idempotent on the observation id (`append_many(ignore_existing=True)`): a segment
replayed again after a crash between the store's commit and the segment's deletion adds nothing.

Segments are named `<ns since epoch>-<pid>-<n>.jsonl`, so several processes on one store (capture
--workers) share the directory: each holds an flock on the segment it writes, and replay only takes
segments it can lock, oldest first.
"""

from __future__ import annotations

import fcntl
import logging
import os
import threading
import time
from collections.abc import Iterator
from pathlib import Path

from kolm_ray.observations.erase import Erasure, erase_spool, spool_dir
from kolm_ray.observations.model import Observation

__all__ = ["Spool", "SpoolFull", "spool_dir"]

log = logging.getLogger("kolm.capture")
SEGMENT_BYTES = 16 * 1024 * 1024  # a new segment past this: replayed (and deleted) piece by piece


def _line(obs: Observation) -> str:
    try:
        return obs.model_dump_json() + "\n"
    except ValueError:  # a lone surrogate has no UTF-8 form: spool it sanitised, as the store would get it
        from kolm_ray.capture.exchange import sanitize

        return sanitize(obs).model_dump_json() + "\n"


class SpoolFull(OSError):
    """The spool is at its size bound (or its disk is full): the caller must count these as lost."""


class Spool:
    """Size-bounded, fsync'd, ordered JSON-lines segments under `directory`. Thread-safe."""

    def __init__(self, directory: Path, max_bytes: int = 1 << 30) -> None:
        self.dir = Path(directory)
        self.dir.parent.mkdir(parents=True, exist_ok=True, mode=0o700)  # spooled prompts: owner only
        self.dir.mkdir(exist_ok=True, mode=0o700)
        self.max_bytes = max_bytes
        self._lock = threading.Lock()
        self._fd: int | None = None
        self._path: Path | None = None
        self._size = 0  # bytes in the open segment
        self._n = 0

    def _total(self) -> int:
        return sum(p.stat().st_size for p in self.dir.glob("*.jsonl") if p.exists())

    def pending_bytes(self) -> int:
        """Bytes waiting in the spool (every segment, this process's and others')."""
        try:
            return self._total()
        except OSError:
            return 0

    def count_rows(self) -> int:
        """Rows waiting in the spool (read once at start-up: the writer counts from there)."""
        n = 0
        for path in self.dir.glob("*.jsonl"):
            try:
                with open(path, "rb") as f:
                    while block := f.read(1 << 20):
                        n += block.count(b"\n")
            except FileNotFoundError:
                continue
        return n

    def _open_segment(self) -> None:
        self._n += 1
        path = self.dir / f"{time.time_ns():020d}-{os.getpid()}-{self._n:06d}.jsonl"
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_APPEND, 0o600)
        fcntl.flock(fd, fcntl.LOCK_EX)  # replay (here or in another process) skips a segment in use
        dfd = os.open(self.dir, os.O_RDONLY)
        try:
            os.fsync(dfd)  # the new name survives a crash too
        finally:
            os.close(dfd)
        self._fd, self._path, self._size = fd, path, 0

    def _close_segment(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # releases the flock: the segment can now be replayed
            self._fd = self._path = None

    def append(self, observations: list[Observation]) -> None:
        """Append a group durably (one write, one fsync). SpoolFull when over max_bytes or out of disk."""
        if not observations:
            return
        data = "".join(_line(o) for o in observations).encode("utf-8")
        with self._lock:
            total = self._total()
            if total + len(data) > self.max_bytes:
                raise SpoolFull(
                    f"capture spool {self.dir} is full ({total} of {self.max_bytes} bytes): "
                    "the store has been failing too long; fix it or raise KOLM_SPOOL_MAX_BYTES"
                )
            if self._fd is None or self._size + len(data) > SEGMENT_BYTES:
                self._close_segment()
                self._open_segment()
            assert self._fd is not None
            try:
                view = memoryview(data)
                while view:
                    view = view[os.write(self._fd, view) :]
                os.fsync(self._fd)
            except OSError as e:  # ENOSPC and friends: the group may be half there; a new segment next time
                self._close_segment()
                raise SpoolFull(f"capture spool {self.dir}: cannot write ({e.strerror or e})") from None
            self._size += len(data)

    def seal(self) -> None:
        """Close the segment being written, so that replay can take it."""
        with self._lock:
            self._close_segment()

    def segments(self) -> Iterator[tuple[Path, list[Observation]]]:
        """(path, observations) for each sealed segment, oldest first; the lock is held until ack()."""
        for path in sorted(self.dir.glob("*.jsonl")):
            if path == self._path:
                continue
            try:
                fd = os.open(path, os.O_RDONLY)
            except FileNotFoundError:  # replayed by another process meanwhile
                continue
            try:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    continue  # being written or replayed elsewhere
                if not path.exists():
                    continue
                with os.fdopen(os.dup(fd), "rb") as f:
                    raw = f.read()
                yield path, self._parse(path, raw)
            finally:
                os.close(fd)

    def _parse(self, path: Path, raw: bytes) -> list[Observation]:
        out = []
        lines = raw.split(b"\n")
        if lines and lines[-1]:  # no final newline: a group torn by a crash mid-write
            log.warning("spool %s: skipping a torn last line (%d bytes)", path.name, len(lines[-1]))
        for line in lines[:-1]:
            if line.strip():
                out.append(Observation.model_validate_json(line.decode("utf-8", "replace")))
        return out

    def erase(self, erasure: Erasure) -> int:
        """Drop the rows `erasure` matches from every segment (observations/erase.py); how many.

        Holds this spool's lock (no append meanwhile) and seals the open segment first, so every
        segment is rewritten under its flock, the lock a replay takes."""
        with self._lock:
            self._close_segment()
            return erase_spool(self.dir, erasure)

    def ack(self, path: Path) -> None:
        """The segment's rows are in the store: delete it."""
        path.unlink(missing_ok=True)

    def close(self) -> None:
        self.seal()
