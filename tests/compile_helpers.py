"""Shared builders for the compile-side tests: synthetic pairs and a tiny artifact built without Ray."""

from __future__ import annotations

import json
import random
from pathlib import Path

WORDS = {
    "billing": ["invoice", "refund", "charge", "payment", "card", "bill"],
    "runbooks": ["restart", "deploy", "worker", "crash", "ingest", "server"],
    "incidents": ["outage", "alert", "page", "down", "sev1", "error"],
}


def write_pairs(
    path: Path, n: int = 90, seed: int = 0, as_string: bool = False, shuffle_labels: bool = False
) -> Path:
    """n namespace-tagger pairs whose label is recoverable from the words (unless shuffle_labels)."""
    rng = random.Random(seed)
    names = list(WORDS)
    with path.open("w") as f:
        for i in range(n):
            label = names[i % len(names)]
            text = "how do i " + " ".join(rng.choices(WORDS[label], k=3))
            if shuffle_labels:
                label = rng.choice(names)
            out = label if as_string else {"namespace": label}
            f.write(json.dumps({"input": text, "output": out}) + "\n")
    return path


def write_namespaces(path: Path) -> Path:
    path.write_text(json.dumps(list(WORDS)))
    return path


def compile_argv(
    tmp: Path, *extra: str, base: str = "tiny-encoder", n: int = 90, floor: str = "0.5"
) -> list[str]:
    pairs = write_pairs(tmp / "pairs.jsonl", n)
    ns = write_namespaces(tmp / "namespaces.json")
    return [
        "compile", "query namespace router", "--base", base, "--pairs", str(pairs), "--namespaces", str(ns),
        "--verifier", "closed-vocab,calibrated-brier=0.25,low-confidence-fallback-broad",
        "--k-floor", floor, "--output", str(tmp / "tagger.kolm"), *extra,
    ]  # fmt: skip


def write_eval_with_negatives(path: Path, n: int = 30, negatives: int = 40) -> Path:
    """Eval pairs plus "none of these" rows (split: negative) far from every namespace's words."""
    write_pairs(path, n, seed=5)
    with path.open("a") as f:
        for i in range(negatives):
            f.write(json.dumps({"input": f"weather on mars {i}", "output": None, "split": "negative"}) + "\n")
    return path


def build_artifact_without_ray(
    tmp: Path, epochs: int = 6, base: str = "tiny-encoder", extra: tuple[str, ...] = ()
) -> tuple[Path, dict]:
    """validate -> train_loop_per_worker (plain, no Ray) -> build_artifact: the compile phases minus Ray."""
    from dataclasses import replace

    from kolm_ray.cli import build_parser
    from kolm_ray.compile.compile import build_artifact, train_config
    from kolm_ray.compile.plan import validate
    from kolm_ray.compile.train.loop import train_loop_per_worker

    args = build_parser().parse_args(compile_argv(tmp, "--epochs", str(epochs), *extra, base=base))
    plan = validate(args)
    cfg = replace(train_config(plan), output_dir=str(tmp / "run"), progress=False)
    metrics = train_loop_per_worker(cfg.to_dict())
    build_artifact(plan, Path(metrics["checkpoint"]), {"losses": metrics["losses"]}, tmp)
    return plan.output, metrics
