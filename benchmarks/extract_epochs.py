"""How many epochs the extractor trains: chosen on validation rows, never on the benchmark's test set.

    .venv/bin/python benchmarks/extract_epochs.py --epochs 6      # ~20 min on a 2-core machine

The SNIPS *train* split (13,784 utterances) goes through `recipe_from_observations`, as `kolm recipe` would
write it (its seeded 75/25 train/eval split); the extractor trains on the recipe's train pairs with the
recipe's own settings (`training:`) except `epochs`, through the same per-worker function `kolm compile`
runs on Ray Train (here in one process, no Ray: the weights are the same), and writes a checkpoint per epoch.
Each checkpoint is scored on the recipe's eval pairs (SNIPS train utterances the model never saw): exact
match of the whole {"intent", "slots"} object and slot F1 (exact type and text). The SNIPS validate split,
which benchmarks/extract.py reports on, is not read.

A checkpoint after epoch e of an E-epoch run has not finished its learning-rate decay, so it is a lower
bound on an e-epoch run; the JSON says so. Writes benchmarks/results/extract_epochs.json and .png.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from kolm_ray.demo.simulate.snips import SYSTEM_PROMPT, read_snips  # noqa: E402

RESULTS = REPO / "benchmarks" / "results"
DATA = Path(os.environ.get("KOLM_SNIPS", REPO.parent / "shared" / "datasets" / "snips"))


def observations(rows: list[dict]) -> list[dict]:
    """The captured calls' shape: one system prompt, the utterance as the user turn, the gold JSON answer."""
    return [
        {
            "id": f"obs-{i:05d}",
            "namespace": "parse",
            "input": r["input"],
            "output": r["output"],
            "verified": True,
            "request": {
                "messages": [
                    {"role": "system", "content": SYSTEM_PROMPT},
                    {"role": "user", "content": r["input"]},
                ]
            },
        }
        for i, r in enumerate(rows)
    ]


def slot_set(output: dict) -> set[tuple[str, str]]:
    slots = output.get("slots") if isinstance(output, dict) else None
    return {(k, str(v)) for k, v in (slots or {}).items()}


def evaluate(model, tokenizer, layout: dict, rows: list[dict], max_len: int) -> dict:
    """Exact match and slot F1 of the model's answers (argmax decoding, as served) on rows."""
    import torch

    from kolm_ray.models.extract_layout import build_output, classes, span_value, spans
    from kolm_ray.models.extractor import class_answers, decode_spans

    sp, cl = spans(layout), classes(layout)
    exact = tp = n_pred = n_gold = 0
    model.eval()
    with torch.inference_mode():
        for i in range(0, len(rows), 64):
            batch = rows[i : i + 64]
            texts = [r["input"] for r in batch]
            enc = tokenizer(
                texts,
                padding=True,
                truncation=True,
                max_length=max_len,
                return_offsets_mapping=True,
                return_tensors="pt",
            )
            tags, cls = model(enc["input_ids"], enc["attention_mask"])
            for k, (text, r) in enumerate(zip(texts, batch, strict=True)):
                n = int(enc["attention_mask"][k].sum())
                offsets = [tuple(map(int, o)) for o in enc["offset_mapping"][k][:n]]
                found, _ = decode_spans(
                    text, offsets, torch.log_softmax(tags[k, :n], -1), len(sp), enc.word_ids(k)[:n]
                )
                values = {tuple(f["path"]): span_value(f, t) for f, t in zip(sp, found, strict=True)}
                if cl:
                    parts, start = [], 0
                    for f in cl:
                        size = len(f["values"]) + int(f["absent"])
                        parts.append(torch.log_softmax(cls[k, start : start + size], -1))
                        start += size
                    chosen, _ = class_answers(torch.cat(parts), layout)
                    values.update({tuple(f["path"]): v for f, v in zip(cl, chosen, strict=True)})
                answer = build_output(layout, values)
                exact += answer == r["output"]
                pred, gold = slot_set(answer), slot_set(r["output"])
                tp, n_pred, n_gold = tp + len(pred & gold), n_pred + len(pred), n_gold + len(gold)
    p, rec = tp / max(1, n_pred), tp / max(1, n_gold)
    return {
        "frame_accuracy": round(exact / len(rows), 4),
        "slot_f1": round(2 * p * rec / max(1e-9, p + rec), 4),
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--epochs", type=int, default=6)
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--out", default=str(RESULTS))
    args = ap.parse_args()

    import yaml

    from kolm_ray.artifact.spec import validate_spec
    from kolm_ray.compile.train.checkpoint import WEIGHTS, load_trainable
    from kolm_ray.compile.train.config import TrainConfig
    from kolm_ray.compile.train.loop import build_model, train_loop_per_worker
    from kolm_ray.models.extract_layout import extraction_layout
    from kolm_ray.recipe import recipe_from_observations

    t0, load0 = time.perf_counter(), os.getloadavg()
    snips = read_snips(DATA, "train")
    with tempfile.TemporaryDirectory(prefix="kolm-extract-epochs-") as tmp:
        info = recipe_from_observations(observations(snips), out_dir=f"{tmp}/recipe", namespace="parse")
        pairs = [json.loads(line) for line in Path(info["pairs_jsonl"]).read_text().splitlines()]
        train = [p for p in pairs if p["split"] == "train"]
        dev = [p for p in pairs if p["split"] == "eval"]
        settings = yaml.safe_load(Path(info["recipe_dir"], "recipe.yaml").read_text())
        training = {k: v for k, v in settings["training"].items() if k != "num_workers"}
        spec = validate_spec(json.loads(Path(info["spec_json"]).read_text()))
        layout = extraction_layout(spec, [p["output"] for p in train])
        cfg = TrainConfig(
            base=settings["base"],
            kind="extractor",
            rows=[{"input": p["input"], "output": p["output"]} for p in train],
            extract=layout,
            output_dir=f"{tmp}/ckpt",
            progress=False,
            threads=args.threads,
            **{**training, "epochs": args.epochs},
        )
        t1 = time.perf_counter()
        last = train_loop_per_worker(cfg.to_dict())
        train_s = time.perf_counter() - t1
        model, tokenizer = build_model(cfg)
        curve = []
        for epoch in range(args.epochs):
            load_trainable(model, Path(tmp, "ckpt", f"epoch-{epoch}", WEIGHTS))
            scores = evaluate(model, tokenizer, layout, dev, cfg.max_len)
            curve.append({"epoch": epoch + 1, "train_loss": round(last["losses"][epoch], 4), **scores})
            print(json.dumps(curve[-1]), flush=True)

    best = max(curve, key=lambda c: (c["frame_accuracy"], c["slot_f1"], -c["epoch"]))
    report = {
        "command": "benchmarks/extract_epochs.py " + " ".join(sys.argv[1:]),
        "data": {
            "dataset": "SNIPS train split (13,784 utterances; the validate split is not read)",
            "recipe_train_pairs": len(train),
            "dev_pairs_recipe_eval_split": len(dev),
        },
        "settings": {**training, "epochs": args.epochs, "base": settings["base"]},
        "curve": curve,
        "best_epoch": best["epoch"],
        "note": "each row is the checkpoint after that epoch of one run scheduled for "
        f"{args.epochs} epochs (linear decay to 0 at the last): an earlier row has not finished its decay",
        "seconds": {"train": round(train_s, 1), "total": round(time.perf_counter() - t0, 1)},
        "examples_per_s": round(last["examples_per_s"], 1),
        "machine": {
            "cpus": os.cpu_count(),
            "loadavg_start": [round(x, 2) for x in load0],
            "loadavg_end": [round(x, 2) for x in os.getloadavg()],
        },
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "extract_epochs.json").write_text(json.dumps(report, indent=2) + "\n")
    plot(report, out / "extract_epochs.png")
    print(json.dumps({"best_epoch": best["epoch"], "curve": curve}))
    return 0


def plot(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    curve = report["curve"]
    xs = [c["epoch"] for c in curve]
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot(xs, [c["frame_accuracy"] for c in curve], marker="o", label="frame accuracy (exact match)")
    ax.plot(xs, [c["slot_f1"] for c in curve], marker="s", label="slot F1")
    ax.set_xlabel("epoch (checkpoint of one run)")
    ax.set_title(f"SNIPS extractor on {report['data']['dev_pairs_recipe_eval_split']} validation pairs")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    raise SystemExit(main())
