"""Chaos suite: the real `kolm capture` subprocess against the stand-in upstream, under hostile input,
a locked store, SIGTERM while it is locked, slow-header sockets and a flood of 31 MiB bodies.

Each test counts: every answered good call is stored exactly once (by its unique text), nothing else.
Short settings (retry window, drain, header timeout) come from the KOLM_CAPTURE_* environment.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import signal
import socket
import sqlite3
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import psutil
import pytest

pytestmark = pytest.mark.slow
KEY = "sk-test-" + "c" * 40
FAST = {
    "KOLM_CAPTURE_RETRY_S": "1",
    "KOLM_CAPTURE_DRAIN_S": "2",
    "KOLM_CAPTURE_HEADER_TIMEOUT_S": "2",
    "KOLM_CAPTURE_BODY_TIMEOUT_S": "5",
}


@pytest.fixture(scope="module")
def upstream() -> Iterator[str]:
    """The stand-in upstream in its own process (20 ms per answer): it never shares a GIL with the client."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [
        sys.executable,
        "-m",
        "kolm_ray.demo.simulate",
        "upstream",
        "--port",
        str(port),
        "--latency-ms",
        "20",
    ]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 30
        while True:
            with contextlib.suppress(httpx.TransportError):
                if httpx.get(f"{url}/healthz").status_code == 200:
                    break
            assert proc.poll() is None and time.monotonic() < deadline, "upstream did not come up"
            time.sleep(0.05)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@contextlib.contextmanager
def capture(home: Path, upstream: str, **env: str) -> Iterator[tuple[str, subprocess.Popen, Path]]:
    """A `kolm capture` subprocess on a free port over $home/obs.db; (url, process, db). Killed on exit."""
    db = home / "obs.db"
    full_env = {**os.environ, "KOLM_HOME": str(home), **FAST, **env}
    cmd = [sys.executable, "-m", "kolm_ray.cli", "capture", "--port", "0", "--store", f"sqlite:///{db}"]
    cmd += ["--openai-upstream", upstream, "--anthropic-upstream", upstream]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=full_env)
    try:
        line = proc.stdout.readline()
        match = re.search(r"http://127\.0\.0\.1:(\d+)", line)
        assert match, (line, proc.stderr.read() if proc.poll() is not None else "")
        url = f"http://127.0.0.1:{match.group(1)}"
        deadline = time.monotonic() + 30
        while True:
            with contextlib.suppress(httpx.TransportError):
                if httpx.get(f"{url}/healthz").status_code in (200, 503):
                    break
            assert time.monotonic() < deadline, "proxy did not come up"
            time.sleep(0.05)
        yield url, proc, db
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def stop(proc: subprocess.Popen, within: float = 30.0) -> tuple[float, str]:
    """SIGTERM; (seconds to exit, stdout). Fails if it takes longer than `within` or exits non-zero."""
    t0 = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    rc = proc.wait(timeout=within)
    out = proc.stdout.read()
    assert rc == 0, proc.stderr.read()
    return time.monotonic() - t0, out


def inputs(db: Path) -> list[str]:
    with contextlib.closing(sqlite3.connect(db)) as c:
        return [r[0] for r in c.execute("SELECT input FROM observations ORDER BY seq")]


@contextlib.contextmanager
def write_lock(db: Path) -> Iterator[None]:
    """Another connection's BEGIN IMMEDIATE: every other writer waits (or times out) until released."""
    c = sqlite3.connect(db, isolation_level=None, timeout=30)
    c.execute("BEGIN IMMEDIATE")
    try:
        yield
    finally:
        c.execute("ROLLBACK")
        c.close()


async def good_calls(url: str, tag: str, n: int, spread_s: float = 0.0) -> list[str]:
    """n concurrent OpenAI SDK calls with unique texts; the texts of those answered 200."""
    client = openai.AsyncOpenAI(base_url=f"{url}/v1/capture/openai", api_key=KEY, max_retries=0, timeout=60)

    async def one(i: int) -> str | None:
        await asyncio.sleep(spread_s * i / max(n, 1))
        text = f"{tag} call {i}: how do I restart the ingest worker?"
        try:
            await client.chat.completions.create(model="m", messages=[{"role": "user", "content": text}])
        except openai.APIError:
            return None
        return text

    async with client:
        return [t for t in await asyncio.gather(*(one(i) for i in range(n))) if t is not None]


def wait_health(url: str, status: int, timeout: float = 30.0) -> dict:
    """Poll /healthz until it answers `status` (and, for 200, nothing is pending any more)."""
    deadline = time.monotonic() + timeout
    while True:
        # A 30 s read timeout: while a 31 MiB body is parsed in the writer the GIL (so the loop) is busy.
        r = httpx.get(f"{url}/healthz", timeout=30)
        if r.status_code == status and (status != 200 or r.json()["pending"] == 0):
            return r.json()
        assert time.monotonic() < deadline, (r.status_code, r.text)
        time.sleep(0.1)


def test_poison_requests_cost_no_good_call_its_observation(upstream, tmp_path):
    """Lone surrogate, 5,000-deep nesting and invalid UTF-8 beside 200 good concurrent calls."""
    with capture(tmp_path, upstream) as (url, proc, db):
        endpoint = f"{url}/v1/capture/openai/chat/completions"
        auth = {"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"}
        surrogate = b'{"model": "m", "messages": [{"role": "user", "content": "poison \\ud800 here"}]}'
        deep = b'{"model": "m", "messages": ' + b"[" * 5000 + b"]" * 5000 + b"}"
        bad_utf8 = b'{"model": "m", "messages": [{"role": "user", "content": "\xff\xfe"}]}'

        async def run() -> tuple[list[str], list[httpx.Response]]:
            async with httpx.AsyncClient(timeout=60) as c:
                poison = [c.post(endpoint, content=b, headers=auth) for b in (surrogate, deep, bad_utf8)]
                # A short write stall first, so the poison row lands in one batch with good ones.
                good, *answers = await asyncio.gather(good_calls(url, "poison", 200), *poison)
                return good, answers

        with write_lock(db):
            task = threading.Thread(target=lambda: results.append(asyncio.run(run())))
            results: list = []
            task.start()
            time.sleep(0.6)  # < the 1 s retry window: the writer retries, then writes the batch
        task.join(120)
        good, (r_sur, r_deep, r_utf8) = results[0]
        assert r_sur.status_code == 200
        assert r_deep.status_code == 400 and "deeper than 128" in r_deep.json()["error"]
        assert r_utf8.status_code == 400 and "UTF-8" in r_utf8.json()["error"]
        assert len(good) == 200
        wait_health(url, 200)
        seconds, out = stop(proc)
    stored = inputs(db)
    assert sorted(t for t in stored if t.startswith("poison call")) == sorted(good)  # 0 lost, 0 twice
    assert [t for t in stored if not t.startswith("poison call")] == ["poison \ufffd here"]  # sanitised
    assert "1 sanitised" in out and "0 lost" in out and "0 dead-lettered" in out


def test_write_lock_longer_than_the_retry_window_loses_nothing(upstream, tmp_path):
    with capture(tmp_path, upstream) as (url, proc, db):
        assert httpx.get(f"{url}/healthz").json() == {"ok": True, "store": "sqlite", "pending": 0}
        with write_lock(db):
            answered = asyncio.run(good_calls(url, "locked", 150, spread_s=1.0))
            body = wait_health(url, 503, timeout=15)  # the writer gave up after its 1 s window
            assert body["ok"] is False and "spool" in body["reason"] and str(db) not in json.dumps(body)
            time.sleep(2.0)  # held well past the window, with the traffic spooled
            answered += asyncio.run(good_calls(url, "locked-late", 50))
        body = wait_health(url, 200, timeout=20)  # replayed
        assert body["pending"] == 0
        stop(proc)
    stored = inputs(db)
    assert len(answered) == 200 and sorted(stored) == sorted(answered)
    assert not list((tmp_path / "spool").rglob("*.jsonl"))


def test_sigterm_while_the_store_is_locked_spools_and_the_next_start_replays(upstream, tmp_path):
    with capture(tmp_path, upstream) as (url, proc, db):
        with write_lock(db):
            answered = asyncio.run(good_calls(url, "term", 120, spread_s=0.5))
            _, out = stop(proc, within=30)  # it exits (how fast: benchmarks/failure_timings.py)
            spooled = int(re.search(r"(\d+) in the spool", out).group(1))
            assert spooled > 0 and "0 lost" in out, out
    assert len(answered) == 120
    assert len(inputs(db)) + spooled == 120
    with capture(tmp_path, upstream) as (url, proc, db):
        wait_health(url, 200, timeout=20)
        stop(proc)
    stored = inputs(db)
    assert sorted(stored) == sorted(answered)  # 0 lost, 0 duplicated
    assert not list((tmp_path / "spool").rglob("*.jsonl"))


def test_slow_header_sockets_are_all_closed_within_the_timeout(upstream, tmp_path):
    with capture(tmp_path, upstream) as (url, proc, db):
        port = int(url.rsplit(":", 1)[1])
        socks = []
        t0 = time.monotonic()
        for i in range(300):
            s = socket.create_connection(("127.0.0.1", port))
            s.sendall(b"POST /v1/capture/openai/chat/comp" if i % 2 else b"POST /v1/capture/openai/chat")
            socks.append(s)
        slow_bodies = []
        for _ in range(10):  # whole headers, then a body that stops after 10 of its 100 bytes
            s = socket.create_connection(("127.0.0.1", port))
            s.sendall(
                b"POST /v1/capture/openai/chat/completions HTTP/1.1\r\nHost: x\r\n"
                b"Content-Type: application/json\r\nContent-Length: 100\r\n\r\n" + b'{"model": '
            )
            slow_bodies.append(s)
        answered = asyncio.run(good_calls(url, "slowloris", 30))  # good calls answered meanwhile
        assert len(answered) == 30
        closed_at = []
        for s in socks:
            s.settimeout(max(0.1, t0 + 8 - time.monotonic()))
            data = b""
            with contextlib.suppress(TimeoutError, ConnectionResetError):
                while chunk := s.recv(4096):
                    data += chunk
                closed_at.append(time.monotonic() - t0)
                assert data.startswith(b"HTTP/1.1 408") and b"request headers not received" in data
            s.close()
        assert len(closed_at) == 300, f"{300 - len(closed_at)} sockets still open after 8 s"
        for s in slow_bodies:  # cut by the 5 s body timeout: the server closes them (a recv timeout fails)
            s.settimeout(max(0.1, t0 + 10 - time.monotonic()))
            with contextlib.suppress(ConnectionResetError):
                while s.recv(4096):
                    pass
            s.close()
        stop(proc)
    assert sorted(inputs(db)) == sorted(answered)  # nothing from the cut ones


def test_rss_stays_bounded_under_a_flood_of_31_mib_bodies(upstream, tmp_path):
    """6 bodies of 31 MiB of small JSON objects, 3 at a time: the proxy's RSS stays under 1.5 GiB."""
    # Small objects (the worst case for a parse: ~9x the bytes), in a field the stand-in upstream
    # ignores, so that the upstream's own work does not dominate the test's time.
    filler = [{"kind": "note", "value": f"note {i}", "n": i} for i in range(595_000)]
    messages = [{"role": "user", "content": "flood"}]
    body = json.dumps({"model": "m", "messages": messages, "metadata_list": filler}).encode()
    assert 30 * 2**20 < len(body) < 32 * 2**20
    # The default body timeout (60 s): on a loaded 2-core machine a 31 MiB upload can take seconds.
    with capture(tmp_path, upstream, KOLM_CAPTURE_BODY_TIMEOUT_S="60") as (url, proc, db):
        rss = psutil.Process(proc.pid)
        base = rss.memory_info().rss
        peak = [base]
        done = threading.Event()

        def sample() -> None:
            while not done.is_set():
                peak[0] = max(peak[0], rss.memory_info().rss)
                time.sleep(0.05)

        sampler = threading.Thread(target=sample)
        sampler.start()
        try:

            async def flood() -> list[int]:
                sem = asyncio.Semaphore(3)
                async with httpx.AsyncClient(timeout=240) as c:

                    async def one() -> int:
                        async with sem:
                            r = await c.post(
                                f"{url}/v1/capture/openai/chat/completions",
                                content=body,
                                headers={
                                    "Authorization": f"Bearer {KEY}",
                                    "Content-Type": "application/json",
                                },
                            )
                            return r.status_code

                    return await asyncio.gather(*(one() for _ in range(6)))

            statuses = asyncio.run(flood())
            wait_health(url, 200, timeout=60)
        finally:
            done.set()
            sampler.join()
        # 503: refused at the byte bound before forwarding (not stored); any other answer is stored.
        assert set(statuses) <= {200, 502, 503} and statuses.count(200) >= 3, statuses
        assert peak[0] < 1.5 * 2**30, f"peak RSS {peak[0] / 2**20:.0f} MiB (start {base / 2**20:.0f} MiB)"
        stop(proc, within=60)
        print(
            f"flood: peak RSS {peak[0] / 2**20:.0f} MiB (start {base / 2**20:.0f} MiB), statuses {statuses}"
        )
    assert len(inputs(db)) == len(statuses) - statuses.count(503)


def test_keys_in_text_and_key_fields_are_never_stored(upstream, tmp_path):
    keys = [
        "sk-proj-" + "A1b2" * 10,
        "sk_live_" + "9z" * 12,
        "hf_" + "Q" * 34,
        "ghp_" + "x" * 36,
        "AKIAIOSFODNN7EXAMPLE",
        "ya29." + "t" * 40,
        "Basic dXNlcjpwYXNzd29yZA==",
    ]
    text = "please use my keys " + " and ".join(keys) + " to call the API"
    with capture(tmp_path, upstream) as (url, proc, db):
        client = openai.OpenAI(base_url=f"{url}/v1/capture/openai", api_key=KEY, max_retries=0)
        client.chat.completions.create(
            model="m",
            messages=[{"role": "user", "content": text}],
            metadata={"note": "x"},
            extra_body={"api_keys": ["k1"], "secrets": {"a": "b"}, "pwd": "hunter2", "budget_tokens": 7},
        )
        wait_health(url, 200)
        stop(proc)
    with contextlib.closing(sqlite3.connect(db)) as c:
        row = c.execute("SELECT input, request FROM observations").fetchone()
    stored = row[0] + row[1]
    assert row[0] == "please use my keys " + " and ".join(["[redacted]"] * len(keys)) + " to call the API"
    for secret in [*keys, KEY, "k1", "hunter2", "dXNlcjpwYXNzd29yZA"]:
        assert secret not in stored
    request = json.loads(row[1])
    assert request["budget_tokens"] == 7 and "pwd" not in request and "api_keys" not in request
    assert request["secrets"] == {"a": "b"}  # an object is scrubbed, not dropped (JSON schemas)
