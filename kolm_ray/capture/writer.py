"""The capture proxy's background writer: turn finished exchanges into observations off the hot path.

The request handler only does `writer.submit(exchange)` (a queue put) after the answer is on its
way; one thread builds each Observation (parse, decode, scrub) and inserts them in batches, one
transaction per batch. Where each observation ends up, never dropped with its neighbours:

- the store, normally. A batch that fails on its data is split in halves until only the rows that
  cannot be written fail; each of those is written sanitised (`exchange.sanitize`), or, if even that
  fails, appended to the dead-letter file `$KOLM_HOME/dead-letter.jsonl` (counted, logged, /healthz).
- the spool (`spool.Spool`, on disk, fsync'd per group) when the store keeps failing for longer than
  `retry_window_s` (locked, full, down), or when the in-memory backlog passes `spill_bytes`. While
  the spool holds rows, new batches go behind them (order is kept) and the spool is replayed into the
  store every `replay_interval_s`, idempotently (`append_many(ignore_existing=True)`): exactly once.
- `close(drain_s)` (SIGTERM) drains the queue; past `drain_s`, or as soon as the store fails while
  closing, what is left goes to the spool, which the next start replays.
"""

from __future__ import annotations

import json
import logging
import os
import queue
import threading
import time
from datetime import datetime, timezone
from pathlib import Path

from kolm_ray.capture.exchange import Exchange, sanitize, to_observation
from kolm_ray.capture.spool import Spool, SpoolFull
from kolm_ray.observations.erase import Erasure, dead_letter_lock, erase
from kolm_ray.observations.model import Observation
from kolm_ray.observations.store import Store

__all__ = ["BackgroundWriter", "Exchange", "to_observation"]
log = logging.getLogger("kolm.capture")
# DB-API error classes that are about a row's data, not the store's availability (sqlite3, psycopg).
_DATA_ERROR_NAMES = {"DataError", "IntegrityError"}
_DATA_ERRORS = (UnicodeError, ValueError, TypeError, OverflowError, RecursionError)


def is_data_error(e: BaseException) -> bool:
    """True when an insert failed because of what a row holds (retrying it as-is cannot help)."""
    return isinstance(e, _DATA_ERRORS) or any(c.__name__ in _DATA_ERROR_NAMES for c in type(e).__mro__)


class _Unavailable(Exception):
    def __init__(self, rest: list[Observation], error: BaseException) -> None:
        self.rest, self.error = rest, error


_STOP = object()


class BackgroundWriter:
    """A queue and one thread doing batched inserts. Thread-safe `submit`; `close` drains everything."""

    def __init__(
        self,
        store: Store,
        spool: Spool | None = None,
        dead_letter: Path | None = None,
        *,
        max_batch: int = 500,
        retry_window_s: float = 30.0,
        attempt_timeout_s: float = 2.0,
        max_queued_bytes: int = 512 * 1024 * 1024,
        spill_bytes: int = 128 * 1024 * 1024,
        replay_interval_s: float = 1.0,
    ) -> None:
        """retry_window_s: how long a failing store is retried before batches go to the spool.
        attempt_timeout_s: one insert's wait for the store's lock. max_queued_bytes: `admit` refuses
        new requests past it. spill_bytes: past this backlog, batches go to the spool, not the store."""
        self.store = store
        self.spool = spool
        self.dead_letter = dead_letter
        self.max_batch = max_batch
        self.retry_window_s = retry_window_s
        self.attempt_timeout_s = attempt_timeout_s
        self.max_queued_bytes = max_queued_bytes
        self.spill_bytes = spill_bytes
        self.replay_interval_s = replay_interval_s
        self._q: queue.SimpleQueue = queue.SimpleQueue()
        self._cond = threading.Condition()
        self.submitted = 0
        self.handled = (
            0  # submitted exchanges that reached the store, the spool, the dead letter or were lost
        )
        self.written = 0  # rows inserted (this run's and replayed ones)
        self.replayed = 0
        self.sanitized = 0
        self.dead_lettered = 0
        self.lost = 0  # only when even the spool cannot take them (full disk / over its bound)
        self.queued_bytes = 0
        self.spool_rows = spool.count_rows() if spool is not None else 0
        self.failing: str | None = None  # why the store is not taking writes, while it is not
        self._closed = False
        self._deadline: float | None = None  # set by close(): past it, everything goes to the spool
        self._last_replay = 0.0
        self._thread = threading.Thread(target=self._run, name="kolm-capture-writer", daemon=False)
        self._thread.start()

    # ------------------------------------------------------------ the handler's side

    def admit(self, nbytes: int) -> bool:
        """Whether a request of `nbytes` may be taken now (False: the backlog is at its byte bound)."""
        return self.queued_bytes + nbytes <= self.max_queued_bytes

    def submit(self, ex: Exchange) -> None:
        """Queue an exchange for storage (after close, it is written synchronously: never dropped)."""
        with self._cond:
            self.submitted += 1
            if not self._closed:
                self.queued_bytes += ex.nbytes
                self._q.put(ex)  # under the lock, so it cannot land behind close()'s stop marker
                return
        self._handle([to_observation(ex)], spill=self.spool is not None and self.spool_rows > 0)

    def health(self) -> tuple[bool, str | None]:
        """(ok, reason): not ok while the writer thread is gone, the store fails, the spool holds rows or
        the backlog is too big."""
        if not self._thread.is_alive() and not self._closed:
            return False, "the capture writer thread is not running: answered calls are not being stored"
        if self.failing:
            return False, f"store is failing; observations go to the local spool: {self.failing}"
        if self.spool_rows > 0:
            return False, f"catching up: {self.spool_rows} observations in the local spool"
        if self.queued_bytes > self.spill_bytes:
            return False, f"backlog of {self.queued_bytes} bytes is past its bound of {self.spill_bytes}"
        return True, None

    @property
    def pending(self) -> int:
        """Observations answered but not in the store yet (queued in memory or in the spool)."""
        return self.submitted - self.handled + self.spool_rows

    def flush(self, timeout: float = 10.0) -> bool:
        """Wait until everything submitted before this call is handled (stored, or spooled); False on timeout."""
        with self._cond:
            target = self.submitted
            return self._cond.wait_for(lambda: self.handled >= target, timeout=timeout)

    # ------------------------------------------------------------ the writer thread

    def _run(self) -> None:
        while True:
            try:
                if self._step():
                    return
            except Exception:  # never let the writer thread die of anything: log it and take the next batch
                log.exception("capture writer: unexpected failure")
                if self._closed and self._q.empty():  # the stop marker may have gone with the failed batch
                    return
                time.sleep(0.05)

    def _observation(self, ex: Exchange) -> Observation | None:
        """to_observation, protected: an exchange that cannot even become a failure row is dead-lettered."""
        try:
            return to_observation(ex)
        except Exception as e:
            log.exception("capture writer: an exchange could not be turned into an observation")
            self.dead_lettered += 1
            self._dead_letter_raw(ex, e)
            return None

    def _step(self) -> bool:
        """One batch (or one idle wake-up); True once the stop marker has been handled."""
        wait = self.replay_interval_s if self.spool_rows or self.failing else None
        try:
            item = self._q.get(timeout=wait)
        except queue.Empty:
            item = None
        stop = item is _STOP
        batch = [] if item is None or stop else [item]
        while not stop and len(batch) < self.max_batch:
            try:
                nxt = self._q.get_nowait()
            except queue.Empty:
                break
            if nxt is _STOP:
                stop = True
            else:
                batch.append(nxt)
        if batch:
            observations, unbuildable = [], 0
            for ex in batch:
                time.sleep(0)  # give the event loop the GIL between items (5 ms switch interval)
                obs = self._observation(ex)
                if obs is None:
                    unbuildable += 1
                else:
                    observations.append(obs)
            with self._cond:
                self.queued_bytes -= sum(ex.nbytes for ex in batch)
            if unbuildable:
                self._count(0, False, dead=unbuildable)
            spill = self.queued_bytes > self.spill_bytes or bool(self.spool_rows) or self._past_deadline()
            try:
                self._handle(observations, spill=spill)
            except Exception as e:  # never let the writer thread die: what is left is dead-lettered
                log.exception("capture writer: unexpected failure on a batch")
                for o in observations:
                    self._dead_letter(o, e)
                self._count(0, False, dead=len(observations))
        if self.spool_rows and time.monotonic() - self._last_replay >= self.replay_interval_s:
            self._replay()
        if stop:
            if self.spool_rows and not self._past_deadline():
                self._replay()
            if self.spool is not None:
                self.spool.seal()
            return True
        return False

    def _past_deadline(self) -> bool:
        return self._deadline is not None and time.monotonic() >= self._deadline

    def _done(self, n_handled: int, n_written: int = 0) -> None:
        with self._cond:
            self.handled += n_handled
            self.written += n_written
            self._cond.notify_all()

    def _handle(self, observations: list[Observation], spill: bool) -> None:
        """Store a batch (retrying within the window), else spool it; count each row exactly once."""
        if spill and self.spool is not None:
            self._to_spool(observations)
            return
        give_up = time.monotonic() + self.retry_window_s
        delay = 0.05
        rest = observations
        while rest:
            try:
                self._insert(rest, replay=False)
                rest = []
            except _Unavailable as e:
                rest = e.rest
                if time.monotonic() >= give_up or self._closed or self.spool is None:
                    self.failing = f"{type(e.error).__name__}: {e.error}"
                    log.error("store failing (%s): %d observations go to the spool", self.failing, len(rest))
                    self._to_spool(rest)
                    return
                time.sleep(delay)
                delay = min(delay * 2, 1.0)
        self.failing = None

    def _count(self, stored: int, replay: bool, dead: int = 0) -> None:
        with self._cond:
            self.written += stored
            if replay:
                self.replayed += stored
            else:
                self.handled += stored + dead  # a replayed row was handled when it was spooled
            self._cond.notify_all()

    def _insert(self, observations: list[Observation], replay: bool) -> None:
        """Insert with poison isolation: bisect on a data error, sanitise, then dead-letter a single row.

        Raises _Unavailable(rows not yet written, in order) when the store itself fails."""
        stack: list[tuple[list[Observation], bool]] = [(observations, False)]
        while stack:
            chunk, sanitized = stack.pop()
            try:
                self.store.append_many(chunk, ignore_existing=True, timeout_s=self.attempt_timeout_s)
            except Exception as e:
                if not is_data_error(e):
                    rest = list(chunk) + [o for c, _ in reversed(stack) for o in c]
                    raise _Unavailable(rest, e) from None
                if len(chunk) > 1:
                    mid = len(chunk) // 2
                    stack.append((chunk[mid:], sanitized))
                    stack.append((chunk[:mid], sanitized))
                elif not sanitized:
                    try:
                        clean = sanitize(chunk[0])
                    except Exception as e2:
                        self._dead_letter(chunk[0], e2)
                        self._count(0, replay, dead=1)
                        continue
                    log.warning("observation %s stored sanitised: %s: %s", chunk[0].id, type(e).__name__, e)
                    stack.append(([clean], True))
                else:
                    self._dead_letter(chunk[0], e)
                    self._count(0, replay, dead=1)
                continue
            if sanitized:
                self.sanitized += 1
            self._count(len(chunk), replay)

    def _dead_letter(self, obs: Observation, error: BaseException) -> None:
        """The last resort for a row no store takes even sanitised: one JSON line, ASCII-escaped."""
        self.dead_lettered += 1
        log.error("observation %s could not be stored even sanitised (%s): dead-lettered", obs.id, error)
        if self.dead_letter is None:
            with self._cond:
                self.lost += 1
            return
        try:
            fields = obs.model_dump(mode="python")
            line = json.dumps(
                {
                    "at": datetime.now(timezone.utc).isoformat(),
                    "error": str(error)[:500],
                    "observation": fields,
                },
                default=str,
            )
        except Exception:  # even the dump fails (e.g. pathological nesting): keep what identifies it
            line = json.dumps({"error": str(error)[:500], "id": obs.id, "namespace": obs.namespace})
        with dead_letter_lock(self.dead_letter):  # a delete (observations/erase.py) rewrites it under this
            fd = os.open(
                self.dead_letter, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600
            )  # prompts: owner only
            try:
                os.write(fd, (line + "\n").encode("ascii"))
                os.fsync(fd)
            finally:
                os.close(fd)

    def _dead_letter_raw(self, ex: Exchange, error: BaseException) -> None:
        """The dead letter for an exchange that is not even an observation: what identifies it, ASCII JSON."""
        if self.dead_letter is None:
            with self._cond:
                self.lost += 1
            return
        try:
            line = json.dumps(
                {
                    "at": datetime.now(timezone.utc).isoformat(),
                    "error": f"{type(error).__name__}: {error}"[:500],
                    "exchange": {
                        "provider": str(ex.provider)[:32], "namespace": str(ex.namespace)[:128],
                        "tenant": str(ex.tenant)[:256], "status": str(ex.status)[:16],
                        "key_id": str(ex.key_id)[:64],
                        "request_body": bytes(ex.request_body[:10000]).decode("utf-8", "replace"),
                    },
                }
            )  # fmt: skip
            self.dead_letter.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.dead_letter, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
            try:
                os.write(fd, (line + "\n").encode("ascii"))
            finally:
                os.close(fd)
        except Exception:
            with self._cond:
                self.lost += 1

    def _to_spool(self, observations: list[Observation]) -> None:
        if not observations:
            return
        if self.spool is None:
            log.error("lost %d observations: no spool configured", len(observations))
            with self._cond:
                self.lost += len(observations)
            self._done(len(observations))
            return
        try:
            self.spool.append(observations)
        except SpoolFull as e:
            log.error("lost %d observations: %s", len(observations), e)
            self.failing = str(e)
            with self._cond:
                self.lost += len(observations)
            self._done(len(observations))
            return
        with self._cond:
            self.spool_rows += len(observations)
        self._done(len(observations))

    def _replay(self) -> None:
        """Move spooled rows into the store, oldest segment first, until the store fails again."""
        assert self.spool is not None
        self._last_replay = time.monotonic()
        self.spool.seal()  # the segment being written becomes replayable
        for path, rows in self.spool.segments():
            try:
                self._insert(rows, replay=True)
            except _Unavailable as e:
                self.failing = f"{type(e.error).__name__}: {e.error}"
                return
            self.spool.ack(path)
            with self._cond:
                self.spool_rows = max(0, self.spool_rows - len(rows))
            if self._past_deadline():
                return
        self.failing = None
        if self.spool.pending_bytes() == 0:
            with self._cond:
                self.spool_rows = 0
            log.info("spool replayed: the store has every observation again")

    def erase(self, erasure: Erasure, home: Path) -> dict[str, int]:
        """Delete what `erasure` matches everywhere this writer puts rows (observations/erase.py).

        What was answered before the call is stored or spooled first (flush), so it is caught too."""
        self.flush(timeout=10.0)
        in_spool_before = self.spool_rows
        result = erase(self.store, erasure, home, spool=self.spool)
        if self.spool is not None:
            with self._cond:  # the rows dropped from the spool will never be replayed
                self.spool_rows = min(in_spool_before, self.spool.count_rows())
        return result

    def close(self, drain_s: float | None = None) -> None:
        """Stop taking queued work; drain what is queued (to the store, or the spool past `drain_s`)."""
        with self._cond:
            if not self._closed:
                self._closed = True
                if drain_s is not None:
                    self._deadline = time.monotonic() + drain_s
                self._q.put(_STOP)
        self._thread.join()
