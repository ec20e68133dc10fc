"""Files and keys: KOLM_HOME 0700, the store and its WAL files 0600, the signing key 0600, made atomically
by one of several racing creators, and an empty or short key refused with exit 2 (never used)."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from kolm_ray.artifact import pack
from kolm_ray.cli import main
from kolm_ray.errors import KolmError
from kolm_ray.observations.model import Observation
from kolm_ray.observations.store import open_store, store_scheme
from kolm_ray.settings import MIN_KEY_BYTES, kolm_home, signing_key


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


@pytest.fixture
def open_umask():
    """A permissive umask (the common 022), so that 0700/0600 are kolm's doing, not the test runner's."""
    old = os.umask(0o022)
    yield
    os.umask(old)


def test_kolm_home_is_created_0700(tmp_path, monkeypatch, open_umask) -> None:
    home = tmp_path / "a" / "b" / "kolm"
    monkeypatch.setenv("KOLM_HOME", str(home))
    assert kolm_home() == home and mode(home) == 0o700
    signing_key()
    assert mode(home / "signing.key") == 0o600


def test_default_home_from_an_earlier_version_is_tightened(tmp_path, monkeypatch, open_umask) -> None:
    monkeypatch.delenv("KOLM_HOME")
    monkeypatch.setenv("HOME", str(tmp_path))
    (tmp_path / ".kolm").mkdir(mode=0o755)
    assert mode(tmp_path / ".kolm") == 0o755
    assert kolm_home() == tmp_path / ".kolm" and mode(tmp_path / ".kolm") == 0o700


def test_a_home_the_user_made_is_left_as_it_is(tmp_path, monkeypatch, open_umask) -> None:
    shared = tmp_path / "team-kolm"
    shared.mkdir(mode=0o750)
    monkeypatch.setenv("KOLM_HOME", str(shared))
    kolm_home()
    assert mode(shared) == 0o750


def test_store_and_its_wal_files_are_0600(tmp_path, open_umask) -> None:
    store = open_store(None)  # the default: $KOLM_HOME/observations.db
    try:
        store.append(Observation(namespace="support", input="a prompt nobody else may read", output="x"))
        db = kolm_home() / "observations.db"
        wal, shm = Path(f"{db}-wal"), Path(f"{db}-shm")
        assert wal.exists() and shm.exists()  # WAL mode, with the writer's connection still open
        assert {p.name: mode(p) for p in (db, wal, shm)} == {p.name: 0o600 for p in (db, wal, shm)}
        assert mode(kolm_home()) == 0o700
        assert store_scheme(store) == "sqlite"
    finally:
        store.close()


def test_an_existing_open_store_is_tightened(tmp_path, open_umask) -> None:
    path = tmp_path / "obs.db"
    open_store(f"sqlite:///{path}").close()
    os.chmod(path, 0o644)
    open_store(f"sqlite:///{path}").close()
    assert mode(path) == 0o600


def test_store_scheme_never_shows_a_path_or_password() -> None:
    assert store_scheme("sqlite:////home/alice/.kolm/observations.db") == "sqlite"
    assert store_scheme("postgresql://kolm:s3cret@db.internal:5432/kolm") == "postgresql"
    assert store_scheme("/just/a/path") == "unknown"


def _artifact(tmp_path: Path) -> Path:
    staging = tmp_path / "staging"
    staging.mkdir()
    (staging / "config.json").write_text("{}")
    pack(staging, tmp_path / "x.kolm", {"name": "x", "kind": "encoder-tagger", "spec": {}, "metrics": {}})
    return tmp_path / "x.kolm"


@pytest.mark.parametrize("content", [b"", b"\n", b"  \n", b"short-key", b"x" * (MIN_KEY_BYTES - 1)])
def test_empty_or_short_key_file_is_exit_2_and_never_used(content, tmp_path, capsys) -> None:
    artifact = _artifact(tmp_path)  # signed with the good key made on first use
    (kolm_home() / "signing.key").write_bytes(content)
    with pytest.raises(KolmError, match=f"at least {MIN_KEY_BYTES} bytes"):
        signing_key()
    assert main(["verify", str(artifact)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: signing key ") and "signing.key is " in err and "\n" not in err
    staging = tmp_path / "s2"
    staging.mkdir()
    (staging / "a.json").write_text("{}")
    with pytest.raises(KolmError):
        pack(staging, tmp_path / "y.kolm", {"name": "y"})  # nothing is ever signed with it
    assert not (tmp_path / "y.kolm").exists()


@pytest.mark.parametrize("value", ["abcde", "x" * (MIN_KEY_BYTES - 1), "", "changeme"])
def test_short_or_placeholder_env_key_is_exit_2(value, tmp_path, monkeypatch, capsys) -> None:
    artifact = _artifact(tmp_path)
    monkeypatch.setenv("KOLM_SIGNING_KEY", value)
    assert main(["verify", str(artifact)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: KOLM_SIGNING_KEY is ") and "\n" not in err
    monkeypatch.setenv("KOLM_SIGNING_KEY", "x" * MIN_KEY_BYTES)
    assert signing_key()[0] == b"x" * MIN_KEY_BYTES


def test_racing_threads_end_with_one_key() -> None:
    barrier, keys = threading.Barrier(8), []

    def make() -> None:
        barrier.wait()
        keys.append(signing_key())

    threads = [threading.Thread(target=make) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(keys) == 8 and len(set(keys)) == 1
    assert sorted(p.name for p in kolm_home().iterdir()) == ["signing.key"]  # no temporary file left


# Each racer imports only kolm_ray.settings, says it is ready, and waits for the starting gun (a file).
RACER = """
import os, sys, time
from kolm_ray.settings import signing_key
open(sys.argv[1] + "." + str(os.getpid()), "w").close()
while not os.path.exists(sys.argv[1]):
    time.sleep(0.001)
sys.stdout.write(signing_key()[0].decode())
"""


@pytest.mark.slow
def test_racing_processes_end_with_one_key(tmp_path) -> None:
    """Eight processes create the key at once on a fresh KOLM_HOME: every one ends with the same key."""
    home, gun = tmp_path / "home", tmp_path / "go"
    env = {k: v for k, v in os.environ.items() if k != "KOLM_SIGNING_KEY"}
    env.update(KOLM_HOME=str(home), PYTHONPATH=str(Path(__file__).resolve().parent.parent))
    procs = [
        subprocess.Popen([sys.executable, "-c", RACER, str(gun)], env=env, stdout=subprocess.PIPE, text=True)
        for _ in range(8)
    ]
    try:
        deadline = time.monotonic() + 60
        while len(list(tmp_path.glob("go.*"))) < len(procs):
            assert time.monotonic() < deadline, "racers did not start"
            time.sleep(0.01)
        gun.touch()
        keys = [p.communicate(timeout=60)[0].encode() for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    assert all(p.returncode == 0 for p in procs)
    assert len(set(keys)) == 1 and len(keys[0]) == 64
    assert (home / "signing.key").read_bytes() == keys[0]
    assert sorted(p.name for p in home.iterdir()) == ["signing.key"]
    assert mode(home / "signing.key") == 0o600 and mode(home) == 0o700
