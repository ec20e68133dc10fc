"""Phase 3 of benchmarks/recall.py: the held-out queries every phase draws from, and the served form's
reliability on them.

Held-out queries: CLINC150 test for a CLINC150-domain tagger (benchmarks/compile_tagger.py), fresh stand-in
workload queries for the demo's support-namespace tagger; CLINC150's oos_test as out-of-scope queries either
way. Calibration: a reliability diagram of the served form's confidence, its ECE and Brier score, and the
share of in-scope and out-of-scope queries routed broad (confidence below 0.7).
"""

from __future__ import annotations

import functools
import json
import random
from pathlib import Path
from typing import Any

CLINC = Path(__file__).resolve().parent.parent.parent / "shared" / "datasets" / "clinc150"


def clinc_queries(n: int, seed: int = 0) -> tuple[list[str], list[str], list[str]]:
    """(queries, gold domains) from CLINC150 test, plus out-of-scope queries; [] when the set is absent."""
    if not (CLINC / "data_full.json").exists():
        return [], [], []
    data = json.loads((CLINC / "data_full.json").read_text())
    domain = {i: d for d, intents in _clinc_domains().items() for i in intents}
    rng = random.Random(seed)
    test = rng.sample(data["test"], min(n, len(data["test"])))
    oos = [t for t, _ in rng.sample(data["oos_test"], min(n // 5, len(data["oos_test"])))]
    return [t for t, _ in test], [domain[i] for _, i in test], oos


def held_out_queries(labels: list[str], n: int, seed: int = 0) -> tuple[list[str], list[str], list[str], str]:
    """Labelled queries the artifact never saw, for its own namespaces: (queries, gold, out_of_scope, source).

    A CLINC150-domain artifact (benchmarks/compile_tagger.py) gets CLINC150 test queries; the demo's
    support-namespace artifact gets fresh queries from the stand-in workload (a seed `make demo` never uses).
    Out-of-scope queries are CLINC150's oos_test either way: they belong to no namespace of either tagger.
    """
    queries, gold, oos = clinc_queries(n, seed)
    if queries and set(labels) <= set(_clinc_domains()):
        return queries, gold, oos, "clinc150 test"
    from kolm_ray.demo.simulate.workload import generate_workload

    items = [w for w in generate_workload(n, seed=90_000 + seed, noise=0.0) if w.namespace in labels]
    return [w.query for w in items], [w.namespace for w in items], oos, "stand-in workload (fresh seed)"


@functools.cache
def _clinc_domains() -> dict[str, list[str]]:
    """CLINC150 domain -> its intents ({} when the data set is absent)."""
    path = CLINC / "domains.json"
    return json.loads(path.read_text()) if path.exists() else {}


def phase_calibration(fast, n: int) -> dict[str, Any]:
    """Reliability of the served form's confidence on held-out queries (all namespaces allowed)."""
    queries, gold, oos, source = held_out_queries(fast.labels, n)
    if not queries:
        return {"skipped": "no held-out queries for these namespaces"}
    everyone = [fast.labels] * len(queries)
    answers = []
    for i in range(0, len(queries), 64):
        answers += fast.score(queries[i : i + 64], everyone[i : i + 64])
    conf = [a["confidence"] for a in answers]
    right = [a["namespace"] == g for a, g in zip(answers, gold, strict=True)]
    oos_answers = []
    for i in range(0, len(oos), 64):
        oos_answers += fast.score(oos[i : i + 64], [fast.labels] * len(oos[i : i + 64]))
    bins = []
    for lo in [i / 10 for i in range(10)]:
        idx = [j for j, c in enumerate(conf) if lo <= c < lo + 0.1 or (lo == 0.9 and c == 1.0)]
        if idx:
            bins.append({"lo": lo, "hi": round(lo + 0.1, 1), "n": len(idx),
                         "confidence": sum(conf[j] for j in idx) / len(idx),
                         "accuracy": sum(right[j] for j in idx) / len(idx)})  # fmt: skip
    ece = sum(b["n"] * abs(b["confidence"] - b["accuracy"]) for b in bins) / len(conf)
    narrow = [j for j, c in enumerate(conf) if c >= 0.7]
    return {
        "source": source,
        "n": len(queries),
        "accuracy": sum(right) / len(right),
        "ece": ece,
        "brier": sum((c - r) ** 2 for c, r in zip(conf, right, strict=True)) / len(conf),
        "fallback_share_in_scope": 1 - len(narrow) / len(conf),
        "narrow_accuracy": sum(right[j] for j in narrow) / len(narrow) if narrow else None,
        "fallback_share_out_of_scope": sum(a["confidence"] < 0.7 for a in oos_answers)
        / max(len(oos_answers), 1),
        "n_out_of_scope": len(oos_answers),
        "bins": bins,
    }


def plot_reliability(cal: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax, hx) = plt.subplots(2, 1, figsize=(5.5, 6), gridspec_kw={"height_ratios": [3, 1]}, sharex=True)
    ax.plot([0, 1], [0, 1], "k--", linewidth=1, label="perfect calibration")
    xs = [b["confidence"] for b in cal["bins"]]
    ax.plot(xs, [b["accuracy"] for b in cal["bins"]], "o-", label="served tagger")
    ax.axvline(0.7, color="red", alpha=0.5, linewidth=1, label="broad below 0.7")
    ax.set_ylabel("accuracy")
    ax.set_title(f"namespace tagger, {cal['source']} (n={cal['n']}, ECE={cal['ece']:.3f})", fontsize=9)
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    hx.bar([(b["lo"] + b["hi"]) / 2 for b in cal["bins"]], [b["n"] for b in cal["bins"]], width=0.09)
    hx.set_xlabel("confidence")
    hx.set_ylabel("queries")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
