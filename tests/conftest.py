"""Shared fixtures: an isolated KOLM_HOME per test, offline Hugging Face, no Ray usage stats."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

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
