"""`kolm report`: what each namespace spent upstream, what its local answers saved, and whether it drifts.

    kolm report                         # a table
    kolm report --namespace support --json
    kolm report --html report.html      # one self-contained page: plots as inline SVG (matplotlib)

    {"namespaces": [{"name", "calls", "upstream_calls", "local_calls", "spend_usd", "saved_usd",
                     "live_agreement", "k_floor", "drift"}], "prices": "<file>", "since": "<first call>",
     "unpriced": {"model": calls}}

- calls = upstream_calls + local_calls. Upstream calls are the captured OpenAI/Anthropic calls, shadow
  re-asks included (they are billed); imports are not calls.
- spend_usd = the sum over upstream calls of usage x the price of the response's model (prices.py):
  OpenAI prompt/completion tokens, Anthropic input/output tokens (cache tokens are not priced). A call
  without usage (a stream without `include_usage`) and a model without a price add 0; the latter is
  listed under `unpriced` with its call count.
- saved_usd = what the local calls would have cost upstream. A local answer's usage is 0 (nothing billed),
  so its upstream-equivalent tokens are the mean input and output tokens of the namespace's upstream
  calls with usage to the same requested model and of the same request shape (request_shape.shape_key:
  the same system prompt and response format, so the same prompt overhead and the same kind of answer),
  falling back to the same model in any shape, then to the whole namespace; priced at the requested
  model's rate.
- live_agreement / drift: drift.py (the last 100 comparable shadow pairs of the live version).
- Net savings (compute_prices.py, configs/compute_prices.yaml: $ per CPU-hour and GPU-hour):
  compile_usd = every registered version's measured compile compute (manifest metrics.compute: cpu_s
  priced per CPU-hour, gpu_s per GPU-hour); serving_usd = the local model's CPU time in the proxy
  (usage.kolm_local_cpu_ms of local answers and of calls it tried and sent upstream) per CPU-hour;
  net_saved_usd = saved_usd - compile_usd - serving_usd. break_even_calls: local answers needed for
  the savings to pay the compiles, ceil(compile_usd / ((saved_usd - serving_usd) / local_calls)); null
  before any local answer or while a local answer saves less than it costs. `compute_prices` names the
  table used. coverage / answered_accuracy: the live model's selective gate at compile
  (compile/selective.py). Compiles whose candidate was never promoted are not in the registry and are
  not counted.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections import defaultdict
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any

from kolm_ray.loop.compute_prices import ComputePrices, load_compute_prices
from kolm_ray.loop.prices import PriceTable, load_prices
from kolm_ray.observations.store.base import portable_sql

UPSTREAM = ("openai", "anthropic")


def tokens_of(usage: dict[str, Any] | None) -> tuple[int, int] | None:
    """(input, output) tokens from an OpenAI or Anthropic usage object; None when it carries none."""
    if not isinstance(usage, dict):
        return None
    pairs = (("prompt_tokens", "completion_tokens"), ("input_tokens", "output_tokens"))
    for i, o in pairs:
        if isinstance(usage.get(i), (int, float)) or isinstance(usage.get(o), (int, float)):
            return int(usage.get(i) or 0), int(usage.get(o) or 0)
    return None


@dataclass
class _Means:
    """Running sums of tokens per key, for the upstream-equivalent of a local call."""

    sums: dict[Any, list[int]] = field(default_factory=lambda: defaultdict(lambda: [0, 0, 0]))

    def add(self, key: Any, tok: tuple[int, int]) -> None:
        s = self.sums[key]
        s[0], s[1], s[2] = s[0] + tok[0], s[1] + tok[1], s[2] + 1

    def mean(self, *keys: Any) -> tuple[Decimal, Decimal] | None:
        for k in keys:
            s = self.sums.get(k)
            if s and s[2]:
                return Decimal(s[0]) / s[2], Decimal(s[1]) / s[2]
        return None


@dataclass
class NamespaceReport:
    name: str
    upstream_calls: int = 0
    local_calls: int = 0
    spend: Decimal = Decimal(0)
    saved: Decimal = Decimal(0)
    days: dict[str, dict[str, Any]] = field(default_factory=dict)  # minute -> {upstream, local, spend, saved}
    live_agreement: float | None = None
    pairs: int = 0
    k_floor: float | None = None
    drift: bool = False
    state: str = "ok"
    live: str | None = None
    agreement_series: list[tuple[str, float]] = field(default_factory=list)
    promotions: list[tuple[str, str]] = field(default_factory=list)
    local_cpu_ms: float = 0.0
    compile_cpu_s: float = 0.0
    compile_gpu_s: float = 0.0
    compile_usd: Decimal = Decimal(0)
    serving_usd: Decimal = Decimal(0)
    coverage: float | None = None
    answered_accuracy: float | None = None

    @property
    def net(self) -> Decimal:
        return self.saved - self.compile_usd - self.serving_usd

    def break_even_calls(self) -> int | None:
        """Local answers needed for their savings (net of serving) to pay the compiles."""
        if not self.local_calls:
            return None
        margin = (self.saved - self.serving_usd) / self.local_calls
        if margin <= 0:
            return None
        return math.ceil(self.compile_usd / margin)

    def day(self, created_at: str) -> dict[str, Any]:
        return self.days.setdefault(
            created_at[:16], {"upstream": 0, "local": 0, "spend": Decimal(0), "saved": Decimal(0)}
        )

    def public(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "calls": self.upstream_calls + self.local_calls,
            "upstream_calls": self.upstream_calls,
            "local_calls": self.local_calls,
            "spend_usd": _usd(self.spend),
            "saved_usd": _usd(self.saved),
            "live_agreement": None if self.live_agreement is None else round(self.live_agreement, 4),
            "k_floor": self.k_floor,
            "drift": self.drift,
            "coverage": self.coverage,
            "answered_accuracy": self.answered_accuracy,
            "compile_cpu_s": round(self.compile_cpu_s, 3),
            "compile_gpu_s": round(self.compile_gpu_s, 3),
            "local_cpu_s": round(self.local_cpu_ms / 1000, 3),
            "compile_usd": _usd(self.compile_usd),
            "serving_usd": _usd(self.serving_usd),
            "net_saved_usd": _usd(self.net),
            "break_even_calls": self.break_even_calls(),
        }


def _usd(d: Decimal) -> float:
    return float(round(d, 8))


def _model_of(request: dict[str, Any] | None, model: str | None) -> str | None:
    req = request.get("model") if isinstance(request, dict) else None
    return req if isinstance(req, str) and req else model


def build_report(
    store: Any, prices: PriceTable, namespace: str | None = None, compute: ComputePrices | None = None
) -> dict[str, Any]:
    """The report's data: `public` (the contract's JSON) and the per-namespace details the HTML plots.
    `compute`: the $/CPU-hour, $/GPU-hour table (default: load_compute_prices())."""
    compute = compute or load_compute_prices()
    from kolm_ray import registry
    from kolm_ray.observations.request_shape import shape_key, shape_of_request
    from kolm_ray.registry import drift

    sql = (
        "SELECT namespace, provider, model, usage, created_at, request FROM observations"
        " WHERE provider IN ('openai', 'anthropic', 'local')"
    )
    params: tuple = ()
    if namespace is not None:
        sql += " AND namespace = ?"
        params = (namespace,)
    sql = portable_sql(store, sql + " ORDER BY seq")
    reports: dict[str, NamespaceReport] = {}
    means: dict[str, _Means] = defaultdict(_Means)
    locals_: list[tuple[str, str, str | None, str]] = []  # (ns, created_at, model, shape key)
    unpriced: dict[str, int] = defaultdict(int)
    since: str | None = None
    for ns, provider, model, usage_json, created_at, request_json in store._read().execute(sql, params):
        since = created_at if since is None or created_at < since else since
        r = reports.setdefault(ns, NamespaceReport(ns))
        request = json.loads(request_json) if request_json else None
        day = r.day(created_at)
        usage = json.loads(usage_json) if usage_json else None
        cpu_ms = usage.get("kolm_local_cpu_ms") if isinstance(usage, dict) else None
        if isinstance(cpu_ms, (int, float)) and not isinstance(cpu_ms, bool) and cpu_ms >= 0:
            r.local_cpu_ms += cpu_ms
            day["serving"] = day.get("serving", Decimal(0)) + compute.cost(cpu_s=cpu_ms / 1000)
        if provider == "local":
            r.local_calls += 1
            day["local"] += 1
            key = shape_key(shape_of_request(request))
            locals_.append((ns, created_at, _model_of(request, None), key))
            continue
        r.upstream_calls += 1
        day["upstream"] += 1
        tok = tokens_of(usage)
        priced_model = model or _model_of(request, None)
        if prices.key_for(priced_model) is None:
            unpriced[priced_model or "(no model)"] += 1
        if tok is None:
            continue
        cost = prices.cost(priced_model, *tok) or Decimal(0)
        r.spend += cost
        day["spend"] += cost
        req_model = _model_of(request, model)
        m = means[ns]
        m.add((req_model, shape_key(shape_of_request(request))), tok)
        m.add((req_model,), tok)
        m.add((), tok)
    for ns, created_at, model, key in locals_:
        eq = means[ns].mean((model, key), (model,), ())
        if eq is None:
            continue
        cost = prices.cost(model, *eq)
        if cost is None:
            unpriced[model or "(no model)"] += 1
            continue
        reports[ns].saved += cost
        reports[ns].day(created_at)["saved"] += cost
    live = registry.live_models(store)
    for ns, row in live.items():
        if namespace is not None and ns != namespace:
            continue
        r = reports.setdefault(ns, NamespaceReport(ns))
        r.state, r.live_agreement, r.pairs = drift.namespace_state(store, row)
        r.k_floor, r.drift, r.live = row.k_floor, r.state != "ok", row.label
        r.agreement_series = _rolling(
            [p for p in registry.shadow_pairs(store, ns) if p["version"] == row.version]
        )
    for m in registry.list_models(store, namespace):
        r = reports.setdefault(m.namespace, NamespaceReport(m.namespace))
        r.promotions.append((m.promoted_at, m.label))
        metrics = registry.manifest_metrics(m.path)
        used = metrics.get("compute") if isinstance(metrics.get("compute"), dict) else {}
        cpu, gpu = (float(used.get(k) or 0.0) for k in ("cpu_s", "gpu_s"))
        r.compile_cpu_s += cpu
        r.compile_gpu_s += gpu
        r.compile_usd += compute.cost(cpu_s=cpu, gpu_s=gpu)
        if m.live:
            r.coverage, r.answered_accuracy = metrics.get("coverage"), metrics.get("answered_accuracy")
    for r in reports.values():
        r.serving_usd = compute.cost(cpu_s=r.local_cpu_ms / 1000)
    ordered = [reports[k] for k in sorted(reports)]
    public = {
        "namespaces": [r.public() for r in ordered],
        "prices": prices.path,
        "since": since,
        "unpriced": dict(sorted(unpriced.items())),
        "compute_prices": compute.public(),
    }
    return {"public": public, "details": ordered, "prices_taken": prices.taken}


def _rolling(pairs: list[dict[str, Any]]) -> list[tuple[str, float]]:
    """Agreement over the trailing drift.WINDOW comparable pairs, at each pair: the plot's line."""
    from kolm_ray.registry.drift import WINDOW

    known = [(p["created_at"], 1 if p["agree"] else 0) for p in pairs if p["agree"] is not None]
    out, total = [], 0
    for i, (t, a) in enumerate(known):
        total += a
        if i >= WINDOW:
            total -= known[i - WINDOW][1]
        out.append((t, total / min(i + 1, WINDOW)))
    return out


def report_command(args: argparse.Namespace) -> int:
    """kolm report [--namespace NS] [--json] [--html FILE] [--prices FILE] [--store URL]."""
    from kolm_ray.errors import KolmError
    from kolm_ray.observations.model import check_namespace
    from kolm_ray.observations.store import open_store

    if args.namespace is not None:
        try:
            check_namespace(args.namespace)
        except ValueError as e:
            raise KolmError(f"--namespace: {e}") from None
    prices = load_prices(args.prices)
    compute = load_compute_prices(getattr(args, "compute_prices", None))
    store = open_store(args.store)
    try:
        data = build_report(store, prices, args.namespace, compute)
    finally:
        store.close()
    if args.namespace is not None and not data["public"]["namespaces"]:
        raise KolmError(f"namespace {args.namespace!r} has no calls and no model in this store")
    if args.html:
        from kolm_ray.loop.report_html import write_html

        path = write_html(data, args.html)
        print(f"wrote {path}", file=sys.stderr if args.json else sys.stdout)
    if args.json:
        print(json.dumps(data["public"], indent=2))
    elif not args.html:
        _table(data["public"])
    return 0


def _table(public: dict[str, Any]) -> None:
    print(
        f"{'namespace':<20} {'calls':>8} {'upstream':>8} {'local':>8} {'spend $':>11} {'saved $':>11}"
        f" {'compute $':>10} {'net $':>11} {'break-even':>10} {'agree':>6} {'floor':>6} {'answered':>8}"
        f" {'coverage':>8}  drift"
    )
    for n in public["namespaces"]:
        a, f, acc, cov = (
            "-" if n[k] is None else f"{n[k]:.3f}"
            for k in ("live_agreement", "k_floor", "answered_accuracy", "coverage")
        )
        be = "-" if n["break_even_calls"] is None else str(n["break_even_calls"])
        print(
            f"{n['name']:<20} {n['calls']:>8} {n['upstream_calls']:>8} {n['local_calls']:>8}"
            f" {n['spend_usd']:>11.4f} {n['saved_usd']:>11.4f} {n['compile_usd'] + n['serving_usd']:>10.4f}"
            f" {n['net_saved_usd']:>11.4f} {be:>10} {a:>6} {f:>6} {acc:>8} {cov:>8}  {'DRIFT' if n['drift'] else '-'}"
        )
    if public["unpriced"]:
        listed = ", ".join(f"{m} ({c})" for m, c in public["unpriced"].items())
        print(f"unpriced models (priced 0): {listed}")
    print(f"prices: {public['prices']}   since: {public['since'] or '-'}")
    cp = public["compute_prices"]
    print(
        f"compute prices: {cp['file']} (taken {cp['taken'] or '?'}): ${cp['cpu_hour_usd']:g} per CPU-hour,"
        f" ${cp['gpu_hour_usd']:g} per GPU-hour; compute $ = compiles + the local model's CPU time"
    )
