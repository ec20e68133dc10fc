"""The report as one self-contained HTML page: a table, and per namespace two inline SVG plots (matplotlib).

Plot 1: upstream spend per day (bars, $) and the share of calls answered locally (line, right axis).
Plot 2: live agreement over the trailing shadow-pair window against the live model's k_floor (and the
stop bound, k_floor - 0.15), with each promotion marked. Nothing is fetched: no scripts, fonts or images
from elsewhere, so the file opens offline and can be mailed.
"""

from __future__ import annotations

import html
import io
import os
import tempfile
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,sans-serif;margin:2rem;color:#222;max-width:1300px}
table{border-collapse:collapse;margin:1rem 0}td,th{padding:.3rem .7rem;border-bottom:1px solid #ddd;text-align:right}
th:first-child,td:first-child{text-align:left}.drift{color:#b00;font-weight:600}
section{margin-top:2rem}figure{margin:0}.plots{display:flex;flex-wrap:wrap;gap:1rem}
.muted{color:#777;font-size:.9em}
"""


def _svg(fig: Any) -> str:
    buf = io.StringIO()
    fig.savefig(buf, format="svg", bbox_inches="tight")
    text = buf.getvalue()
    return text[text.index("<svg") :]  # drop the XML prolog and DOCTYPE: inline SVG in HTML5


def _dt(s: str) -> datetime:
    return datetime.fromisoformat(s)


def _time_axis(ax: Any) -> None:
    """Readable time ticks at any span (a minute to months): matplotlib's concise date labels, 3 to 8
    ticks, the shared part (day, month) said once in the offset instead of on every tick."""
    import matplotlib.dates as mdates

    locator = mdates.AutoDateLocator(minticks=3, maxticks=8)
    formatter = mdates.ConciseDateFormatter(locator)
    formatter.formats = ["%Y", "%b", "%d %b", "%H:%M", "%H:%M", "%H:%M:%S"]  # never %S.%f fractions
    formatter.zero_formats = ["", "%Y", "%b", "%d %b", "%H:%M", "%H:%M"]
    formatter.offset_formats = ["", "%Y", "%b %Y", "%d %b %Y", "%d %b %Y", "%d %b %Y %H:%M"]
    ax.xaxis.set_major_locator(locator)
    ax.xaxis.set_major_formatter(formatter)


# (unit, key length of an ISO timestamp, bin width in days): the finest that spans at most ~60 bins
_UNITS = (("minute", 16, 1 / 1440), ("hour", 13, 1 / 24), ("day", 10, 1.0))


def _bins(minutes: dict[str, dict[str, Any]]) -> tuple[dict[str, dict[str, Any]], str, float]:
    """Per-minute sums regrouped by minute, hour or day, whichever keeps the plot to about 60 bars."""
    keys = sorted(minutes)
    span = (_dt(keys[-1]) - _dt(keys[0])).total_seconds() / 86400 if keys else 0.0
    unit, n, width = next((u for u in _UNITS if span / u[2] <= 60), _UNITS[-1])
    out: dict[str, dict[str, Any]] = {}
    for k in keys:
        head = k[:n]
        key = head + {16: "", 13: ":00", 10: "T00:00"}[n]
        b = out.setdefault(key, {"upstream": 0, "local": 0, "spend": 0.0})
        b["upstream"] += minutes[k]["upstream"]
        b["local"] += minutes[k]["local"]
        b["spend"] += float(minutes[k]["spend"])
    return out, unit, width


def spend_plot(ns: Any) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    bins, unit, width = _bins(ns.days)
    x = [datetime.fromisoformat(b) for b in sorted(bins)]
    spend = [float(bins[b]["spend"]) for b in sorted(bins)]
    share = [bins[b]["local"] / max(1, bins[b]["upstream"] + bins[b]["local"]) for b in sorted(bins)]
    fig, ax = plt.subplots(figsize=(5.2, 3.0))
    ax.bar(x, spend, color="#4c72b0", width=width * 0.8, align="edge", label="upstream spend ($)")
    ax.set_ylabel(f"spend per {unit} ($)")
    ax2 = ax.twinx()
    ax2.plot(x, share, color="#dd8452", marker="o", label="answered locally")
    ax2.set_ylim(0, 1.05)
    ax2.set_ylabel("share answered locally")
    ax.set_title(f"{ns.name}: spend and local share")
    _time_axis(ax)
    h1, l1 = ax.get_legend_handles_labels()
    h2, l2 = ax2.get_legend_handles_labels()
    ax.legend(h1 + h2, l1 + l2, loc="upper center", bbox_to_anchor=(0.5, -0.3), ncol=2, fontsize=8)
    try:
        return _svg(fig)
    finally:
        plt.close(fig)


def agreement_plot(ns: Any) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from kolm_ray.registry.drift import STOP_MARGIN

    fig, ax = plt.subplots(figsize=(5.2, 3.0))
    if ns.agreement_series:
        ax.plot([_dt(t) for t, _ in ns.agreement_series], [a for _, a in ns.agreement_series],
                color="#55a868", label="live agreement")  # fmt: skip
    else:
        ax.text(0.5, 0.5, "no shadow pairs yet", ha="center", va="center", transform=ax.transAxes)
    if ns.k_floor is not None:
        ax.axhline(ns.k_floor, color="#c44e52", linestyle="--", label=f"k_floor {ns.k_floor:.2f}")
        ax.axhline(ns.k_floor - STOP_MARGIN, color="#c44e52", linestyle=":", label="stop local answers")
    span = (_dt(ns.agreement_series[0][0]), _dt(ns.agreement_series[-1][0])) if ns.agreement_series else None
    for t, label in ns.promotions:  # within the plotted window (a version's pairs start after its promotion)
        if span is None or span[0] <= _dt(t) <= span[1]:
            ax.axvline(_dt(t), color="#8172b2", alpha=0.5)
            ax.annotate(label, (_dt(t), 0.05), rotation=90, fontsize=7, color="#8172b2")
    ax.set_ylim(0, 1.05)
    if span is None and ns.promotions:  # no pairs yet: the promotions' own minutes, not years around them
        times = [_dt(t) for t, _ in ns.promotions]
        span = (min(times) - timedelta(minutes=5), max(times) + timedelta(minutes=5))
    if span is not None:  # at least a minute wide: second ticks, never fractions of one
        ax.set_xlim(span[0], max(span[1], span[0] + timedelta(minutes=1)))
    ax.set_ylabel("agreement (trailing window)")
    ax.set_title(f"{ns.name}: live agreement vs floor")
    if ax.get_legend_handles_labels()[0]:
        ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.3), ncol=3, fontsize=7)
    _time_axis(ax)
    try:
        return _svg(fig)
    finally:
        plt.close(fig)


def render(data: dict[str, Any]) -> str:
    """The page's HTML text."""
    pub, e = data["public"], html.escape
    head = "".join(f"<th>{h}</th>" for h in
                   ("namespace", "calls", "upstream", "local", "spend $", "saved $", "compute $", "net saved $",
                    "break-even calls", "live agreement", "k_floor", "answered-accuracy", "coverage", "drift"))  # fmt: skip
    rows = []
    for n in pub["namespaces"]:
        a, f, acc, cov = (
            "-" if n[k] is None else f"{n[k]:.3f}"
            for k in ("live_agreement", "k_floor", "answered_accuracy", "coverage")
        )
        be = "-" if n["break_even_calls"] is None else str(n["break_even_calls"])
        flag = '<td class="drift">drift</td>' if n["drift"] else "<td>-</td>"
        rows.append(
            f"<tr><td>{e(n['name'])}</td><td>{n['calls']}</td><td>{n['upstream_calls']}</td>"
            f"<td>{n['local_calls']}</td><td>{n['spend_usd']:.4f}</td><td>{n['saved_usd']:.4f}</td>"
            f"<td>{n['compile_usd'] + n['serving_usd']:.4f}</td><td>{n['net_saved_usd']:.4f}</td><td>{be}</td>"
            f"<td>{a}</td><td>{f}</td><td>{acc}</td><td>{cov}</td>{flag}</tr>"
        )
    cp = pub["compute_prices"]
    costs = (
        f'<p class="muted">compute $ = compiles (measured CPU and GPU seconds in each registered model\'s'
        f" manifest) + the local model's CPU time per call in the proxy, priced from {e(cp['file'])}"
        f" (taken {e(str(cp['taken'] or '?'))}): <b>${cp['cpu_hour_usd']:g}</b> per CPU-hour,"
        f" <b>${cp['gpu_hour_usd']:g}</b> per GPU-hour. net saved = saved - compute; break-even: local"
        " answers needed to pay the compiles.</p>"
    )
    sections = []
    for ns in data["details"]:
        promos = ", ".join(f"{e(label)} ({e(t[:19])})" for t, label in ns.promotions) or "none"
        state = {"ok": "", "drifting": " (drifting: shadow rate raised)",
                 "stopped": " (stopped: answering upstream until a new model is promoted)"}[ns.state]  # fmt: skip
        sections.append(
            f'<section id="ns-{e(ns.name)}"><h2>{e(ns.name)}</h2>'
            f'<p class="muted">live model: {e(ns.live or "none")}{state}; promotions: {promos}; '
            f"shadow pairs in the window: {ns.pairs}</p>"
            f'<div class="plots"><figure class="plot" data-plot="spend">{spend_plot(ns)}</figure>'
            f'<figure class="plot" data-plot="agreement">{agreement_plot(ns)}</figure></div></section>'
        )
    unpriced = ", ".join(f"{e(m)} ({c} calls)" for m, c in pub["unpriced"].items())
    return (
        '<!DOCTYPE html><html lang="en"><head><meta charset="utf-8"><title>kolm report</title>'
        f"<style>{CSS}</style></head><body><h1>kolm report</h1>"
        f'<p class="muted">since {e(pub["since"] or "-")}; prices {e(pub["prices"])}'
        f" (taken {e(str(data.get('prices_taken') or '?'))})"
        f"{'; unpriced, counted at $0: ' + unpriced if unpriced else ''}</p>"
        f"<table><thead><tr>{head}</tr></thead><tbody>{''.join(rows)}</tbody></table>{costs}"
        f"{''.join(sections)}</body></html>\n"
    )


def write_html(data: dict[str, Any], path: str | os.PathLike) -> Path:
    """Write the page atomically (a reader never sees half a file); returns its path."""
    out = Path(path).expanduser()
    from kolm_ray.errors import KolmError

    if not out.parent.is_dir():
        raise KolmError(f"--html: directory {out.parent} does not exist")
    text = render(data)
    fd, tmp = tempfile.mkstemp(prefix=".report-", suffix=".html", dir=out.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        os.replace(tmp, out)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return out
