"""Which static-embedding student answers the most CLINC150 queries at the cascade's bar
(kolm_ray/compile/student_fit.py).

    .venv/bin/python benchmarks/student_variants.py --artifact bench-out/clinc-domains.kolm

One compiled router's teacher (its calibrated scores on train, val and test, computed once) and only the
student refitted per variant, each the way compile fits it: a temperature on val's calibration half with
half of oos_val, then the lowest threshold at which the cascade holds the bar on val (K within 0.5 points
of the teacher's, out-of-scope -> broad within 0.5 points: student_fit.choose_threshold). Reported on val
(what chose) and on test (4,500 + 1,000 out of scope; not used to choose):

- softmax regression on the distilled vectors, plain soft labels (the first student);
- the table trained end to end with a ReLU layer (student_fit.train_student), plain soft labels, negatives 1x;
- the same with the teacher's "none of these" mass in its soft labels and negatives 4x (what compile ships);
- the shipped recipe on vectors distilled from the base encoder instead of the fine-tuned one.

Writes benchmarks/results/<--name, default student_variants>.json.
"""

from __future__ import annotations

import argparse
import json
import os
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


def softmax_regression(x, hard, soft, l2: float = 1e-4):
    """The first student's head: LBFGS, full batch, half gold / half soft labels, L2 on the weights."""
    import torch

    w = torch.zeros(soft.shape[1], x.shape[1], dtype=torch.float64, requires_grad=True)
    b = torch.zeros(soft.shape[1], dtype=torch.float64, requires_grad=True)
    x, soft, known = x.double(), soft.double(), hard >= 0
    opt = torch.optim.LBFGS([w, b], lr=1.0, max_iter=500, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        logp = torch.log_softmax(x @ w.T + b, dim=-1)
        loss = -(soft * logp).sum(-1).mean() * 0.5 + l2 * (w**2).sum()
        loss = loss + 0.5 * torch.nn.functional.nll_loss(logp[known], hard[known])
        loss.backward()
        return loss

    opt.step(closure)
    return w.detach().float().numpy(), b.detach().float().numpy()


def main() -> int:
    import numpy as np
    import torch

    from kolm_ray.compile.evaluate import (
        NEGATIVE_CALIBRATION_WEIGHT,
        brier,
        fit_temperature_with_negatives,
        split_for_calibration,
    )
    from kolm_ray.compile.student_fit import choose_threshold, distill, soft_labels, train_student
    from kolm_ray.inference.predictors import open_predictor
    from kolm_ray.inference.student import Student
    from kolm_ray.models.modeling import outlier_probs

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--artifact", default=str(REPO / "bench-out" / "clinc-domains.kolm"))
    ap.add_argument("--data", default=str(DATA))
    ap.add_argument("--name", default="student_variants")
    ap.add_argument("--limit", type=int, default=0, help="first N rows of every split (a smoke run)")
    a = ap.parse_args()
    if not Path(a.artifact).is_file():
        print(
            f"error: no artifact at {a.artifact} (benchmarks/compile_tagger.py writes one)", file=sys.stderr
        )
        return 2
    load_before, t_start = os.getloadavg(), time.perf_counter()
    d = load(Path(a.data))
    if a.limit:
        d = {k: v if k == "namespaces" else v[: a.limit] for k, v in d.items()}
    splits = {
        "val": [r["input"] for r in d["val"]],
        "test": [r["input"] for r in d["test"]],
        "oos_val": d["oos_val"],
        "oos_test": d["oos_test"],
    }
    train_inputs = [r["input"] for r in d["train"]] + d["oos_train"]
    with open_predictor(a.artifact) as p:
        (field,) = p.labels
        labels = p.labels[field]
        index = {v: i for i, v in enumerate(labels)}
        gold = {k: np.array([index[r["output"][field]] for r in d[k]]) for k in ("train", "val", "test")}
        hard = torch.tensor([*gold["train"], *[-1] * len(d["oos_train"])])
        logits, dists = p.calibration_scores(train_inputs)
        soft = {
            "none-of-these spread": soft_labels(
                logits[field], dists.get(field), p.temperature[field], p.outlier.get(field)
            ),
            "plain": torch.softmax(logits[field].double() / p.temperature[field], dim=-1),
        }
        teacher = {}
        for k, inputs in splits.items():
            lg, ds = p.calibration_scores(inputs)
            probs = outlier_probs(lg[field], p.temperature[field], ds.get(field), p.outlier.get(field))
            best = lg[field].argmax(dim=-1)
            teacher[k] = (best.numpy(), probs.gather(1, best[:, None])[:, 0].numpy())
        t0 = time.perf_counter()
        tables = {"fine-tuned": distill(p.model.encoder, p.tokenizer)}
        distill_s = time.perf_counter() - t0
    from kolm_ray.models.bases import resolve_base

    base = resolve_base("minilm-l6")
    tables["base"] = distill(base.load_model(), base.load_tokenizer())

    cal, _, _ = split_for_calibration(len(d["val"]))
    neg_cal, _, _ = split_for_calibration(len(d["oos_val"]), seed=1)
    variants = [
        ("softmax regression, plain soft labels (the first student)", "fine-tuned", "linear", "plain", 1.0),
        ("trained table + ReLU layer, plain soft labels, negatives 1x", "fine-tuned", "mlp", "plain", 1.0),
        ("trained table + ReLU layer, none-of-these spread, negatives 4x (shipped)", "fine-tuned", "mlp",
         "none-of-these spread", 4.0),
        ("the shipped recipe on vectors distilled from the base encoder", "base", "mlp", "none-of-these spread",
         4.0),
    ]  # fmt: skip
    out = []
    for name, table, head, targets, neg_w in variants:
        t0 = time.perf_counter()
        if head == "linear":
            s = Student(tables[table], np.zeros((len(labels), 1)), np.zeros(len(labels)), field, labels)
            s.weight, s.bias = softmax_regression(
                torch.from_numpy(s.embed(train_inputs)), hard, soft[targets]
            )
        else:
            static, hidden, (w, b) = train_student(
                tables[table], train_inputs, hard, soft[targets], negative_weight=neg_w
            )
            s = Student(static, w, b, field, labels, hidden=hidden)
        fit_s = time.perf_counter() - t0
        lg = {k: s.logits(v) for k, v in splits.items()}
        s.temperature = fit_temperature_with_negatives(
            torch.from_numpy(lg["val"][cal]),
            torch.from_numpy(gold["val"][cal]),
            torch.from_numpy(lg["oos_val"][neg_cal]),
            NEGATIVE_CALIBRATION_WEIGHT,
        )
        ans, conf = {}, {}
        for k, v in lg.items():
            pr = s.probs(v)
            ans[k], conf[k] = pr.argmax(-1), pr.max(-1)
        threshold, bar = choose_threshold(
            conf["val"],
            ans["val"] == gold["val"],
            teacher["val"][0] == gold["val"],
            0.85,
            conf["oos_val"],
            teacher["oos_val"][1] < THRESHOLD,
            THRESHOLD,
        )
        row = {
            "variant": name,
            "fit_seconds": round(fit_s, 1),
            "temperature": s.temperature,
            "threshold": threshold,
            "student_alone_accuracy": {k: float((ans[k] == gold[k]).mean()) for k in ("val", "test")},
        }
        t1 = time.perf_counter()
        for q in splits["test"][:200]:
            s.answer([q])
        row["ms_per_query"] = round((time.perf_counter() - t1) / 200 * 1000, 3)
        for split, oos in (("val", "oos_val"), ("test", "oos_test")):
            if threshold is None:
                break
            sure, osure = conf[split] >= threshold, conf[oos] >= threshold
            a_, c_ = (
                np.where(sure, ans[split], teacher[split][0]),
                np.where(sure, conf[split], teacher[split][1]),
            )
            right, t_right = a_ == gold[split], teacher[split][0] == gold[split]
            row[split] = {
                "student_share": float(sure.mean()),
                "student_share_oos": float(osure.mean()),
                "cascade_accuracy": float(right.mean()),
                "teacher_accuracy": float(t_right.mean()),
                "cascade_brier": brier(c_.tolist(), right.tolist()),
                "teacher_brier": brier(teacher[split][1].tolist(), t_right.tolist()),
                "cascade_oos_broad": float((np.where(osure, conf[oos], teacher[oos][1]) < THRESHOLD).mean()),
                "teacher_oos_broad": float((teacher[oos][1] < THRESHOLD).mean()),
            }
        print(json.dumps(row), flush=True)
        out.append(row)
    report = {
        "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]),
        "artifact": Path(a.artifact).name,
        "machine": {
            "cpus": os.cpu_count(),
            "load_avg_at_start": load_before,
            "load_avg_at_end": os.getloadavg(),
        },
        "seconds": round(time.perf_counter() - t_start, 1),
        "distill_seconds_fine_tuned": round(distill_s, 1),
        "calibration_negative_weight": NEGATIVE_CALIBRATION_WEIGHT,
        "variants": out,
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"{a.name}.json").write_text(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
