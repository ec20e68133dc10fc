"""kolm report: spend exact on a small fixture, savings from the upstream-equivalent tokens, drift from shadow
pairs, the price table's precedence, and an HTML page that parses and holds its plots."""

from __future__ import annotations

import json
from datetime import datetime, timedelta, timezone
from decimal import Decimal
from html.parser import HTMLParser
from pathlib import Path

import pytest

from kolm_ray.cli import main
from kolm_ray.loop.prices import load_prices
from kolm_ray.loop.report import build_report
from kolm_ray.observations.model import Observation
from kolm_ray.observations.store import open_store
from kolm_ray.registry import drift

T0 = datetime(2026, 11, 2, 9, 0, tzinfo=timezone.utc)


def _req(model: str, text: str, system: str | None = None) -> dict:
    msgs = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": text}]
    return {"model": model, "messages": msgs}


def _obs(ns, provider, model, usage, day, request, output=None) -> Observation:
    return Observation(
        namespace=ns, provider=provider, model=model, input=request["messages"][-1]["content"],
        output=output or {"label": "x"}, usage=usage, created_at=T0 + timedelta(days=day, minutes=len(str(usage))),
        request=request, status=200,
    )  # fmt: skip


@pytest.fixture
def store(store_url):
    """The fixture on each backend (SQLite; PostgreSQL, slow-marked): the same spend to the cent."""
    s = open_store(store_url)
    rows = [
        # support: three gpt-4o calls (dated model name in the response), one claude-3-5-haiku call
        _obs("support", "openai", "gpt-4o-2024-08-06", {"prompt_tokens": 1000, "completion_tokens": 200}, 0,
             _req("gpt-4o", "a")),
        _obs("support", "openai", "gpt-4o-2024-08-06", {"prompt_tokens": 2000, "completion_tokens": 400}, 0,
             _req("gpt-4o", "b")),
        _obs("support", "openai", "gpt-4o-2024-08-06", {"prompt_tokens": 3000, "completion_tokens": 600}, 1,
             _req("gpt-4o", "c")),
        _obs("support", "anthropic", "claude-3-5-haiku-20241022", {"input_tokens": 500, "output_tokens": 100}, 1,
             {"model": "claude-3-5-haiku-latest", "max_tokens": 64, "messages": [{"role": "user", "content": "d"}]}),
        # a gpt-4o call of another shape (a system prompt): priced, but not the local calls' equivalent
        _obs("support", "openai", "gpt-4o-2024-08-06", {"prompt_tokens": 9000, "completion_tokens": 9000}, 1,
             _req("gpt-4o", "e", system="You write essays.")),
        # a stream without usage: an upstream call, no spend
        _obs("support", "openai", "gpt-4o-2024-08-06", None, 1, _req("gpt-4o", "f")),
        # two local answers to gpt-4o requests of the first shape
        # (each took the local model 100 ms of CPU: what net savings price as serving)
        _obs("support", "local", "support@1", {"prompt_tokens": 0, "completion_tokens": 0, "kolm_local_cpu_ms": 100},
             1, _req("gpt-4o", "g")),
        _obs("support", "local", "support@1", {"prompt_tokens": 0, "completion_tokens": 0, "kolm_local_cpu_ms": 100},
             2, _req("gpt-4o", "h")),
        # other: a model with no price, and an import (not a call)
        _obs("other", "openai", "sim-frontier", {"prompt_tokens": 10, "completion_tokens": 5}, 0, _req("sim-frontier", "i")),
        _obs("other", "import", None, None, 0, _req("x", "j")),
    ]  # fmt: skip
    s.append_many(rows)
    yield s
    s.close()


def _live_row(store, namespace: str, k_floor: float, version: int = 1, path: str = "/nowhere") -> None:
    """A registry row as `kolm models promote` writes it (the report reads rows, and only the metrics of the
    artifact's manifest)."""
    from kolm_ray import registry

    store._write(lambda c: c.execute(registry._sql(store,
        "INSERT INTO models (namespace, version, name, sha256, path, k_score, k_floor, threshold, shape, live,"
        " created_at, promoted_at, rolled_back_at) VALUES (?, ?, 'support', 'f00', ?, 0.9, ?, 0.5,"
        " '{}', 1, ?, ?, NULL)"),
        (namespace, version, path, k_floor, T0.isoformat(), (T0 + timedelta(hours=20)).isoformat()),
    ))  # fmt: skip


def _pairs(store, namespace: str, agree: list[bool | None], version: int = 1, tag: str = "a") -> None:
    from kolm_ray import registry

    for i, a in enumerate(agree):
        registry.record_shadow(store, f"local-{tag}{version}-{i}", f"up{i}", namespace, version, a, {})


def test_spend_is_exact_and_savings_use_the_same_shape_mean(store):
    data = build_report(store, load_prices())
    by = {n["name"]: n for n in data["public"]["namespaces"]}
    s = by["support"]
    # gpt-4o $2.50/$10.00, claude-3-5-haiku $0.80/$4.00 per 1M (configs/prices.yaml)
    spend = (
        Decimal(1000) * Decimal("2.5") + 200 * 10 + 2000 * Decimal("2.5") + 400 * 10 + 3000 * Decimal("2.5")
        + 600 * 10 + 500 * Decimal("0.8") + 100 * 4 + 9000 * Decimal("2.5") + 9000 * 10
    ) / 1_000_000  # fmt: skip
    assert s["spend_usd"] == float(spend) == 0.1403
    # each local call: the mean gpt-4o usage of its shape (2000 in, 400 out) = $0.009
    assert s["saved_usd"] == 0.018
    assert (s["calls"], s["upstream_calls"], s["local_calls"]) == (8, 6, 2)
    assert by["other"]["calls"] == 1 and by["other"]["spend_usd"] == 0.0
    assert data["public"]["unpriced"] == {"sim-frontier": 1}
    assert data["public"]["since"].startswith("2026-11-02T09:")
    assert s["live_agreement"] is None and s["drift"] is False and s["k_floor"] is None
    assert set(s) == {"name", "calls", "upstream_calls", "local_calls", "spend_usd", "saved_usd",
                      "live_agreement", "k_floor", "drift", "coverage", "answered_accuracy", "compile_cpu_s",
                      "compile_gpu_s", "local_cpu_s", "compile_usd", "serving_usd", "net_saved_usd",
                      "break_even_calls"}  # fmt: skip
    assert data["public"]["compute_prices"]["file"].endswith("configs/compute_prices.yaml")


def _artifact_with_metrics(path: Path, metrics: dict) -> str:
    """A zip with just the manifest's metrics: what the report reads of a registered artifact."""
    import zipfile

    with zipfile.ZipFile(path, "w") as z:
        z.writestr("manifest.json", json.dumps({"metrics": metrics}))
    return str(path)


def test_net_savings_price_the_compiles_and_the_local_cpu(store, tmp_path, capsys, store_url):
    from kolm_ray.loop.compute_prices import load_compute_prices

    table = tmp_path / "compute.yaml"  # $0.01 per CPU-second, $0.10 per GPU-second: round numbers
    table.write_text('taken: "2026-12-01"\ncpu_hour: 36\ngpu_hour: 360\n')
    art = _artifact_with_metrics(tmp_path / "m.kolm", {
        "compute": {"cpu_s": 1.0, "gpu_s": 0.1, "wall_s": 2.0, "gpus": 1}, "coverage": 0.6, "answered_accuracy": 0.97,
    })  # fmt: skip
    _live_row(store, "support", k_floor=0.9, path=art)
    data = build_report(store, load_prices(), "support", load_compute_prices(str(table)))
    (s,) = data["public"]["namespaces"]
    assert s["compile_usd"] == 0.02  # 1 CPU-s x $0.01 + 0.1 GPU-s x $0.10
    assert s["local_cpu_s"] == 0.2 and s["serving_usd"] == 0.002  # two local answers, 100 ms each
    assert s["saved_usd"] == 0.018 and s["net_saved_usd"] == -0.004  # 0.018 - 0.02 - 0.002
    # each local answer nets (0.018 - 0.002) / 2 = $0.008: three of them pay the $0.02 of compiles
    assert s["break_even_calls"] == 3
    assert (s["coverage"], s["answered_accuracy"]) == (0.6, 0.97)
    assert data["public"]["compute_prices"] == {"file": str(table), "taken": "2026-12-01", "currency": "USD",
                                                "cpu_hour_usd": 36.0, "gpu_hour_usd": 360.0}  # fmt: skip
    # the table and the HTML page say the same and name the table
    argv = ["report", "--namespace", "support", "--compute-prices", str(table), "--store", store_url]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "-0.0040" in out and f"compute prices: {table} (taken 2026-12-01)" in out
    assert main([*argv, "--html", str(tmp_path / "r.html")]) == 0
    page = (tmp_path / "r.html").read_text()
    assert "<td>-0.0040</td><td>3</td>" in page and "$36</b> per CPU-hour" in page
    # a bad table: exit 2, one line
    table.write_text("cpu_hour: cheap\ngpu_hour: 1\n")
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: compute price table") and "cpu_hour" in err and "\n" not in err


def test_no_local_answers_no_break_even(store, tmp_path):
    from kolm_ray.loop.compute_prices import load_compute_prices

    data = build_report(store, load_prices(), "other", load_compute_prices())
    (o,) = data["public"]["namespaces"]
    assert o["local_calls"] == 0 and o["break_even_calls"] is None and o["net_saved_usd"] == 0.0


def test_user_price_table_wins(store, tmp_path, monkeypatch, kolm_home):
    table = tmp_path / "mine.yaml"
    table.write_text('taken: "2026-11-30"\nmodels:\n  gpt-4o: {input: 1, output: 1}\n')
    data = build_report(store, load_prices(str(table)))
    support = next(n for n in data["public"]["namespaces"] if n["name"] == "support")
    assert support["spend_usd"] == (1000 + 200 + 2000 + 400 + 3000 + 600 + 9000 + 9000) / 1e6
    assert data["public"]["unpriced"] == {"claude-3-5-haiku-20241022": 1, "sim-frontier": 1}
    (kolm_home / "prices.yaml").write_text("models:\n  gpt-4o: {input: 0, output: 0}\n")
    assert load_prices().path == str(kolm_home / "prices.yaml")
    monkeypatch.setenv("KOLM_PRICES", str(table))
    assert load_prices().path == str(table)


def test_drift_from_the_last_window_of_shadow_pairs(store):
    _live_row(store, "support", k_floor=0.8)
    _pairs(store, "support", [True] * 10)  # too few for a verdict
    s = build_report(store, load_prices(), "support")["public"]["namespaces"][0]
    assert (s["live_agreement"], s["k_floor"], s["drift"]) == (1.0, 0.8, False)
    # 150 pairs: the first 50 agree, then 75 of the last 100 (0.75 < 0.8): only the window counts
    _pairs(store, "support", [True] * 40 + [True, True, False, True] * 25 + [None] * 5, tag="b")
    agreement, n = drift.live_agreement(store, "support", 1)
    assert (agreement, n) == (0.75, 100)
    s = build_report(store, load_prices(), "support")["public"]["namespaces"][0]
    assert s["drift"] is True and s["live_agreement"] == 0.75
    assert drift.state_of(0.75, 100, 0.8) == "drifting"
    assert drift.state_of(0.64, 100, 0.8) == "stopped"
    assert drift.state_of(0.64, drift.MIN_PAIRS - 1, 0.8) == "ok"


class _Plots(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.figures: list[str] = []
        self.svgs = self.paths = 0
        self.external: list[str] = []
        self.tables = 0

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if tag == "figure":
            self.figures.append(a.get("data-plot", ""))
        self.svgs += tag == "svg"
        self.paths += tag == "path"
        self.tables += tag == "table"
        if tag in ("script", "link", "img", "iframe") or str(a.get("src", "")).startswith("http"):
            self.external.append(tag)


def test_html_page_holds_the_plots(store, tmp_path, capsys, store_url):
    _live_row(store, "support", k_floor=0.8)
    _pairs(store, "support", [True, False, True, True] * 10)
    out = tmp_path / "report.html"
    assert main(["report", "--html", str(out), "--store", store_url]) == 0
    assert capsys.readouterr().out.strip() == f"wrote {out}"
    p = _Plots()
    p.feed(out.read_text())
    # two namespaces, each a spend/local-share plot and an agreement-vs-floor plot, as inline SVG
    assert p.figures == ["spend", "agreement"] * 2
    assert p.svgs >= 4 and p.paths > 20 and p.tables == 1
    assert p.external == []  # self-contained
    assert "k_floor 0.80" in out.read_text() and "support@1" in out.read_text()


def test_cli_json_and_bad_input(store, tmp_path, capsys, store_url):
    assert main(["report", "--json", "--namespace", "support", "--store", store_url]) == 0
    body = json.loads(capsys.readouterr().out)
    assert [n["name"] for n in body["namespaces"]] == ["support"]
    assert body["prices"].endswith("configs/prices.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("models:\n  gpt-4o: {input: -1, output: 2}\n")
    assert main(["report", "--prices", str(bad), "--store", store_url]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: price table") and "non-negative" in err and "\n" not in err
    assert main(["report", "--namespace", "nope", "--store", store_url]) == 2
    assert main(["report", "--html", str(tmp_path / "no" / "x.html"), "--store", store_url]) == 2
    assert not (tmp_path / "no").exists()
    assert Path(body["prices"]).is_file()


@pytest.mark.parametrize("seconds", [20, 90, 3600, 3 * 86400])
def test_time_axis_labels_are_readable_at_any_span(seconds):
    """The live-agreement plot over a short window once printed ticks like `01:08.800000`: now clock times
    (HH:MM or HH:MM:SS) or dates (`07 Dec`), the shared date said once in the offset."""
    import re

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from kolm_ray.loop.report_html import _time_axis

    fig, ax = plt.subplots()
    ax.plot([T0, T0 + timedelta(seconds=seconds)], [0, 1])
    ax.set_xlim(T0, T0 + timedelta(seconds=max(seconds, 60)))
    _time_axis(ax)
    fig.canvas.draw()
    labels = [t.get_text() for t in ax.get_xticklabels() if t.get_text()]
    plt.close(fig)
    assert len(labels) >= 3, labels
    assert all(re.fullmatch(r"\d\d:\d\d(:\d\d)?|\d\d [A-Z][a-z]{2}", t) for t in labels), labels
    assert len(set(labels)) == len(labels), labels
