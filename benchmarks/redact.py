"""PII redaction: quality on a labelled set, false positives on real intents, and what it costs the proxy.

    python benchmarks/redact.py                  # -> benchmarks/results/redact.json + redact.png (~2 min)
    python benchmarks/redact.py --duration 5     # shorter hey runs

1. Quality (benchmarks/data/pii_labelled.jsonl, built by make_pii_set.py with a fixed seed): the phone
   leniency is chosen on the validation half (best F1, ties to the most lenient: recall is what privacy
   needs), then precision and recall per kind are reported on the test half. A prediction counts when
   it covers a labelled span of the same kind.
2. False positives per 10,000 inputs of CLINC150 and SNIPS (/work/shared/datasets): text with no PII
   in it, full of times, dates, counts and numbers, so every span found there is a false positive.
3. Cost at the proxy: the stand-in upstream (20 ms per answer), `hey` at 200 rps with a 2 KB body that
   holds PII, straight to the upstream, then through `kolm capture` without and with `--redact pii`
   (two proxies, order alternated each round, same run). Redaction runs in the writer thread, after the answer has
   gone, so what the client can see is the writer's CPU competing with the event loop; its own cost per
   body is timed in-process too. The machine is shared: os.getloadavg() is recorded before and after.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import phonenumbers  # noqa: E402
from capture import free_port, hey, stored, wait_healthy  # noqa: E402

from kolm_ray.providers import pii  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "benchmarks" / "results"
LABELLED = REPO / "benchmarks" / "data" / "pii_labelled.jsonl"
DATASETS = REPO.parent / "shared" / "datasets"
TARGET = {"rate": 200, "body_bytes": 2048, "added_p50_ms": 0.5}
LENIENCIES = ["POSSIBLE", "VALID", "STRICT_GROUPING", "EXACT_GROUPING"]  # most to least lenient


def score(items: list[dict]) -> dict[str, dict]:
    tp, pred, gold = Counter(), Counter(), Counter()
    for it in items:
        got = pii.find_pii(it["text"])
        for g in it["spans"]:
            gold[g[2]] += 1
        for s, e, k in got:
            pred[k] += 1
            tp[k] += any(k == g[2] and s <= g[0] and e >= g[1] for g in it["spans"])
    out = {}
    for k in (*pii.KINDS, "all"):
        t = sum(tp.values()) if k == "all" else tp[k]
        p = sum(pred.values()) if k == "all" else pred[k]
        g = sum(gold.values()) if k == "all" else gold[k]
        prec, rec = t / p if p else 1.0, t / g if g else 1.0
        f1 = 2 * prec * rec / (prec + rec) if prec + rec else 0.0
        out[k] = {"precision": round(prec, 4), "recall": round(rec, 4), "f1": round(f1, 4), "tp": t,
                  "predicted": p, "labelled": g}  # fmt: skip
    return out


def quality() -> dict:
    items = [json.loads(line) for line in LABELLED.read_text(encoding="utf-8").splitlines()]
    val = [it for it in items if it["split"] == "validation"]
    test = [it for it in items if it["split"] == "test"]
    chosen, by_leniency = None, {}
    default = pii.PHONE_LENIENCY
    try:
        for name in LENIENCIES:
            pii.set_phone_leniency(getattr(phonenumbers.Leniency, name))
            by_leniency[name] = score(val)["all"]
        best = max(v["f1"] for v in by_leniency.values())
        chosen = next(n for n in LENIENCIES if by_leniency[n]["f1"] == best)
        pii.set_phone_leniency(getattr(phonenumbers.Leniency, chosen))
        test_scores = score(test)
    finally:
        pii.set_phone_leniency(default)
    return {
        "items": len(items),
        "labelled_spans": sum(len(it["spans"]) for it in items),
        "hard_negatives": sum(1 for it in items if not it["spans"]),
        "validation": {"items": len(val), "by_phone_leniency": by_leniency, "chosen": chosen},
        "shipped_leniency": next(n for n in LENIENCIES if getattr(phonenumbers.Leniency, n) == default),
        "test": {"items": len(test), **test_scores},
    }


def intents() -> list[str]:
    clinc = json.loads((DATASETS / "clinc150" / "data_full.json").read_text())
    texts = [t for split in clinc.values() for t, _ in split]
    for path in sorted((DATASETS / "snips").glob("*.json")):
        for rows in json.loads(path.read_text(encoding="latin-1")).values():
            texts += ["".join(piece["text"] for piece in row["data"]) for row in rows]
    return texts


def false_positives() -> dict:
    texts = intents()
    found: Counter = Counter()
    examples = []
    t0 = time.perf_counter()
    for text in texts:
        for s, e, kind in pii.find_pii(text):
            found[kind] += 1
            if len(examples) < 25:
                examples.append({"text": text, "span": text[s:e], "kind": kind})
    secs = time.perf_counter() - t0
    n = len(texts)
    return {
        "inputs": n,
        "sources": ["clinc150 (all splits)", "snips (train + validate)"],
        "spans_found": sum(found.values()),
        "per_10k_inputs": round(sum(found.values()) / n * 10_000, 2),
        "per_10k_by_kind": {k: round(found[k] / n * 10_000, 2) for k in pii.KINDS},
        "examples": examples,
        "us_per_input": round(secs / n * 1e6, 2),
    }


def body_2kb() -> dict:
    filler = (
        "The export job failed again overnight and the dashboard still shows last week's numbers. "
        "We restarted the worker twice, cleared the cache and re-ran the backfill for 2024-03-15. "
    )
    user = (
        "Hi, this is Jane Doe (jane.doe@example.com, +1 415 555 0100). My card 4111 1111 1111 1111 was "
        "charged twice for order 4829301756. "
    )
    content = user
    while (
        len(json.dumps({"model": "gpt-4o-mini", "messages": [{"role": "user", "content": content}]})) < 2000
    ):
        content += filler
    body = {"model": "gpt-4o-mini", "messages": [{"role": "system", "content": "Answer JSON."},
            {"role": "user", "content": content}], "max_tokens": 20}  # fmt: skip
    while len(json.dumps(body)) > TARGET["body_bytes"]:
        body["messages"][1]["content"] = body["messages"][1]["content"][:-1]
    return body


def writer_cost(body: dict, n: int = 300) -> dict:
    """What redaction adds to the writer's work per observation of this body (input, output and request)."""
    text = body["messages"][1]["content"]
    pii.redact_pii_json(body)  # phonenumbers loads its metadata on first use
    clean = {
        "model": "gpt-4o-mini",
        "messages": [{"role": "user", "content": "no digits or addresses " * 80}],
    }
    out = {}
    for name, work in (
        ("with_pii", lambda: (pii.redact_pii(text), pii.redact_pii_json(body))),
        ("with_pii_uncached", lambda: (pii._numbers_in.cache_clear(), pii._phones_in.cache_clear(),
                                       pii.redact_pii(text), pii.redact_pii_json(body))),
        ("without_candidates", lambda: pii.redact_pii_json(clean)),
    ):  # fmt: skip
        w0, c0 = time.perf_counter(), time.process_time()
        for _ in range(n):
            work()
        out[f"{name}_wall_ms"] = round((time.perf_counter() - w0) / n * 1000, 4)
        out[f"{name}_cpu_ms"] = round((time.process_time() - c0) / n * 1000, 4)
    out["what"] = "one observation of the 2 KB body: its input text and its request JSON, redacted"
    return out


def start_proxy(home: Path, up_url: str, redact: bool) -> tuple[subprocess.Popen, str, Path]:
    import re

    env = {**os.environ, "KOLM_HOME": str(home), "PYTHONUNBUFFERED": "1"}
    env.pop("KOLM_ADMIN_TOKEN", None)
    db = home / "observations.db"
    cmd = [sys.executable, "-m", "kolm_ray.cli", "capture", "--port", "0", "--store", f"sqlite:///{db}"]
    cmd += ["--openai-upstream", up_url, "--anthropic-upstream", up_url] + (
        ["--redact", "pii"] if redact else []
    )
    proc = subprocess.Popen(
        cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, cwd=REPO
    )
    m = re.search(r"http://127\.0\.0\.1:(\d+)", proc.stdout.readline())
    if not m:
        raise RuntimeError("proxy did not start")
    url = f"http://127.0.0.1:{m.group(1)}"
    wait_healthy(url)
    return proc, url, db


def latency(duration: float, body: dict, n_rounds: int = 3) -> dict:
    import shutil

    if shutil.which("hey") is None:
        raise SystemExit("benchmarks/redact.py needs `hey` (apt-get install -y hey)")
    tmp = Path(tempfile.mkdtemp(prefix="kolm-redact-bench-"))
    body_file = tmp / "body.json"
    body_file.write_text(json.dumps(body))
    up_port = free_port()
    env = {**os.environ, "KOLM_HOME": str(tmp)}
    upstream = subprocess.Popen(
        [sys.executable, "-m", "kolm_ray.demo.simulate", "upstream", "--port", str(up_port), "--latency-ms", "20"],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=REPO,
    )  # fmt: skip
    up_url = f"http://127.0.0.1:{up_port}"
    procs = [upstream]
    try:
        wait_healthy(up_url)
        (tmp / "off").mkdir()
        (tmp / "on").mkdir()
        off, off_url, off_db = start_proxy(tmp / "off", up_url, redact=False)
        procs.append(off)
        on, on_url, on_db = start_proxy(tmp / "on", up_url, redact=True)
        procs.append(on)
        rate = TARGET["rate"]
        path = "/v1/chat/completions"
        for url in (up_url, off_url, on_url):  # warm all three (and phonenumbers' metadata), discarded
            hey(
                url + ("/v1/capture/openai/chat/completions" if url != up_url else path),
                body_file,
                50,
                16,
                2,
                "warm",
            )
        rounds = []
        for i in range(n_rounds):
            r = {"direct": hey(up_url + path, body_file, rate, 16, duration, "direct")}
            for name, url in (
                (("off", off_url), ("on", on_url)) if i == 0 else (("on", on_url), ("off", off_url))
            ):
                r[name] = hey(
                    f"{url}/v1/capture/openai/chat/completions", body_file, rate, 16, duration, f"r{i}"
                )
            for name in ("off", "on"):
                r[name]["added_p50_ms"] = round(r[name]["p50_ms"] - r["direct"]["p50_ms"], 3)
                r[name]["added_p99_ms"] = round(r[name]["p99_ms"] - r["direct"]["p99_ms"], 3)
            rounds.append(r)
        for url in (off_url, on_url):
            wait_healthy(url, pending_zero=True)
        import sqlite3

        with sqlite3.connect(f"file:{on_db}?mode=ro", uri=True) as c:
            raw_left = c.execute(
                "SELECT COUNT(*) FROM observations WHERE input LIKE '%jane.doe@%'"
            ).fetchone()[0]
        stored_rows = {
            side: sum(stored(db, f"r{i}") for i in range(n_rounds))
            for side, db in (("off", off_db), ("on", on_db))
        }
        answered = {side: sum(r[side]["ok"] for r in rounds) for side in ("off", "on")}
    finally:
        for p in reversed(procs):
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
                try:
                    p.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    p.kill()
    mean = lambda key, side: round(sum(r[side][key] for r in rounds) / len(rounds), 3)  # noqa: E731
    return {
        "rate_rps": rate,
        "connections": 16,
        "seconds_per_run": duration,
        "body_bytes": len(json.dumps(body)),
        "upstream_latency_ms": 20,
        "rounds": rounds,
        "added_p50_ms": {"off": mean("added_p50_ms", "off"), "on": mean("added_p50_ms", "on")},
        "added_p99_ms": {"off": mean("added_p99_ms", "off"), "on": mean("added_p99_ms", "on")},
        "redaction_cost_p50_ms": round(mean("p50_ms", "on") - mean("p50_ms", "off"), 3),
        "redaction_cost_p99_ms": round(mean("p99_ms", "on") - mean("p99_ms", "off"), 3),
        "stored": stored_rows,
        "answered_200": answered,
        "unredacted_rows_with_redaction_on": raw_left,
    }


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4))
    kinds = list(pii.KINDS)
    test = result["quality"]["test"]
    x = range(len(kinds))
    a.bar([i - 0.2 for i in x], [test[k]["precision"] for k in kinds], 0.4, label="precision")
    a.bar([i + 0.2 for i in x], [test[k]["recall"] for k in kinds], 0.4, label="recall")
    a.set(
        xticks=list(x), xticklabels=kinds, ylim=(0, 1.05), title=f"labelled test half ({test['items']} items)"
    )
    a.legend(loc="lower right")
    lat = result["latency"]
    sides = ["direct", "off", "on"]
    p50 = [sum(r[s]["p50_ms"] for r in lat["rounds"]) / len(lat["rounds"]) for s in sides]
    p99 = [sum(r[s]["p99_ms"] for r in lat["rounds"]) / len(lat["rounds"]) for s in sides]
    b.bar([i - 0.2 for i in range(3)], p50, 0.4, label="p50")
    b.bar([i + 0.2 for i in range(3)], p99, 0.4, label="p99")
    b.set(xticks=range(3), xticklabels=["upstream direct", "proxy, redact off", "proxy, --redact pii"],
          ylabel="latency (ms)", title=f"hey {lat['rate_rps']} rps, {lat['body_bytes']} B body, load {result['load_before'][0]:.1f}")  # fmt: skip
    b.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--duration", type=float, default=8.0, help="seconds per hey run (default 8)")
    p.add_argument(
        "--rounds", type=int, default=3, help="direct/off/on rounds, order alternating (default 3)"
    )
    p.add_argument("--no-latency", action="store_true", help="quality and false positives only")
    args = p.parse_args()
    result: dict = {"target": TARGET, "load_before": os.getloadavg(), "cpus": os.cpu_count()}
    result["quality"] = quality()
    result["false_positives"] = false_positives()
    body = body_2kb()
    result["writer_cost"] = writer_cost(body)
    if not args.no_latency:
        result["latency"] = latency(args.duration, body, args.rounds)
        result["meets_target"] = result["latency"]["redaction_cost_p50_ms"] <= TARGET["added_p50_ms"]
    result["load_after"] = os.getloadavg()
    result["note"] = (
        "measured on a shared 2-core machine with other engineers' jobs running (see load_before/after); "
        "latency rounds alternate off/on so drift hits both"
    )
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "redact.json").write_text(json.dumps(result, indent=2) + "\n")
    if "latency" in result:
        plot(result, RESULTS / "redact.png")
    print(
        json.dumps({k: result[k] for k in result if k not in ("quality", "false_positives")}, indent=1)[:3000]
    )
    print("test half:", {k: (v["precision"], v["recall"]) for k, v in result["quality"]["test"].items()
                         if isinstance(v, dict)})  # fmt: skip
    print("false positives per 10k:", result["false_positives"]["per_10k_inputs"])


if __name__ == "__main__":
    main()
