"""`kolm capture --workers 2` on a PostgreSQL store: one port, two processes, SIGTERM drains both
(answered == stored, no duplicates), /healthz answers for its own process, a bad store URL is exit 2,
a database restarted mid-traffic loses and duplicates nothing."""

from __future__ import annotations

import asyncio
import os
import re
import signal
import subprocess
import sys
import time

import httpx
import pytest

from kolm_ray.demo.simulate import start_upstream_in_thread
from kolm_ray.observations.store import open_store

pytestmark = pytest.mark.slow


def _start(store_url: str, upstream: str, workers: int, tmp_path) -> tuple[subprocess.Popen, str]:
    env = {**os.environ, "KOLM_HOME": str(tmp_path), "KOLM_STORE": store_url}  # the URL never on argv
    cmd = [sys.executable, "-m", "kolm_ray.cli", "capture", "--port", "0", "--workers", str(workers)]
    cmd += ["--openai-upstream", upstream, "--anthropic-upstream", upstream]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    line = proc.stdout.readline()
    m = re.search(r"http://127\.0\.0\.1:(\d+)", line)
    assert m, (line, proc.stderr.read() if proc.poll() is not None else "")
    return proc, f"http://127.0.0.1:{m.group(1)}"


def test_two_workers_one_port_sigterm_drains_both(pg_url, tmp_path):
    up_url, stop_up = start_upstream_in_thread(latency_ms=120, chunk_delay_ms=10)
    proc, url = _start(pg_url, up_url, 2, tmp_path)
    try:
        pids, deadline = set(), time.monotonic() + 30
        while len(pids) < 2:  # a new connection each time: the kernel spreads them over both workers
            assert time.monotonic() < deadline, f"only workers {pids} answered"
            try:
                h = httpx.get(f"{url}/healthz", headers={"Connection": "close"}).json()
                pids.add(h["pid"])
                assert h["worker"] in ("0/2", "1/2") and h["store"] == "postgresql"
            except httpx.TransportError:
                time.sleep(0.1)

        answered = 0

        async def load() -> list[int | None]:
            nonlocal answered
            started = finished = 0
            in_flight = -1
            limits = httpx.Limits(max_connections=200, max_keepalive_connections=0)  # spread over workers
            async with httpx.AsyncClient(base_url=url, timeout=60, limits=limits) as c:

                async def one(i: int) -> int | None:
                    nonlocal started, finished, answered
                    await asyncio.sleep(i * 0.005)
                    started += 1
                    try:
                        r = await c.post(
                            "/v1/capture/openai/chat/completions",
                            json={"model": "m", "messages": [{"role": "user", "content": f"q{i}"}]},
                            headers={"Authorization": "Bearer k", "X-Kolm-Namespace": "w2"},
                        )
                        status = r.status_code
                    except httpx.HTTPError:
                        status = None
                    finished += 1
                    answered += status == 200
                    return status

                async def term() -> None:
                    nonlocal in_flight
                    while answered < 30:
                        await asyncio.sleep(0.01)
                    in_flight = started - finished
                    proc.send_signal(signal.SIGTERM)

                results, _ = await asyncio.gather(asyncio.gather(*(one(i) for i in range(400))), term())
                assert in_flight > 0
                return results

        results = asyncio.run(load())
        rc = proc.wait(timeout=150)
        out = proc.stdout.read()
        assert rc == 0, proc.stderr.read()
        ok = [i for i, s in enumerate(results) if s == 200]
        assert len(ok) + sum(s is None for s in results) == len(results)
        with open_store(pg_url) as s:
            stored = [o.input for batch in s.iter_observations("w2") for o in batch]
        assert len(stored) == len(set(stored)) == len(ok)  # answered == stored, none twice
        assert sorted(stored) == sorted(f"q{i}" for i in ok)
        assert f"{len(ok)} observations stored, 0 lost" in out
        for pid in pids:  # both workers are gone
            assert (
                not os.path.exists(f"/proc/{pid}") or "zombie" in open(f"/proc/{pid}/status").read().lower()
            )
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        stop_up()


def test_capture_with_a_wrong_password_is_exit_2_in_one_line(pg_server, tmp_path):
    bad = pg_server.url.replace(pg_server.password, "Wr0ngPassw0rd")
    t0 = time.monotonic()
    for workers in ("1", "2"):
        done = subprocess.run(
            [
                sys.executable,
                "-m",
                "kolm_ray.cli",
                "capture",
                "--port",
                "0",
                "--workers",
                workers,
                "--store",
                bad,
            ],
            capture_output=True,
            text=True,
            timeout=60,
            env={**os.environ, "KOLM_HOME": str(tmp_path)},
        )
        assert done.returncode == 2 and done.stdout == ""
        assert done.stderr.count("\n") == 1 and "password authentication failed" in done.stderr
        assert "Wr0ngPassw0rd" not in done.stderr and "Traceback" not in done.stderr
    assert time.monotonic() - t0 < 30  # interpreter start-up twice; the connect itself fails at once


def test_postgres_restarted_mid_traffic_loses_and_duplicates_nothing(tmp_path):
    """The database goes away for a moment under `--workers 2`: every answered call ends up stored once.

    Today the writer's retries (with backoff) outlast a fast restart here; the capture spool (replayed
    with `append_many(ignore_existing=True)`) is what makes a longer outage lossless as well."""
    from kolm_ray.observations.store.localpg import LocalPostgres

    pg = LocalPostgres(durable=True)  # its own server: this test restarts it
    up_url, stop_up = start_upstream_in_thread(latency_ms=20)
    proc = None
    try:
        pg.start()
        proc, url = _start(pg.url, up_url, 2, tmp_path)
        wait = time.monotonic() + 30
        while True:
            try:
                if httpx.get(f"{url}/healthz").status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < wait
            time.sleep(0.1)
        answered: list[str] = []
        answered_at: list[float] = []
        outage: list[float] = []

        async def load(tag: str, n: int) -> None:
            limits = httpx.Limits(max_connections=20, max_keepalive_connections=0)
            async with httpx.AsyncClient(base_url=url, timeout=60, limits=limits) as c:

                async def one(i: int) -> None:
                    await asyncio.sleep(i * 0.01)
                    q = f"{tag}-{i}"
                    r = await c.post(
                        "/v1/capture/openai/chat/completions",
                        json={"model": "m", "messages": [{"role": "user", "content": q}]},
                        headers={"Authorization": "Bearer k", "X-Kolm-Namespace": "restart"},
                    )
                    if r.status_code == 200:
                        answered.append(q)
                        answered_at.append(time.monotonic())

                await asyncio.gather(*(one(i) for i in range(n)))

        async def traffic_with_restart() -> None:
            task = asyncio.create_task(load("during", 300))  # ~3 s of calls
            await asyncio.sleep(0.8)
            outage.append(time.monotonic())
            await asyncio.to_thread(pg.restart)  # fast shutdown + start: connections break mid-batch
            outage.append(time.monotonic())
            await task

        asyncio.run(traffic_with_restart())
        asyncio.run(load("after", 50))
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=150) == 0, proc.stderr.read()
        with open_store(pg.url) as s:
            stored = [o.input for batch in s.iter_observations("restart") for o in batch]
        assert len(answered) >= 300
        # calls were answered while the database was away: their rows had to wait for it to come back
        assert sum(outage[0] < t < outage[1] for t in answered_at) >= 5, (outage, len(answered_at))
        assert len(stored) == len(set(stored)), "an observation was stored twice"
        assert sorted(stored) == sorted(answered), f"lost {len(set(answered) - set(stored))}"
    finally:
        if proc is not None and proc.poll() is None:
            proc.kill()
            proc.wait()
        stop_up()
        pg.cleanup()
