"""Quality and cost of a compiled namespace tagger on CLINC150, against frozen MiniLM + logistic regression.

    .venv/bin/python benchmarks/compile_tagger.py                  # kolm compile's own defaults
    .venv/bin/python benchmarks/compile_tagger.py --epochs 2 --freeze-layers 2 --max-len 32 --negative-weight 4

Data (../shared/datasets/clinc150, never copied): the 10 domains are the namespaces; `train` (15,000)
trains, `val` (3,000) is the compile's eval set (temperature fitted on half, gate on all), and the
finished artifact is scored on `test` (4,500) through open_predictor, the path `kolm run` and Serve use.
oos_train (100 queries that belong to no domain) are "none of these" rows trained toward a uniform
answer; oos_val (100) are the eval's negative rows (half fit the temperature and the class-distance "none
of these" logit beside the in-scope half of val, see kolm_ray/compile/evaluate.py); oos_test (1,000) measures how
many out-of-scope queries fall back to broad at 0.7.

Every training setting is `kolm compile`'s default (the recipe's, kolm_ray/recipe/files.py) unless a flag
sets it: what a user gets. `cascade.json` was made with `--epochs 2 --freeze-layers 2 --max-len 32
--negative-weight 4` (less CPU on these 15,000 rows; `make bench` passes them for that run).

Baseline in the same run: frozen all-MiniLM-L6-v2 sentence embeddings (mean pooled, L2-normalised) +
scikit-learn LogisticRegression, its predict_proba max as the confidence.

The finished artifact is scored on test as shipped (the cascade, when compile kept a static-embedding
student: kolm_ray/inference/student.py) and stage by stage ("teacher alone", "student alone"), with the share of test
queries the student answers; the student's threshold was chosen on val by compile.

Writes benchmarks/results/<--name, default compile_tagger>.json and .png.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

REPO = Path(__file__).resolve().parent.parent
DATA = REPO.parent / "shared" / "datasets" / "clinc150"
RESULTS = REPO / "benchmarks" / "results"
THRESHOLD = 0.7
TARGETS = {"accuracy": 0.98, "brier": 0.02, "oos_broad": 0.80, "compile_seconds": 600}


def load(data_dir: Path) -> dict:
    domains = json.loads((data_dir / "domains.json").read_text())
    intent_to_domain = {i: d for d, intents in domains.items() for i in intents}
    full = json.loads((data_dir / "data_full.json").read_text())

    def rows(split):
        return [{"input": t, "output": {"namespace": intent_to_domain[i]}} for t, i in full[split]]

    return {
        "namespaces": sorted(domains),
        "train": rows("train"),
        "val": rows("val"),
        "test": rows("test"),
        "oos_train": [t for t, _ in full["oos_train"]],
        "oos_val": [t for t, _ in full["oos_val"]],
        "oos_test": [t for t, _ in full["oos_test"]],
    }


def summarise(confs, right, oos_confs, seconds) -> dict:
    from kolm_ray.compile.evaluate import brier, ece

    n = len(right)
    return {
        "accuracy": sum(right) / n,
        "k_score": sum(right) / n,  # a tagger's answers are always in the vocabulary: K = accuracy here
        "brier": brier(confs, right),
        "ece": ece(confs, right),
        "fallback_rate": sum(c < THRESHOLD for c in confs) / n,
        "oos_broad": sum(c < THRESHOLD for c in oos_confs) / len(oos_confs),
        "seconds": seconds,
    }


def run_compile(d: dict, work: Path, workers: int, overrides: dict) -> tuple[dict, dict]:
    """Compile through the same phases as `kolm compile` (validate -> train -> evaluate -> gate -> pack)."""
    from kolm_ray.cli import build_parser
    from kolm_ray.compile.compile import build_artifact, train
    from kolm_ray.compile.plan import validate
    from kolm_ray.inference.predictors import open_predictor

    pairs = work / "pairs.jsonl"
    with pairs.open("w") as f:
        for r in d["train"]:
            f.write(json.dumps(r) + "\n")
        for t in d["oos_train"]:
            f.write(json.dumps({"input": t, "output": None, "split": "negative"}) + "\n")
    evals = work / "eval.jsonl"
    evals.write_text(
        "".join(json.dumps(r) + "\n" for r in d["val"])
        + "".join(json.dumps({"input": t, "output": None, "split": "negative"}) + "\n" for t in d["oos_val"])
    )
    ns = work / "namespaces.json"
    ns.write_text(json.dumps(d["namespaces"]))
    out = work / "clinc-domains.kolm"
    argv = [
        "compile", "clinc150 domain router", "--base", "minilm-l6", "--pairs", str(pairs), "--eval-pairs", str(evals),
        "--namespaces", str(ns), "--verifier", "closed-vocab,calibrated-brier=0.10,low-confidence-fallback-broad",
        "--k-floor", "0.85", "--output", str(out), "--num-workers", str(workers),
    ]  # fmt: skip
    t0 = time.perf_counter()
    plan = validate(build_parser().parse_args(argv))
    plan.training.update(overrides)  # none by default: kolm compile's own settings
    result, _ = train(plan, work)
    manifest_metrics = build_artifact(
        plan, result.checkpoint_dir, {"seconds": result.seconds, "losses": result.metrics.get("losses")}, work
    )
    compile_s = time.perf_counter() - t0

    # The shipped form (the cascade, when compile kept a student) and each of its stages alone, on test.
    stages: dict[str, dict] = {}
    with open_predictor(out) as p:
        modes = ("cascade", "teacher", "student") if getattr(p, "student", None) is not None else ("teacher",)
        for mode in modes:
            p.cascade = mode
            t1 = time.perf_counter()
            answers = p.predict([r["input"] for r in d["test"]])
            oos = p.predict(d["oos_test"])
            seconds = time.perf_counter() - t1
            right = [
                a["namespace"] == r["output"]["namespace"] for a, r in zip(answers, d["test"], strict=True)
            ]
            stages[mode] = {
                "answers": answers,
                "oos": oos,
                "right": right,
                "seconds": seconds,
                "summary": summarise(
                    [a["confidence"] for a in answers], right, [a["confidence"] for a in oos], compile_s
                )
                | {"test_queries_per_s": (len(answers) + len(oos)) / seconds},
            }
        if "student" in stages:
            t = p.student.threshold
            stages["cascade"]["summary"]["student_share"] = sum(
                a["confidence"] >= t for a in stages["student"]["answers"]
            ) / len(d["test"])
            stages["cascade"]["summary"]["student_share_oos"] = sum(
                a["confidence"] >= t for a in stages["student"]["oos"]
            ) / len(d["oos_test"])
    shipped = stages[modes[0]]
    answers, oos, right, score_s = shipped["answers"], shipped["oos"], shipped["right"], shipped["seconds"]
    res = dict(shipped["summary"])
    res["stages"] = {m: st["summary"] for m, st in stages.items()}
    res["student"] = manifest_metrics.get("student")
    res.update(
        artifact_bytes=out.stat().st_size,
        train_seconds=result.seconds,
        train_examples_per_s=result.metrics.get("examples_per_s"),
        test_queries_per_s=(len(answers) + len(oos)) / score_s,
        val_k_score=manifest_metrics["k_score"],
        val_brier=manifest_metrics["brier"],
        temperature=manifest_metrics["temperature"],
        val_negatives_broad=manifest_metrics.get("negatives_broad"),
        calibration=manifest_metrics.get("calibration"),
        losses=result.metrics.get("losses"),
        settings={**plan.training, "num_workers": workers},
    )
    curves = {
        f"{m} (test)": {
            "conf": [a["confidence"] for a in st["answers"]],
            "right": st["right"],
            "oos": [a["confidence"] for a in st["oos"]],
        }
        for m, st in stages.items()
    }
    return res, curves


def run_baseline(d: dict) -> tuple[dict, dict]:
    """Frozen MiniLM embeddings + logistic regression."""
    import numpy as np
    import torch
    from sklearn.linear_model import LogisticRegression

    from kolm_ray.models.bases import resolve_base

    base = resolve_base("minilm-l6")
    tok, model = base.load_tokenizer(), base.load_model().eval()

    @torch.no_grad()
    def embed(texts):
        out = []
        for i in range(0, len(texts), 128):
            enc = tok(texts[i : i + 128], padding=True, truncation=True, max_length=32, return_tensors="pt")
            h = model(**enc).last_hidden_state
            m = enc["attention_mask"].unsqueeze(-1).float()
            e = (h * m).sum(1) / m.sum(1)
            out.append(torch.nn.functional.normalize(e, dim=-1).numpy())
        return np.concatenate(out)

    t0 = time.perf_counter()
    names = d["namespaces"]
    x_train = embed([r["input"] for r in d["train"]])
    y_train = np.array([names.index(r["output"]["namespace"]) for r in d["train"]])
    clf = LogisticRegression(max_iter=2000, C=10.0).fit(x_train, y_train)
    fit_s = time.perf_counter() - t0
    p_test = clf.predict_proba(embed([r["input"] for r in d["test"]]))
    p_oos = clf.predict_proba(embed(d["oos_test"]))
    right = [
        names[int(p.argmax())] == r["output"]["namespace"] for p, r in zip(p_test, d["test"], strict=True)
    ]
    res = summarise([float(p.max()) for p in p_test], right, [float(p.max()) for p in p_oos], fit_s)
    curves = {
        "conf": [float(p.max()) for p in p_test],
        "right": right,
        "oos": [float(p.max()) for p in p_oos],
    }
    return res, curves


def plot(results: dict, curves: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2, ax3) = plt.subplots(1, 3, figsize=(15, 4.5))
    keys = ["accuracy", "brier", "fallback_rate", "oos_broad"]
    width = 0.8 / len(results)
    for i, (name, res) in enumerate(results.items()):
        offset = (i - (len(results) - 1) / 2) * width
        ax1.bar([k + offset for k in range(len(keys))], [res[k] for k in keys], width, label=name)
    ax1.set_xticks(range(len(keys)), keys)
    ax1.axhline(TARGETS["accuracy"], ls=":", c="gray")
    ax1.set_title("test (4,500) and oos_test (1,000)")
    ax1.legend()
    bins = [i / 10 for i in range(11)]
    for name, c in curves.items():
        xs, ys = [], []
        for lo, hi in zip(bins, bins[1:], strict=False):
            idx = [j for j, v in enumerate(c["conf"]) if lo < v <= hi]
            if idx:
                xs.append(sum(c["conf"][j] for j in idx) / len(idx))
                ys.append(sum(c["right"][j] for j in idx) / len(idx))
        ax2.plot(xs, ys, marker="o", label=name)
        ax3.hist(c["oos"], bins=20, range=(0, 1), alpha=0.5, label=f"{name} oos_test")
    ax2.plot([0, 1], [0, 1], ls=":", c="gray")
    ax2.set_xlabel("confidence")
    ax2.set_ylabel("accuracy")
    ax2.set_title("reliability (test)")
    ax2.legend()
    ax3.axvline(THRESHOLD, ls="--", c="red")
    ax3.set_title(f"out-of-scope confidence (broad below {THRESHOLD})")
    ax3.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--epochs", type=int, help="default: kolm compile's (3)")
    ap.add_argument("--num-workers", type=int, default=2)
    ap.add_argument("--freeze-layers", type=int, help="lowest MiniLM layers kept frozen (default 0: none)")
    ap.add_argument("--max-len", type=int, help="tokens per query (default 64)")
    ap.add_argument("--negative-weight", type=float, help="weight of the out-of-scope loss (default 1.0)")
    ap.add_argument("--data", default=str(DATA))
    ap.add_argument("--skip-baseline", action="store_true")
    ap.add_argument(
        "--artifact-out",
        default=str(REPO / "bench-out" / "clinc-domains.kolm"),
        help="where the compiled artifact is kept (benchmarks/recall.py serves it)",
    )
    ap.add_argument("--name", default="compile_tagger", help="results file stem under benchmarks/results/")
    a = ap.parse_args()
    # No private KOLM_HOME: the artifact is signed with the user's key, so benchmarks/recall.py and
    # `kolm run` verify it (compile removes its Ray Train run directory when it is done).
    names = ("epochs", "freeze_layers", "max_len", "negative_weight")
    overrides = {k: getattr(a, k) for k in names if getattr(a, k) is not None}
    d = load(Path(a.data))
    results, curves = {}, {}
    with tempfile.TemporaryDirectory(prefix="kolm-bench-") as tmp:
        load_before = os.getloadavg()
        results["kolm compile (minilm-l6)"], stage_curves = run_compile(
            d, Path(tmp), a.num_workers, overrides
        )
        curves.update(stage_curves)
        keep = Path(a.artifact_out)
        keep.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(Path(tmp) / "clinc-domains.kolm", keep)
    if not a.skip_baseline:
        results["frozen MiniLM + logreg"], curves["frozen MiniLM + logreg"] = run_baseline(d)
    for mode, summary in results["kolm compile (minilm-l6)"]["stages"].items():
        if mode != "cascade":
            results[f"{mode} alone"] = summary
    ours = results["kolm compile (minilm-l6)"]
    report = {
        "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]),
        "training_overrides": overrides or "none: kolm compile's defaults",
        "machine": {
            "cpus": os.cpu_count(),
            "load_avg_at_start": load_before,
            "load_avg_at_end": os.getloadavg(),
        },
        "data": {k: len(v) for k, v in d.items()},
        "threshold": THRESHOLD,
        "targets": TARGETS,
        "met": {
            "accuracy": ours["accuracy"] >= TARGETS["accuracy"],
            "brier": ours["brier"] <= TARGETS["brier"],
            "oos_broad": ours["oos_broad"] >= TARGETS["oos_broad"],
            "compile_seconds": ours["seconds"] <= TARGETS["compile_seconds"],
        },
        "results": results,
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"{a.name}.json").write_text(json.dumps(report, indent=2))
    plot(results, curves, RESULTS / f"{a.name}.png")
    print(
        json.dumps(
            {k: {m: round(v, 4) for m, v in r.items() if isinstance(v, float)} for k, r in results.items()},
            indent=2,
        )
    )
    print(json.dumps(report["met"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
