"""`kolm capture --workers N`: N capture processes on one port, one writer each, one store.

    kolm capture --workers 4 --port 8700 --store postgresql://kolm:PASSWORD@db:5432/kolm

Each worker is a full `kolm capture` process (its own event loop, aiohttp session, BackgroundWriter
and store pool) listening on the same port with SO_REUSEPORT, so the kernel spreads new connections
over the workers' own accept queues (no shared accept lock, no thundering herd, no proxying through a
parent). This supervisor first opens the store once (migrations, and a bad URL fails here, exit 2),
reserves the port (bound, never listening: it takes no connections), starts the workers in their own
session with the store URL in their environment (never on a command line, where `ps` would show the
password), and on SIGTERM/SIGINT sends each worker SIGTERM: each finishes its in-flight answers and
drains its writer. It then prints the totals the workers reported. A worker that dies on its own
stops the others (exit 1): a proxy silently down a worker would drop a share of connections.

The store must take concurrent writers: PostgreSQL does; SQLite serialises them on its write lock
(busy_timeout), which works but does not scale.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from kolm_ray.errors import KolmError

WORKER_ENV = "KOLM_CAPTURE_WORKER"  # "i/N" in a worker; unset in a plain one-process capture
REPORT_ENV = "KOLM_CAPTURE_REPORT"  # where a worker writes {"written", "lost"} when it stops
READY_TIMEOUT_S = 60.0
DRAIN_TIMEOUT_S = 120.0  # uvicorn's 60 s graceful shutdown + the writer's drain


def worker_index() -> str | None:
    """ "i/N" when this process is one of N capture workers, else None."""
    return os.environ.get(WORKER_ENV)


def reserve_port(host: str, port: int) -> socket.socket:
    """A socket bound with SO_REUSEPORT and never listened on: fixes the port (0 -> a free one) for the
    workers, and takes no connections itself (only listening sockets join the kernel's reuseport group)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    try:
        sock.bind((host, port))
    except OSError as e:
        sock.close()
        raise KolmError(f"cannot listen on {host}:{port}: {e.strerror or e}") from None
    return sock


def _die_with_parent() -> None:  # runs in the child before exec: SIGTERM when the supervisor dies
    try:
        import ctypes

        ctypes.CDLL(None).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG (Linux; elsewhere a no-op failure)
    except Exception:
        pass


def write_report(written: int, lost: int) -> None:
    """Called by a worker on its way out: its totals for the supervisor."""
    path = os.environ.get(REPORT_ENV)
    if path:
        tmp = Path(path + ".partial")
        tmp.write_text(json.dumps({"written": written, "lost": lost}))
        os.replace(tmp, path)


def mark_ready() -> None:
    """Called by a worker once its socket listens (connections queue in its backlog from then on)."""
    path = os.environ.get(REPORT_ENV)
    if path:
        Path(path + ".ready").touch()


def run_workers(args: argparse.Namespace, url: str, banner: Callable[[str], list[str]]) -> int:
    """Supervise args.workers capture processes on one port; returns the exit code."""
    n = args.workers
    reserved = reserve_port(args.host, args.port)
    host, port = reserved.getsockname()[:2]
    shown = f"[{host}]" if ":" in host else host
    reports = Path(tempfile.mkdtemp(prefix="kolm-capture-"))
    cmd = [sys.executable, "-m", "kolm_ray.cli", "capture", "--host", host, "--port", str(port)]
    for flag, value in (
        ("--openai-upstream", args.openai_upstream),
        ("--anthropic-upstream", args.anthropic_upstream),
    ):
        if value:
            cmd += [flag, value]
    if getattr(args, "redact", None):
        cmd += ["--redact", args.redact]
    procs: list[subprocess.Popen] = []
    stopping = False

    def stop(*_: object) -> None:
        nonlocal stopping
        stopping = True
        for p in procs:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)

    previous = {s: signal.signal(s, stop) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        for i in range(n):
            env = {
                **os.environ,
                "KOLM_STORE": url,
                WORKER_ENV: f"{i}/{n}",
                REPORT_ENV: str(reports / f"w{i}"),
            }
            procs.append(subprocess.Popen(cmd, env=env, start_new_session=True, preexec_fn=_die_with_parent))
        deadline = time.monotonic() + READY_TIMEOUT_S
        while not stopping and not all((reports / f"w{i}.ready").exists() for i in range(n)):
            dead = [p for p in procs if p.poll() is not None]
            if dead or time.monotonic() > deadline:
                stop()
                _wait(procs)
                why = f"exited with {dead[0].returncode}" if dead else f"not ready in {READY_TIMEOUT_S:.0f} s"
                raise KolmError(f"capture worker {procs.index(dead[0]) if dead else '?'} {why}")
            time.sleep(0.05)
        print(
            f"kolm capture listening on http://{shown}:{port} ({n} workers, pids "
            f"{' '.join(str(p.pid) for p in procs)})\n" + "\n".join(banner(f"http://{shown}:{port}")),
            flush=True,
        )
        failed = None
        while not stopping:
            for i, p in enumerate(procs):
                if p.poll() is not None:
                    failed = (i, p.returncode)
                    stop()
                    break
            time.sleep(0.2)
        codes = _wait(procs)
        written = lost = 0
        missing = []
        for i in range(n):
            try:
                r = json.loads((reports / f"w{i}").read_text())
                written, lost = written + r["written"], lost + r["lost"]
            except (OSError, ValueError, KeyError):
                missing.append(i)
        note = f" (workers {missing} reported nothing)" if missing else ""
        print(f"kolm capture stopped: {written} observations stored, {lost} lost{note}", flush=True)
        if failed is not None:
            print(
                f"error: capture worker {failed[0]} exited with {failed[1]}; stopped the others",
                file=sys.stderr,
            )
            return 1
        return 0 if all(c == 0 for c in codes) and not missing else 1
    finally:
        for s, h in previous.items():
            signal.signal(s, h)
        stop()
        _wait(procs)
        reserved.close()
        for f in reports.iterdir():
            f.unlink(missing_ok=True)
        reports.rmdir()


def _wait(procs: list[subprocess.Popen]) -> list[int]:
    codes = []
    deadline = time.monotonic() + DRAIN_TIMEOUT_S
    for p in procs:
        try:
            codes.append(p.wait(max(0.1, deadline - time.monotonic())))
        except subprocess.TimeoutExpired:
            p.kill()
            codes.append(p.wait())
    return codes
