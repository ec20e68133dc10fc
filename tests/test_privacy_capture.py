"""Privacy against the real `kolm capture` subprocess and the official SDKs (issue 26's reproductions):
`--redact pii` stores PII as tags while the upstream gets the original, `X-Kolm-Omit`, and deletes that
reach the store, its shadow pairs, the spool (rows written while the store was locked) and dead letters."""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import sqlite3
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import anthropic
import httpx
import openai
import pytest

from kolm_ray import registry
from kolm_ray.demo.simulate.upstream import make_upstream_app, serve_in_thread
from kolm_ray.observations.erase import dead_letter_path
from kolm_ray.observations.store import open_store

KEY = "sk-test-" + "q" * 40
PII = "I'm jane.doe@example.com, call me on +1 415 555 0100, card 4111 1111 1111 1111."
REDACTED = "I'm [EMAIL], call me on [PHONE], card [CARD]."
TOKEN = "admin-" + "k" * 30
FAST = {"KOLM_CAPTURE_RETRY_S": "0.5", "KOLM_CAPTURE_DRAIN_S": "1"}


@pytest.fixture(scope="module")
def upstream() -> Iterator[tuple[str, list[str]]]:
    """The stand-in upstream in a thread; it answers by echoing the question and records what it got."""
    received: list[str] = []

    def answer(query: str) -> str:
        received.append(query)
        return f"Noted: {query}"

    url, stop = serve_in_thread(make_upstream_app(answer=answer))
    yield url, received
    stop()


@contextlib.contextmanager
def capture(
    home: Path, upstream: str, *flags: str, **env: str
) -> Iterator[tuple[str, subprocess.Popen, Path]]:
    """`kolm capture` on a free port over $home/obs.db; (url, process, db). SIGTERM (then kill) on exit."""
    db = home / "obs.db"
    cmd = [sys.executable, "-m", "kolm_ray.cli", "capture", "--port", "0", "--store", f"sqlite:///{db}"]
    cmd += ["--openai-upstream", upstream, "--anthropic-upstream", upstream, *flags]
    full_env = {**os.environ, "KOLM_HOME": str(home), **FAST, **env}
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
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def rows(db: Path) -> list[dict]:
    with contextlib.closing(sqlite3.connect(db)) as c:
        c.row_factory = sqlite3.Row
        return [dict(r) for r in c.execute("SELECT * FROM observations ORDER BY seq")]


def wait_rows(db: Path, n: int, timeout: float = 15.0) -> list[dict]:
    deadline = time.monotonic() + timeout
    while True:
        with contextlib.suppress(sqlite3.OperationalError):
            got = rows(db)
            if len(got) >= n:
                return got
        assert time.monotonic() < deadline, f"expected {n} rows"
        time.sleep(0.05)


def ask(url: str, text: str, ns: str = "support", **headers: str):
    client = openai.OpenAI(base_url=f"{url}/v1/capture/openai", api_key=KEY, max_retries=0)
    return client.chat.completions.create(
        model="gpt-4o-mini",
        messages=[{"role": "system", "content": "You are support."}, {"role": "user", "content": text}],
        extra_headers={"X-Kolm-Namespace": ns, "X-Kolm-Tenant": "acme", **headers},
    )


def test_redact_pii_stores_tags_while_the_upstream_gets_the_original(upstream, tmp_path):
    up, received = upstream
    with capture(tmp_path, up, "--redact", "pii") as (url, _, db):
        answer = ask(url, PII)
        assert received[-1] == PII and answer.choices[0].message.content == f"Noted: {PII}"  # unchanged
        client = anthropic.Anthropic(base_url=f"{url}/v1/capture/anthropic", api_key=KEY, max_retries=0)
        client.messages.create(
            model="claude-3-5-haiku-latest",
            max_tokens=64,
            messages=[{"role": "user", "content": "IBAN GB82 WEST 1234 5698 7654 32, SSN 123-45-6789"}],
            extra_headers={"X-Kolm-Namespace": "support"},
        )
        assert received[-1] == "IBAN GB82 WEST 1234 5698 7654 32, SSN 123-45-6789"
        stored = wait_rows(db, 2)
    first, second = stored
    assert first["input"] == REDACTED and json.loads(first["output"]) == f"Noted: {REDACTED}"
    assert json.loads(first["request"])["messages"][1]["content"] == REDACTED
    assert second["input"] == "IBAN [IBAN], SSN [SSN]"
    blob = json.dumps(stored)
    for raw in ("jane.doe", "555 0100", "4111 1111", "GB82", "123-45-6789"):
        assert raw not in blob


@pytest.mark.slow
def test_omit_keeps_spend_and_never_trains(upstream, tmp_path):
    up, received = upstream
    with capture(tmp_path, up) as (url, _, db):
        ask(url, "keep this one")
        for side in ("request", "response", "all"):
            ask(url, f"secret {side} text", **{"X-Kolm-Omit": side})
        n = len(received)
        with pytest.raises(openai.BadRequestError) as e:
            ask(url, "never forwarded", **{"X-Kolm-Omit": "body"})
        assert "X-Kolm-Omit" in str(e.value.body) and len(received) == n  # 400 before forwarding
        stored = wait_rows(db, 4)
    assert len(stored) == 4
    by_omit = {r["omitted"]: r for r in stored}
    assert by_omit[None]["input"] == "keep this one"
    assert by_omit["request"]["input"] == "" and by_omit["request"]["request"] is None
    assert "secret request text" in json.loads(by_omit["request"]["output"])
    assert by_omit["response"]["input"] == "secret response text" and by_omit["response"]["output"] == "null"
    assert by_omit["all"]["input"] == "" and by_omit["all"]["output"] == "null"
    for r in stored:  # spend survives
        assert (
            r["model"] == "gpt-4o-mini" and json.loads(r["usage"])["total_tokens"] > 0 and r["status"] == 200
        )
    store = open_store(f"sqlite:///{db}")
    # what kolm cluster / recipe read: a keyless proxy's rows only with --include-untrusted, and even then
    # never an omitted one
    sql, params, connect = store.dataset_source(["support"], include_untrusted=True)
    with contextlib.closing(connect()) as c:
        trained = [r[3] for r in c.execute(sql, params)]
    store.close()
    assert trained == ["keep this one"]


@pytest.mark.slow
def test_delete_route_on_the_running_proxy(upstream, tmp_path):
    up, _ = upstream
    dead = dead_letter_path(tmp_path)
    dead.write_text(
        json.dumps(
            {
                "at": "x",
                "error": "e",
                "observation": {"namespace": "support", "input": "jane.doe@example.com"},
            }
        )
        + "\n"
        + json.dumps({"at": "x", "error": "e", "observation": {"namespace": "support", "input": "other"}})
        + "\n"
    )
    with capture(tmp_path, up, KOLM_ADMIN_TOKEN=TOKEN) as (url, _, db):
        ask(url, PII)
        ask(url, "nothing personal")
        ask(url, PII, ns="billing")
        stored = wait_rows(db, 3)
        store = open_store(f"sqlite:///{db}")
        registry.record_shadow(store, stored[0]["id"], stored[1]["id"], "support", 1, True, {})
        store.close()
        admin = {"Authorization": f"Bearer {TOKEN}"}
        base = f"{url}/v1/bridges/observations"
        assert httpx.delete(f"{base}?namespace=support").status_code == 401  # no token
        r = httpx.delete(f"{base}?namespace=support", headers={**admin, "Host": "evil.example"})
        assert r.status_code == 403  # a DNS-rebound page, even with the token
        r = httpx.delete(f"{base}?namespace=support&before=soon", headers=admin)
        assert r.status_code == 400 and "before" in r.json()["error"]
        r = httpx.request("DELETE", f"{base}?namespace=support", headers=admin, content=b"{}")
        assert r.status_code == 400
        assert len(rows(db)) == 3
        r = httpx.delete(
            base, params={"namespace": "support", "matching": "JANE.DOE@example.com"}, headers=admin
        )
        assert r.status_code == 200 and r.json() == {"deleted": 2}  # the row and its dead letter
        left = rows(db)
    assert [(r["namespace"], r["input"]) for r in left] == [("support", "nothing personal"), ("billing", PII)]
    with contextlib.closing(sqlite3.connect(db)) as c:
        assert c.execute("SELECT COUNT(*) FROM shadow_pairs").fetchone()[0] == 0
    assert [json.loads(x)["observation"]["input"] for x in dead.read_text().splitlines()] == ["other"]


@pytest.mark.slow
def test_delete_reaches_the_spool_of_a_store_that_was_down(upstream, tmp_path):
    """The store locked: answers go to the spool; the proxy stops with them there; `kolm observations
    delete` rewrites the spool; the next start replays only what is left."""
    up, _ = upstream
    db = tmp_path / "obs.db"
    with capture(tmp_path, up) as (url, proc, _):
        lock = sqlite3.connect(db, isolation_level=None, timeout=30)
        lock.execute("BEGIN IMMEDIATE")
        try:
            ask(url, PII)
            ask(url, "nothing personal")
            deadline = time.monotonic() + 20
            while httpx.get(f"{url}/healthz").json().get("pending") != 2 or not list(
                (tmp_path / "spool").rglob("*.jsonl")
            ):
                assert time.monotonic() < deadline, httpx.get(f"{url}/healthz").json()
                time.sleep(0.1)
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(timeout=30) == 0
        finally:
            lock.execute("ROLLBACK")
            lock.close()
    spooled = b"".join(p.read_bytes() for p in (tmp_path / "spool").rglob("*.jsonl"))
    assert b"jane.doe@example.com" in spooled and rows(db) == []
    env = {**os.environ, "KOLM_HOME": str(tmp_path)}
    cmd = [sys.executable, "-m", "kolm_ray.cli", "observations", "delete", "--namespace", "support"]
    done = subprocess.run(
        [*cmd, "--matching", "jane.doe@example.com", "--store", f"sqlite:///{db}"],
        env=env, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert done.returncode == 0 and json.loads(done.stdout) == {"deleted": 1}, done.stderr
    bad = subprocess.run(
        [*cmd, "--before", "13/01/2026"], env=env, capture_output=True, text=True, timeout=120
    )
    assert (
        bad.returncode == 2 and bad.stderr.startswith("error: --before") and len(bad.stderr.splitlines()) == 1
    )
    spooled = b"".join(p.read_bytes() for p in (tmp_path / "spool").rglob("*.jsonl"))
    assert b"jane.doe" not in spooled and b"nothing personal" in spooled
    with capture(tmp_path, up) as (url, _, _):
        left = wait_rows(db, 1)
        time.sleep(0.5)
    assert [r["input"] for r in rows(db)] == ["nothing personal"] == [r["input"] for r in left]
