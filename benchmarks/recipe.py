"""Recipe benchmark: production-like traffic built from CLINC150, clustered and turned into recipes.

    .venv/bin/python benchmarks/recipe.py                  # ~7,500 observations, 1 and 2 Ray workers
    .venv/bin/python benchmarks/recipe.py --per-task 400   # quicker
    .venv/bin/python benchmarks/recipe.py --compile        # also compile every tagger recipe (minilm-l6)

Traffic: three namespaces, seven tasks. Each task is an intent task with JSON outputs behind its own
system prompt / response format (templated: dates vary), some share a namespace; labels are flipped to
another label of the same task at known rates; 3% of queries repeat; 2% of calls are upstream errors
(verified=false). The data is read from ../shared/datasets/clinc150 and never copied.

Reports (benchmarks/results/recipe.json + recipe.png):
- adjusted Rand index of the clusters against the true tasks, per namespace;
- per cluster: true purity, the estimate (confident learning) and |k_floor - true purity|, against a
  baseline in the same run: purity = plain out-of-fold accuracy of the same classifier;
- dry-run pass rate (`kolm compile --recipe DIR --dry-run` when compile is installed, else
  validate_recipe_dir, which is what it calls);
- seconds per 1,000 observations with 1 and 2 Ray workers (clustering), plus the recipe step.
Targets: dry-run 100%; k-floor within 0.05 of true purity on >= 95% of clusters; <= 2 s per 1,000.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import tempfile
import time
from collections import Counter, defaultdict
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

ROOT = Path(__file__).resolve().parents[1]
DATA = Path(os.environ.get("KOLM_CLINC", ROOT.parent / "shared" / "datasets" / "clinc150"))
RESULTS = ROOT / "benchmarks" / "results"

# (namespace, task, domains, output field, noise rate, request template). {d} = day of month.
TASKS = [
    ("assistant", "banking-intent", ["banking"], "intent", 0.10,
     {"messages": [{"role": "system", "content": "You classify banking requests. Today is 2024-05-{d}. Reply JSON {{\"intent\": ...}}."}]}),
    ("assistant", "namespace-router", None, "namespace", 0.0,
     {"messages": [{"role": "system", "content": "Route the query to one knowledge namespace."}],
      "response_format": {"type": "json_object"}}),
    ("assistant", "travel-intent", ["travel"], "intent+confidence", 0.20,
     {"system": "Travel desk triage ({d} May). Answer with the intent and your confidence."}),
    ("home-bot", "home-intent", ["home"], "intent", 0.05, None),
    ("home-bot", "kitchen-intent", ["kitchen_and_dining"], "intent", 0.15,
     {"messages": [{"role": "developer", "content": "Kitchen assistant intent tagger, session {d}."}],
      "response_format": {"type": "json_object"}}),
    ("ops", "auto-utility-intent", ["auto_and_commute", "utility"], "intent+domain", 0.10,
     {"messages": [{"role": "system", "content": "Tag the commuter/utility request with intent and domain."}]}),
    ("ops", "work-intent", ["work"], "intent", 0.0, {"system": "Workplace helpdesk classifier."}),
]  # fmt: skip
REPEAT = 0.03  # share of queries that repeat verbatim (same answer)
ERRORS = 0.02  # share of calls that failed upstream (verified=false)


def build_traffic(per_task: int, seed: int = 0) -> tuple[list, dict]:
    """Observations (as dicts) and the truth: task per id, correct output per id."""
    data = json.loads((DATA / "data_full.json").read_text())
    domains = json.loads((DATA / "domains.json").read_text())
    domain_of = {i: d for d, intents in domains.items() for i in intents}
    pool = defaultdict(list)
    for split in ("train", "val", "test"):
        for text, intent in data[split]:
            pool[domain_of[intent]].append((text, intent))
    rng = random.Random(seed)
    for rows in pool.values():
        rng.shuffle(rows)
    taken = Counter()
    observations, truth = [], {}
    for ns, task, doms, kind, noise, template in TASKS:
        doms = doms or list(domains)
        rows = []
        for k in range(per_task):
            d = doms[k % len(doms)]
            rows.append(pool[d][taken[d] % len(pool[d])])
            taken[d] += 1
        labels = sorted({i for d in doms for i in domains[d]}) if kind != "namespace" else sorted(doms)
        flips = set(rng.sample(range(len(rows)), round(noise * len(rows))))
        for k, (text, intent) in enumerate(rows):
            true_label = domain_of[intent] if kind == "namespace" else intent
            label = rng.choice([x for x in labels if x != true_label]) if k in flips else true_label
            out, correct = _outputs(kind, label, true_label, domain_of, rng)
            req = _request(template, text, rng)
            oid = f"{task}-{k:05d}"
            observations.append({"id": oid, "namespace": ns, "input": text, "output": out, "verified": None,
                                 "request": req, "provider": "openai" if req and "messages" in req else "import"})  # fmt: skip
            truth[oid] = (task, correct)
            if rng.random() < REPEAT:  # the same question again, answered the same way
                observations.append({**observations[-1], "id": oid + "-r"})
                truth[oid + "-r"] = (task, correct)
            if rng.random() < ERRORS:
                observations.append({**observations[-1], "id": oid + "-e", "verified": False,
                                     "output": {"error": {"message": "upstream overloaded", "code": 529}}})  # fmt: skip
                truth[oid + "-e"] = (task, None)
    rng.shuffle(observations)
    return observations, truth


def _outputs(kind, label, true_label, domain_of, rng):
    if kind == "namespace":
        return {"namespace": label}, {"namespace": true_label}
    if kind == "intent":
        return {"intent": label}, {"intent": true_label}
    if kind == "intent+domain":
        return {"intent": label, "domain": domain_of[label]}, {
            "intent": true_label,
            "domain": domain_of[true_label],
        }
    conf = round(rng.uniform(0.7, 1.0) if label == true_label else rng.uniform(0.3, 0.8), 2)
    return {"intent": label, "confidence": conf}, {"intent": true_label}


def _request(template, text, rng):
    if template is None:
        return None
    req = json.loads(json.dumps(template).replace("{d}", f"{rng.randint(1, 28):02d}"))
    req["messages"] = [*req.get("messages", []), {"role": "user", "content": text}]
    return req


def _correct(out, correct) -> bool:
    return correct is not None and all(out.get(k) == v for k, v in correct.items())


def dry_run(recipe_dir: str, scratch: Path) -> tuple[bool, str]:
    try:
        import kolm_ray.compile  # noqa: F401
        from kolm_ray.cli import main

        rc = main(["compile", "--recipe", recipe_dir, "--output", str(scratch / "dry.kolm"), "--dry-run"])
        return rc == 0, "kolm compile --recipe DIR --dry-run"
    except ImportError:
        from kolm_ray.errors import KolmError
        from kolm_ray.recipe import validate_recipe_dir

        try:
            validate_recipe_dir(recipe_dir)
            return True, "validate_recipe_dir (kolm_ray.compile not installed)"
        except KolmError:
            return False, "validate_recipe_dir (kolm_ray.compile not installed)"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--per-task", type=int, default=1000)
    ap.add_argument("--workers", default="1,2")
    ap.add_argument(
        "--compile", action="store_true", help="also compile each minilm-l6 recipe and check its K-floor"
    )
    ap.add_argument("--out", default=str(RESULTS))
    args = ap.parse_args()
    if not (DATA / "data_full.json").exists():
        print(f"CLINC150 not found at {DATA} (set KOLM_CLINC)", file=sys.stderr)
        return 2

    import numpy as np
    import ray
    from sklearn.metrics import adjusted_rand_score

    from kolm_ray.clustering import cluster_members, cluster_namespace, cluster_namespaces, onnx_model_path
    from kolm_ray.observations.model import Observation
    from kolm_ray.observations.store import open_store
    from kolm_ray.recipe import recipe_from_observations

    work = Path(tempfile.mkdtemp(prefix="kolm-recipe-bench-"))
    os.environ.setdefault("KOLM_HOME", str(work / "home"))
    observations, truth = build_traffic(args.per_task)
    url = f"sqlite:///{work / 'obs.db'}"
    store = open_store(url)
    store.append_many([Observation(**o) for o in observations])
    store.close()
    namespaces = sorted({o["namespace"] for o in observations})
    by_id = {o["id"]: o for o in observations}
    onnx_model_path()  # build the embedder once, outside the timings
    load_start = os.getloadavg()[0]
    # The work itself, free of other processes' load: CPU seconds of one embedder thread per 1,000 inputs.
    from kolm_ray.clustering import MiniLMEmbedder

    emb1 = MiniLMEmbedder(threads=1)
    sample = [o["input"] for o in observations[:1000]]
    c0 = time.process_time()
    emb1(sample)
    embed_cpu = 1000 * (time.process_time() - c0) / len(sample)
    print(f"{len(observations)} observations, {len(namespaces)} namespaces, {len(TASKS)} tasks -> {work}")

    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    timing, per_namespace = {}, {}
    results = {}
    try:
        for w in [int(x) for x in args.workers.split(",")]:
            # `kolm cluster --namespace A --namespace B ...`: one pass over every namespace
            t = time.perf_counter()
            results[w] = cluster_namespaces(url, namespaces, num_workers=w, summarize=False)
            timing[w] = time.perf_counter() - t
            # `kolm cluster --namespace A`, once per namespace: each call starts its own actor pool
            t = time.perf_counter()
            for ns in namespaces:
                cluster_namespace(url, ns, num_workers=w, summarize=False)
            per_namespace[w] = time.perf_counter() - t
            print(
                f"clustering with {w} worker(s): {timing[w]:.1f}s = {1000 * timing[w] / len(observations):.2f} s/1000"
                f" in one pass; {1000 * per_namespace[w] / len(observations):.2f} s/1000 one namespace at a time"
            )
        final = results[max(results)]
        ari, clusters = {}, []
        t_recipe = 0.0
        for ns in namespaces:
            res = final[ns]
            ids, pred = [], []
            for c in res.clusters:
                members, emb = cluster_members(res, c["id"])
                ids += [m["id"] for m in members]
                pred += [c["id"]] * len(members)
                tasks = Counter(truth[m["id"]][0] for m in members)
                usable = [m for m in members if m["verified"] is not False]
                true_purity = sum(
                    _correct(by_id[m["id"]]["output"], truth[m["id"]][1]) for m in usable
                ) / max(1, len(usable))
                row = {"namespace": ns, "cluster": c["id"], "size": len(members), "task": tasks.most_common(1)[0][0],
                       "task_share": round(tasks.most_common(1)[0][1] / len(members), 4), "true_purity": round(true_purity, 4)}  # fmt: skip
                t = time.perf_counter()
                try:
                    info = recipe_from_observations(members, out_dir=str(work / "recipes" / f"{ns}-{c['id']}"),
                                                    embeddings=emb, namespace=ns, cluster=c["id"])  # fmt: skip
                except Exception as e:  # noqa: BLE001 - a cluster that cannot make a recipe is reported
                    row["error"] = str(e)
                    clusters.append(row)
                    continue
                finally:
                    t_recipe += time.perf_counter() - t
                diag = json.loads(Path(info["diagnostics"]).read_text())
                oof = [
                    f["out_of_fold_accuracy"] for f in diag["purity"].get("confident_learning", {}).values()
                ]
                baseline = float(np.prod(oof)) if oof else 1.0
                baseline_floor = min(0.95, max(0.5, baseline - 0.03))
                ok, how = dry_run(info["recipe_dir"], work)
                row.update(
                    purity_estimate=diag["purity"]["estimate"], k_floor=info["k_floor"],
                    k_floor_error=round(abs(info["k_floor"] - true_purity), 4),
                    estimate_error=round(abs(diag["purity"]["estimate"] - true_purity), 4),
                    baseline_oof_purity=round(baseline, 4), baseline_k_floor_error=round(abs(baseline_floor - true_purity), 4),
                    verifiers=[v["name"] for v in diag["verifiers"]], base=diag["base"]["name"],
                    dry_run=ok, dry_run_by=how, recipe_dir=info["recipe_dir"],
                    reach_warning=bool(diag.get("warnings")),
                )  # fmt: skip
                clusters.append(row)
            truth_tasks = [truth[i][0] for i in ids]
            ari[ns] = round(adjusted_rand_score(truth_tasks, pred), 4)
    finally:
        ray.shutdown()

    made = [c for c in clusters if "k_floor" in c]
    n_obs = len(observations)
    report = {
        "command": "python benchmarks/recipe.py " + " ".join(sys.argv[1:]),
        "observations": n_obs,
        "tasks": [{"namespace": t[0], "task": t[1], "noise": t[4]} for t in TASKS],
        "adjusted_rand_index": ari,
        "adjusted_rand_index_mean": round(sum(ari.values()) / len(ari), 4),
        "clusters": clusters,
        "dry_run_pass_rate": round(sum(c["dry_run"] for c in made) / max(1, len(clusters)), 4),
        "k_floor_within_005": round(
            sum(c["k_floor_error"] <= 0.05 + 1e-9 for c in made) / max(1, len(clusters)), 4
        ),
        "baseline_oof_k_floor_within_005": round(
            sum(c["baseline_k_floor_error"] <= 0.05 + 1e-9 for c in made) / max(1, len(clusters)), 4
        ),
        "seconds_per_1000": {f"cluster_{w}_workers": round(1000 * t / n_obs, 3) for w, t in timing.items()}
        | {
            f"cluster_{w}_workers_one_namespace_per_call": round(1000 * t / n_obs, 3)
            for w, t in per_namespace.items()
        }
        | {"recipe": round(1000 * t_recipe / n_obs, 3)}
        | {f"total_{w}_workers": round(1000 * (t + t_recipe) / n_obs, 3) for w, t in timing.items()},
        "seconds_per_cluster": {
            f"total_{w}_workers": round((t + t_recipe) / max(1, len(clusters)), 3) for w, t in timing.items()
        },
        # MiniLM alone, every input once, the work split perfectly over 2 workers: what clustering cannot
        # go below on this CPU while it embeds every observation.
        "embed_floor_seconds_per_1000_2_workers": round(embed_cpu / 2, 3),
        "speedup_2_vs_1_workers": round(timing[1] / timing[2], 3) if 1 in timing and 2 in timing else None,
        "final_recipe_passes_k": "not measured (run with --compile)",
        "seed_figures": {
            "dry_run": 0.96,
            "k_floor_within_005": 0.91,
            "passes_k": 0.78,
            "seconds_per_cluster": 5.4,
        },
        "targets": {"dry_run": 1.0, "k_floor_within_005": 0.95, "seconds_per_1000_total": 2.0},
        "embed_cpu_seconds_per_1000_one_thread": round(embed_cpu, 3),
        "machine": {
            "cpus": os.cpu_count(),
            "load_avg_1m_at_start": round(load_start, 2),
            "load_avg_1m_at_end": round(os.getloadavg()[0], 2),
            "note": "wall-clock figures include every other process on the machine; compare with the load",
        },
    }
    if args.compile:
        report["final_recipe_passes_k"] = _compile_all(made, work)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "recipe.json").write_text(json.dumps(report, indent=2) + "\n")
    _plot(report, out / "recipe.png")
    print(json.dumps({k: v for k, v in report.items() if k not in ("clusters", "tasks")}, indent=2))
    return 0


def _compile_all(made: list[dict], work: Path) -> dict:
    import contextlib
    import io
    import re

    from kolm_ray.artifact import verify
    from kolm_ray.cli import main as kolm

    taggers = [c for c in made if c["base"] == "minilm-l6"]
    passed = 0
    for c in taggers:
        out = work / f"{c['namespace']}-{c['cluster']}.kolm"
        err = io.StringIO()
        with contextlib.redirect_stderr(err):
            rc = kolm(["compile", "--recipe", c["recipe_dir"], "--output", str(out)])
        c["compile_rc"] = rc
        if rc == 0:
            c["k_score"] = round(verify(out)["metrics"]["k_score"], 4)
        else:  # the gate's one line: "error: K-score 0.90 below floor 0.95"
            found = re.search(r"K-score ([0-9.]+) below", err.getvalue())
            c["k_score"] = float(found.group(1)) if found else None
            print(err.getvalue().strip().splitlines()[-1], file=sys.stderr)
        print(f"compiled {c['namespace']}/{c['task']}: rc {rc}, K {c['k_score']}, floor {c['k_floor']}")
        passed += rc == 0
    return {"compiled": len(taggers), "passed": passed, "rate": round(passed / max(1, len(taggers)), 4)}


def _plot(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    made = [c for c in report["clusters"] if "k_floor" in c]
    fig, axes = plt.subplots(1, 3, figsize=(16, 4.5))
    names = [f"{c['namespace']}/{c['task']}" for c in made]
    x = range(len(made))
    ax = axes[0]
    ax.bar(
        [i - 0.2 for i in x], [c["k_floor_error"] for c in made], 0.4, label="k_floor (confident learning)"
    )
    ax.bar(
        [i + 0.2 for i in x], [c["baseline_k_floor_error"] for c in made], 0.4, label="baseline: OOF accuracy"
    )
    ax.axhline(0.05, color="red", ls="--", label="0.05 bound")
    ax.set_xticks(list(x), names, rotation=60, ha="right", fontsize=7)
    ax.set_ylabel("|k_floor - true purity|")
    ax.legend(fontsize=7)
    ax = axes[1]
    ax.scatter([c["true_purity"] for c in made], [c["purity_estimate"] for c in made], label="estimate")
    ax.scatter([c["true_purity"] for c in made], [c["k_floor"] for c in made], marker="x", label="k_floor")
    ax.plot([0.6, 1], [0.6, 1], "k:")
    ax.set_xlabel("true purity")
    ax.set_ylabel("estimate / k_floor")
    ax.legend(fontsize=7)
    ax.set_title(f"ARI vs true tasks: {report['adjusted_rand_index_mean']}")
    ax = axes[2]
    sp = report["seconds_per_1000"]
    keys = [k for k in sp if k.startswith("total_")]
    ax.bar(keys + ["recipe"], [sp[k] for k in keys] + [sp["recipe"]])
    ax.axhline(report["targets"]["seconds_per_1000_total"], color="red", ls="--", label="target 2 s")
    ax.axhline(
        report["embed_floor_seconds_per_1000_2_workers"],
        color="grey",
        ls=":",
        label="MiniLM alone, 2 workers",
    )
    ax.set_ylabel("seconds per 1,000 observations")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    sys.exit(main())
