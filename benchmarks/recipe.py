"""Recipe benchmark: production-like traffic built from CLINC150, clustered and turned into recipes.

    .venv/bin/python benchmarks/recipe.py                  # ~10,000 observations: static path vs MiniLM
    .venv/bin/python benchmarks/recipe.py --per-task 400   # quicker
    .venv/bin/python benchmarks/recipe.py --compile        # also compile every tagger recipe (minilm-l6)

Traffic: three namespaces, seven tasks. Each task is an intent task with JSON outputs behind its own
system prompt / response format (templated: dates vary), some share a namespace; labels are flipped to
another label of the same task at known rates; 3% of queries repeat; 2% of calls are upstream errors
(verified=false). The data is read from ../shared/datasets/clinc150 and never copied
(benchmarks/recipe_traffic.py builds it).

Two clustering paths over the same store, in the same run, each `kolm cluster --namespace A --namespace B
...` (one pass over the three namespaces) in a fresh local Ray, Ray's start-up included:
- static (the default): static MiniLM vectors for every row, MiniLM only for the split search's sample
  where static vectors say a split is possible;
- minilm (the baseline): MiniLM for every row.
The static model is distilled once per base revision into the cache: this run starts from an empty cache,
so "cold" = that one-off build + the warm run, "warm" = the run with the model cached (every later call).

Reports (benchmarks/results/recipe.json + recipe.png), per path:
- adjusted Rand index of the clusters against the true tasks, per namespace;
- per cluster: true purity, the recipe's purity estimate (confident learning on the path's vectors) and
  its error, |k_floor - true purity|, against a second baseline: purity = plain out-of-fold accuracy;
- dry-run pass rate (`kolm compile --recipe DIR --dry-run` when compile is installed, else
  validate_recipe_dir, which is what it calls);
- seconds per 1,000 observations (clustering, Ray start-up included; the recipe step apart).
Targets (issue 18): <= 1.0 s per 1,000 at 10,000 observations, every purity estimate within 0.05 of the
truth, ARI >= 0.98.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
sys.path.insert(0, str(ROOT / "benchmarks"))

from recipe_traffic import (  # noqa: E402  (benchmarks/recipe_traffic.py)
    DATA,
    SHARED_TASKS,
    SNIPS,
    TASKS,
    build_shared_prompt_traffic,
    build_traffic,
    is_correct,
)


def dry_run(recipe_dir: str, scratch: Path) -> tuple[bool, str]:
    try:
        import kolm_ray.compile.compile  # noqa: F401
        from kolm_ray.cli import main

        rc = main(["compile", "--recipe", recipe_dir, "--output", str(scratch / "dry.kolm"), "--dry-run"])
        return rc == 0, "kolm compile --recipe DIR --dry-run"
    except ImportError:
        from kolm_ray.errors import KolmError
        from kolm_ray.recipe import validate_recipe_dir

        try:
            validate_recipe_dir(recipe_dir)
            return True, "validate_recipe_dir (kolm_ray.compile.compile not installed)"
        except KolmError:
            return False, "validate_recipe_dir (kolm_ray.compile.compile not installed)"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--per-task", type=int, default=1365, help="1365: ~10,000 observations")
    ap.add_argument("--workers", type=int, default=2, help="actors of the MiniLM run and a third static one")
    ap.add_argument("--skip-baseline", action="store_true", help="no MiniLM-everywhere run")
    ap.add_argument(
        "--compile", action="store_true", help="also compile each minilm-l6 recipe and check its K-floor"
    )
    ap.add_argument(
        "--traffic",
        choices=["own-prompts", "shared-prompt"],
        default="own-prompts",
        help="own-prompts: each task behind its own system prompt (3 namespaces); shared-prompt: one app, ONE "
        "system prompt and response_format, the instruction in the user turn, CLINC150 + SNIPS tasks, four "
        "of six answering {label} (-> recipe_shared_prompt.json)",
    )
    ap.add_argument("--out", default=str(RESULTS))
    args = ap.parse_args()
    if not (DATA / "data_full.json").exists():
        print(f"CLINC150 not found at {DATA} (set KOLM_CLINC)", file=sys.stderr)
        return 2
    shared = args.traffic == "shared-prompt"
    if shared and not SNIPS.exists():
        print(f"SNIPS not found at {SNIPS} (set KOLM_SNIPS)", file=sys.stderr)
        return 2

    from kolm_ray.clustering import MiniLMEmbedder, StaticEmbedder, onnx_model_path, static_model_path
    from kolm_ray.observations.keys import create_key
    from kolm_ray.observations.model import Observation
    from kolm_ray.observations.store import open_store

    work = Path(tempfile.mkdtemp(prefix="kolm-recipe-bench-"))
    os.environ["KOLM_HOME"] = str(work / "home")
    os.environ["KOLM_CACHE"] = str(work / "cache")  # empty: the static model's one-off build is measured
    observations, truth = (build_shared_prompt_traffic if shared else build_traffic)(args.per_task)
    tasks = SHARED_TASKS if shared else TASKS
    url = f"sqlite:///{work / 'obs.db'}"
    store = open_store(url)
    namespaces = sorted({o["namespace"] for o in observations})
    # as `kolm capture` stores a team's calls: each row carries the team's key (trusted: it may train;
    # rows of an open proxy would be left out of clustering, docs/capture-keys.md)
    key, _ = create_key(store, "bench-team", namespaces, name="recipe benchmark")
    store.append_many([Observation(**o, key_id=key.id) for o in observations])
    store.close()
    n_obs = len(observations)
    print(f"{n_obs} observations, {len(namespaces)} namespaces, {len(tasks)} tasks -> {work}")
    load_start = os.getloadavg()
    t = time.perf_counter()
    static_model_path()
    static_build_s = time.perf_counter() - t
    t = time.perf_counter()
    onnx_model_path()  # MiniLM's int8 ONNX export: the baseline's one-off (and the split search's), apart
    onnx_build_s = time.perf_counter() - t
    print(f"static model distilled in {static_build_s:.1f}s, MiniLM ONNX built in {onnx_build_s:.1f}s")
    # The work itself, free of other processes' load: CPU seconds of one thread per 1,000 inputs.
    sample = [o["input"] for o in observations[:1000]]
    cpu = {}
    for name, emb in (("minilm", MiniLMEmbedder(threads=1)), ("static", StaticEmbedder())):
        c0 = time.process_time()
        emb(sample)
        cpu[name] = round(1000 * (time.process_time() - c0) / len(sample), 3)
    # what telling tasks apart by their instruction costs each row: the word-prefix hashes featurize adds
    from kolm_ray.clustering.featurize import template_prefixes

    c0 = time.process_time()
    for text in sample:
        template_prefixes(text)
    cpu["template_prefixes"] = round(1000 * (time.process_time() - c0) / len(sample), 3)

    ray_floor = _ray_floor(1)  # the default static pool
    print(f"Ray's floor (fresh start + one trivial actor-pool pipeline): {ray_floor}")
    paths, warm_runs = {}, []
    # `kolm cluster` as a user runs it: the default pool (one static actor), twice (how much a figure moves
    # here); then with --workers actors, what more parallelism buys; then MiniLM, one actor per CPU.
    runs = [("static", "static", None), ("static", "static", None)]
    if args.workers > 1:
        runs.append((f"static_{args.workers}_workers", "static", args.workers))
    if not args.skip_baseline:
        runs.append(("minilm", "minilm", args.workers))
    for name, embedder, workers in runs:
        if name in paths:  # a second warm static run: how much the figure moves on this machine
            warm_runs.append(paths[name]["cluster_s"])
        paths[name] = _run_path(url, namespaces, embedder, workers, truth, observations, work)
        p = paths[name]
        print(f"{name}: {p['seconds_per_1000']:.2f} s per 1,000 (Ray start-up included), ARI "
              f"{p['adjusted_rand_index_mean']}, max purity error {p['max_purity_estimate_error']}")  # fmt: skip
    static = paths["static"]
    baseline_fit = _without_templates(observations, truth, namespaces)
    made = [c for c in static["clusters"] if "k_floor" in c]
    warm = static["cluster_s"]
    static["warm_runs_cluster_s"] = [*warm_runs, warm]
    report = {
        "command": "python benchmarks/recipe.py " + " ".join(sys.argv[1:]),
        "traffic": args.traffic,
        "observations": n_obs,
        "workers": args.workers,
        "tasks": [{"namespace": t[0], "task": t[1], "noise": t[4]} for t in TASKS]
        if not shared
        else [
            {"namespace": "acme-app", "task": t[0], "source": t[1], "output": t[3], "noise": t[4]}
            for t in SHARED_TASKS
        ],  # fmt: skip
        # the static path (the default): the figures the README cites
        "adjusted_rand_index": static["adjusted_rand_index"],
        "adjusted_rand_index_mean": static["adjusted_rand_index_mean"],
        "clusters": static["clusters"],
        "purity_estimate_within_005": static["purity_estimate_within_005"],
        "max_purity_estimate_error": static["max_purity_estimate_error"],
        "k_floor_within_005": static["k_floor_within_005"],
        "baseline_oof_k_floor_within_005": static["baseline_oof_k_floor_within_005"],
        "dry_run_pass_rate": static["dry_run_pass_rate"],
        "seconds_per_1000": {
            "cluster_warm": static["seconds_per_1000"],
            "cluster_cold": round(1000 * (warm + static_build_s) / n_obs, 3),
            "recipe": round(1000 * static["recipe_s"] / n_obs, 3),
        }
        | {
            f"cluster_warm_{k.split('_')[1]}_workers": p["seconds_per_1000"]
            for k, p in paths.items()
            if k.endswith("_workers")
        }  # fmt: skip
        | ({"cluster_minilm_baseline": paths["minilm"]["seconds_per_1000"]} if "minilm" in paths else {}),
        "speedup_vs_minilm": round(paths["minilm"]["cluster_s"] / warm, 2) if "minilm" in paths else None,
        "one_off_builds_s": {
            "static_model_distill": round(static_build_s, 2),
            "minilm_onnx_export": round(onnx_build_s, 2),
        },  # fmt: skip
        "cold_and_warm": (
            "cold = the static model's one-off distillation (once per base revision and model2vec version, "
            "cached in $KOLM_CACHE) + a warm run; warm = every later run. Both include Ray's start-up; "
            "neither includes MiniLM's ONNX export, which the baseline needs as much"
        ),
        "ray_floor_s": ray_floor,
        # the same rows fitted in-process with and without template_tasks (what telling tasks apart by
        # their instruction and labels buys): ARI, clusters, the silhouettes the split search saw
        "fit_with_and_without_templates": baseline_fit,
        "paths": paths,
        "embed_cpu_seconds_per_1000_one_thread": cpu,
        "final_recipe_passes_k": "not measured (run with --compile)",
        "targets": {
            "seconds_per_1000_cluster": 1.0,
            "purity_estimate_error": 0.05,
            "ari": 0.95 if shared else 0.98,
        },
        "code": _code_hash(),
        "machine": {
            "cpus": os.cpu_count(),
            "load_avg_at_start": [round(x, 2) for x in load_start],
            "load_avg_at_end": [round(x, 2) for x in os.getloadavg()],
            "note": "wall-clock figures include every other process on the machine; compare with the load",
        },
    }
    if args.compile:
        report["final_recipe_passes_k"] = _compile_all(made, work)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = "recipe_shared_prompt" if shared else "recipe"
    (out / f"{stem}.json").write_text(json.dumps(report, indent=2) + "\n")
    _plot(report, out / f"{stem}.png")
    brief = {k: v for k, v in report.items() if k not in ("clusters", "tasks", "paths")}
    print(json.dumps(brief, indent=2))
    return 0


def _without_templates(observations: list, truth: dict, namespaces: list[str]) -> dict:
    """The baseline in the same run: the same rows, featurized as the pipeline does (in this process), fitted
    with and without template_tasks (the fit as it was before it), static vectors with MiniLM confirming
    as in the pipeline: ARI against the task per namespace, and the silhouettes the split search saw."""
    import numpy as np
    from sklearn.metrics import adjusted_rand_score

    from kolm_ray.clustering import MiniLMEmbedder, fit_clusters
    from kolm_ray.clustering.featurize import Featurizer

    minilm = MiniLMEmbedder(threads=1)
    out = {}
    for ns in namespaces:
        rows = [o for o in observations if o["namespace"] == ns]
        batch = {
            "input": np.array([o["input"] for o in rows], dtype=object),
            "output": np.array([json.dumps(o["output"]) for o in rows], dtype=object),
            "request": np.array([json.dumps(o["request"]) for o in rows], dtype=object),
            "verified": np.array(
                [{None: None, True: 1, False: 0}[o["verified"]] for o in rows], dtype=object
            ),
        }
        b = Featurizer("static")(batch)
        fit_rows = ~b["rejected"]
        texts = batch["input"][fit_rows]
        args = (b["embedding"][fit_rows], b["fp"][fit_rows], b["label"][fit_rows], 0)
        task = [truth[o["id"]][0] for o in rows]
        res = {}
        for name, prefixes in (("with_templates", b["prefixes"][fit_rows]), ("without_templates", None)):
            m = fit_clusters(*args, confirm=lambda idx, t=texts: minilm(list(t[idx])), rfps=b["rfp"][fit_rows],
                             prefixes=prefixes)  # fmt: skip
            pred = m.assign(
                b["embedding"], b["fp"], b["rfp"], b["label"], b["prefixes"] if prefixes is not None else None
            )
            res[name] = {"adjusted_rand_index": round(adjusted_rand_score(task, pred), 4), "clusters": len(m.ids),
                         "template_tasks": m.tasks, "static_silhouettes": m.silhouettes, "minilm_silhouettes": m.confirmed}  # fmt: skip
        out[ns] = res
    return out


def _code_hash() -> dict:
    """The commit and whether the clustering code differs from it (the figures are this code's)."""
    import subprocess

    def git(*a: str) -> str:
        return subprocess.run(["git", *a], cwd=ROOT, capture_output=True, text=True).stdout.strip()

    return {"commit": git("rev-parse", "--short", "HEAD"),
            "clustering_dirty": bool(git("status", "--porcelain", "kolm_ray/clustering", "benchmarks/recipe.py",
                                         "benchmarks/recipe_traffic.py"))}  # fmt: skip


class _Noop:
    def __call__(self, batch: dict) -> dict:
        return batch


def _ray_floor(workers: int) -> dict:
    """What any Ray Data clustering pays here before its own work: a fresh local Ray, its first pipeline
    with an actor pool of `workers` (that do nothing), and the shutdown."""
    import ray
    import ray.data

    t0 = time.perf_counter()
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    t1 = time.perf_counter()
    try:
        ds = ray.data.range(1000, override_num_blocks=2 * workers)
        ds.map_batches(_Noop, compute=ray.data.ActorPoolStrategy(size=workers)).materialize()
        t2 = time.perf_counter()
    finally:
        ray.shutdown()
    return {"ray_init_s": round(t1 - t0, 3), "first_actor_pipeline_s": round(t2 - t1, 3),
            "total_s": round(t2 - t0, 3)}  # fmt: skip


def _run_path(url: str, namespaces: list[str], embedder: str, workers: int | None, truth: dict, observations: list,
              work: Path) -> dict:  # fmt: skip
    """One clustering pass in a fresh local Ray (start-up timed), then a recipe per cluster."""
    import numpy as np
    import ray
    from sklearn.metrics import adjusted_rand_score

    from kolm_ray.clustering import cluster_members, cluster_namespaces
    from kolm_ray.recipe import recipe_from_observations

    by_id = {o["id"]: o for o in observations}
    load = os.getloadavg()[0]
    t0 = time.perf_counter()
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        t_up = time.perf_counter()
        results = cluster_namespaces(url, namespaces, num_workers=workers, summarize=False, embedder=embedder)
        cluster_s = time.perf_counter() - t0
        ari, clusters, fit_info = {}, [], {}
        t_recipe = 0.0
        for ns in namespaces:
            res = results[ns]
            fit_info[ns] = {"silhouettes": res.model.silhouettes, "minilm_decided": res.model.confirmed,
                            "template_tasks": res.model.tasks,
                            "minilm_rows": res.model.minilm_rows, "timings": res.timings}  # fmt: skip
            ids, pred = [], []
            for c in res.clusters:
                members, emb = cluster_members(res, c["id"])
                ids += [m["id"] for m in members]
                pred += [c["id"]] * len(members)
                tasks = Counter(truth[m["id"]][0] for m in members)
                usable = [m for m in members if m["verified"] is not False]
                true_purity = sum(
                    is_correct(by_id[m["id"]]["output"], truth[m["id"]][1]) for m in usable
                ) / max(1, len(usable))
                row = {"namespace": ns, "cluster": c["id"], "size": len(members), "task": tasks.most_common(1)[0][0],
                       "task_share": round(tasks.most_common(1)[0][1] / len(members), 4), "true_purity": round(true_purity, 4)}  # fmt: skip
                t = time.perf_counter()
                try:
                    info = recipe_from_observations(members, out_dir=str(work / embedder / f"{ns}-{c['id']}"),
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
                    estimate_error=round(abs(diag["purity"]["estimate"] - true_purity), 4),
                    k_floor_error=round(abs(info["k_floor"] - true_purity), 4),
                    baseline_oof_purity=round(baseline, 4), baseline_k_floor_error=round(abs(baseline_floor - true_purity), 4),
                    near_duplicate_groups=diag["purity"].get("near_duplicate_groups"),
                    flagged=diag["purity"].get("flagged"),
                    verifiers=[v["name"] for v in diag["verifiers"]], base=diag["base"]["name"],
                    dry_run=ok, dry_run_by=how, recipe_dir=info["recipe_dir"],
                    reach_warning=bool(diag.get("warnings")),
                )  # fmt: skip
                clusters.append(row)
            ari[ns] = round(adjusted_rand_score([truth[i][0] for i in ids], pred), 4)
    finally:
        ray.shutdown()
    made = [c for c in clusters if "k_floor" in c]
    n = len(observations)
    within = lambda key: round(sum(c[key] <= 0.05 + 1e-9 for c in made) / max(1, len(clusters)), 4)  # noqa: E731
    return {
        "embedder": embedder,
        "workers": workers,
        "cluster_s": round(cluster_s, 3),
        "ray_start_s": round(t_up - t0, 3),
        "seconds_per_1000": round(1000 * cluster_s / n, 3),
        "recipe_s": round(t_recipe, 3),
        "adjusted_rand_index": ari,
        "adjusted_rand_index_mean": round(sum(ari.values()) / len(ari), 4),
        "purity_estimate_within_005": within("estimate_error"),
        "max_purity_estimate_error": max((c["estimate_error"] for c in made), default=None),
        "k_floor_within_005": within("k_floor_error"),
        "baseline_oof_k_floor_within_005": within("baseline_k_floor_error"),
        "dry_run_pass_rate": round(sum(c["dry_run"] for c in made) / max(1, len(clusters)), 4),
        "fit": fit_info,
        "clusters": clusters,
        "load_avg_1m_at_start": round(load, 2),
    }


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

    fig, axes = plt.subplots(1, 2, figsize=(13, 4.5))
    ax = axes[0]
    paths = {
        k: v for k, v in report["paths"].items() if k in ("static", "minilm")
    }  # more workers: same vectors
    width = 0.8 / len(paths)
    for j, (name, p) in enumerate(paths.items()):
        made = [c for c in p["clusters"] if "k_floor" in c]
        xs = [i + (j - (len(paths) - 1) / 2) * width for i in range(len(made))]
        ax.bar(
            xs,
            [c["estimate_error"] for c in made],
            width,
            label=f"{name} (ARI {p['adjusted_rand_index_mean']})",
        )
        if j == 0:
            ax.set_xticks(range(len(made)), [f"{c['namespace']}/{c['task']}" for c in made], rotation=60,
                          ha="right", fontsize=7)  # fmt: skip
    ax.axhline(0.05, color="red", ls="--", label="0.05 bound")
    ax.set_ylabel("|purity estimate - true purity|")
    ax.legend(fontsize=7)
    ax = axes[1]
    sp = report["seconds_per_1000"]
    keys = ["cluster_warm"] + [k for k in sp if k.endswith("_workers")]
    keys += [k for k in ("cluster_cold", "cluster_minilm_baseline", "recipe") if k in sp]
    ax.bar(keys, [sp[k] for k in keys])
    ax.axhline(report["targets"]["seconds_per_1000_cluster"], color="red", ls="--", label="target 1 s")
    floor = 1000 * report["ray_floor_s"]["total_s"] / report["observations"]
    ax.axhline(floor, color="grey", ls=":", label="Ray's floor: start + one empty actor-pool pipeline")
    ax.set_ylabel("s per 1,000 observations")
    ax.set_title(f"{report['observations']:,} observations, Ray start-up included", fontsize=9)
    ax.tick_params(axis="x", labelsize=7)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    sys.exit(main())
