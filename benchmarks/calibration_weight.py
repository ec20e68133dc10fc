"""The class-distance calibration weight (`calibration_negative_weight`), chosen on CLINC150 val, reported on test.

    .venv/bin/python benchmarks/calibration_weight.py --artifact bench-out/clinc-domains.kolm

A router's temperature and "none of these" logit (kolm_ray/compile/evaluate.py, fit_outlier_calibration) minimise
(1 - w) x the in-scope confidence Brier + w x the mean confidence on out-of-scope queries. w moves along a
trade-off (a larger w: more out-of-scope queries routed broad, a higher in-scope Brier), so it is a default
to choose, and it is chosen here on validation data only, from one compiled artifact's teacher scores (no
retraining: the weight changes only the three calibration parameters):

- val, cross-fitted: `--repeats` random halvings of CLINC150 val (3,000 in-scope) and oos_val (100 out of
  scope); the calibration is fitted on one half and scored on the other, both ways round; the figures are
  the means over the 2 x repeats held-out halves.
- The rule, fixed before reading any test figure: the w with the highest held-out out-of-scope -> broad
  (confidence < 0.7) whose held-out in-scope Brier is at most `--brier-slack` (10%) above the lowest
  held-out Brier over the grid. The slack is what the router gives up in in-scope calibration for
  out-of-scope safety; without it the rule would pick the smallest w.
- test: for every w, the calibration fitted as compile fits it (the first half of val and of oos_val,
  evaluate.split_for_calibration) and scored on test (4,500) and oos_test (1,000). Reported, never used to
  choose.

Writes benchmarks/results/<--name, default calibration_weight>.json and .png.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from benchmarks.compile_tagger import DATA, THRESHOLD, load  # noqa: E402

RESULTS = REPO / "benchmarks" / "results"
GRID = (0.02, 0.04, 0.06, 0.08, 0.10, 0.15)


def scores(artifact: Path, d: dict) -> dict:
    """The artifact teacher's logits and class distances on each split, and its targets."""
    from kolm_ray.inference.predictors import open_predictor

    out = {}
    with open_predictor(artifact) as p:
        p.cascade = "teacher"
        (field,) = p.labels
        for split in ("val", "test", "oos_val", "oos_test"):
            rows = d[split]
            inputs = rows if split.startswith("oos") else [r["input"] for r in rows]
            lg, ds = p.calibration_scores(inputs)
            out[split] = {"logits": lg[field].double(), "dists": ds[field].double()}
            if not split.startswith("oos"):
                out[split]["targets"] = p.calibration_targets([r["output"] for r in rows])[field]
    return out


def figures(s: dict, oos: dict, idx, oos_idx, temperature: float, outlier: dict) -> dict:
    """In-scope Brier / ECE / accuracy and out-of-scope -> broad of one calibration on the given rows."""
    import torch

    from kolm_ray.compile.evaluate import brier, ece
    from kolm_ray.models.modeling import outlier_probs

    pick, opick = torch.as_tensor(idx), torch.as_tensor(oos_idx)
    lg, dist, tgt = s["logits"][pick], s["dists"][pick], s["targets"][pick]
    conf = outlier_probs(lg, temperature, dist, outlier).amax(dim=-1).tolist()
    right = (lg.argmax(dim=-1) == tgt).tolist()
    oconf = outlier_probs(oos["logits"][opick], temperature, oos["dists"][opick], outlier).amax(dim=-1)
    return {
        "brier": brier(conf, right),
        "ece": ece(conf, right),
        "fallback_rate": sum(c < THRESHOLD for c in conf) / len(conf),
        "oos_broad": float((oconf < THRESHOLD).double().mean()),
    }


def fit(s: dict, oos: dict, idx, oos_idx, w: float) -> tuple[float, dict]:
    import torch

    from kolm_ray.compile.evaluate import fit_outlier_calibration

    pick, opick = torch.as_tensor(idx), torch.as_tensor(oos_idx)
    return fit_outlier_calibration(
        s["logits"][pick], s["targets"][pick], s["dists"][pick], oos["logits"][opick], oos["dists"][opick], w
    )


def sweep_val(sc: dict, repeats: int) -> dict[float, dict]:
    """Cross-fitted held-out figures on val per w (means over 2 x repeats halves)."""
    n, m = len(sc["val"]["targets"]), len(sc["oos_val"]["logits"])
    folds = []
    for r in range(repeats):
        rng = random.Random(100 + r)
        a, b = rng.sample(range(n), n), rng.sample(range(m), m)
        halves = ((sorted(a[: n // 2]), sorted(b[: m // 2])), (sorted(a[n // 2 :]), sorted(b[m // 2 :])))
        folds += [(halves[0], halves[1]), (halves[1], halves[0])]
    out = {}
    for w in GRID:
        per = []
        for (fi, fo), (si, so) in folds:
            t, outlier = fit(sc["val"], sc["oos_val"], fi, fo, w)
            per.append(figures(sc["val"], sc["oos_val"], si, so, t, outlier))
        out[w] = {k: sum(p[k] for p in per) / len(per) for k in per[0]} | {
            "oos_broad_sd": float(
                (
                    sum((p["oos_broad"] - sum(q["oos_broad"] for q in per) / len(per)) ** 2 for p in per)
                    / len(per)
                )
                ** 0.5
            ),
            "n_folds": len(per),
        }
        print(f"val w={w}: " + json.dumps({k: round(v, 4) for k, v in out[w].items()}), flush=True)
    return out


def sweep_test(sc: dict) -> dict[float, dict]:
    """Per w: fitted as compile fits it (val's calibration half + half of oos_val), scored on test."""
    from kolm_ray.compile.evaluate import split_for_calibration

    cal, _, _ = split_for_calibration(len(sc["val"]["targets"]))
    neg_cal, _, _ = split_for_calibration(len(sc["oos_val"]["logits"]), seed=1)
    every, every_oos = range(len(sc["test"]["targets"])), range(len(sc["oos_test"]["logits"]))
    out = {}
    for w in GRID:
        t, outlier = fit(sc["val"], sc["oos_val"], cal, neg_cal, w)
        out[w] = figures(sc["test"], sc["oos_test"], every, every_oos, t, outlier) | {
            "temperature": t,
            "outlier": outlier,
        }
        print(f"test w={w}: " + json.dumps({k: v for k, v in out[w].items() if k != "outlier"}), flush=True)
    return out


def choose(val: dict[float, dict], slack: float) -> float:
    """The rule (module docstring): the most out-of-scope -> broad within `slack` of the lowest Brier."""
    floor = min(v["brier"] for v in val.values())
    ok = [w for w, v in val.items() if v["brier"] <= floor * (1 + slack)]
    return max(ok, key=lambda w: (val[w]["oos_broad"], -val[w]["brier"]))


def plot(val: dict, test: dict, chosen: float, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4.5))
    for name, res, style in (("val (cross-fitted)", val, "o-"), ("test", test, "s--")):
        ws = sorted(res)
        ax1.plot(ws, [res[w]["brier"] for w in ws], style, label=name)
        ax2.plot([res[w]["brier"] for w in ws], [res[w]["oos_broad"] for w in ws], style, label=name)
        for w in ws:
            ax2.annotate(f"{w:g}", (res[w]["brier"], res[w]["oos_broad"]), fontsize=7)
    ax1.axvline(chosen, ls=":", c="red", label=f"chosen on val: {chosen:g}")
    ax1.set_xlabel("calibration_negative_weight w")
    ax1.set_ylabel("in-scope confidence Brier")
    ax1.legend()
    ax2.set_xlabel("in-scope confidence Brier")
    ax2.set_ylabel(f"out-of-scope -> broad (confidence < {THRESHOLD})")
    ax2.set_title("the trade-off w moves along")
    ax2.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--artifact", default=str(REPO / "bench-out" / "clinc-domains.kolm"))
    ap.add_argument("--data", default=str(DATA))
    ap.add_argument("--repeats", type=int, default=2, help="random halvings of val (each scored both ways)")
    ap.add_argument("--brier-slack", type=float, default=0.10)
    ap.add_argument("--name", default="calibration_weight")
    a = ap.parse_args()
    if not Path(a.artifact).is_file():
        print(
            f"error: no artifact at {a.artifact} (benchmarks/compile_tagger.py writes one)", file=sys.stderr
        )
        return 2
    load_before = os.getloadavg()
    t0 = time.perf_counter()
    d = load(Path(a.data))
    sc = scores(Path(a.artifact), d)
    val = sweep_val(sc, a.repeats)
    chosen = choose(val, a.brier_slack)
    test = sweep_test(sc)
    from kolm_ray.compile.evaluate import NEGATIVE_CALIBRATION_WEIGHT

    report = {
        "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]),
        "artifact": Path(a.artifact).name,
        "machine": {
            "cpus": os.cpu_count(),
            "load_avg_at_start": load_before,
            "load_avg_at_end": os.getloadavg(),
        },
        "seconds": round(time.perf_counter() - t0, 1),
        "rule": f"highest cross-fitted val oos->broad with val Brier <= (1 + {a.brier_slack}) x the grid's lowest",
        "threshold": THRESHOLD,
        "chosen_on_val": chosen,
        "default_in_code": NEGATIVE_CALIBRATION_WEIGHT,
        "chosen_on_test_figures": test[chosen],
        "val": {str(w): v for w, v in val.items()},
        "test": {str(w): v for w, v in test.items()},
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"{a.name}.json").write_text(json.dumps(report, indent=2))
    plot(val, test, chosen, RESULTS / f"{a.name}.png")
    print(json.dumps({"chosen_on_val": chosen, "test": test[chosen]}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
