"""Builders for the registry and local-answer tests: tiny signed taggers (no Ray) and a matching upstream.

The taggers learn recall_artifact's four topic namespaces; `upstream_answer` is what the stand-in frontier
answers for the same queries, so a right local answer equals the upstream's.
"""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

from recall_artifact import _TOPICS, NAMESPACES, pairs

SIGNING_KEY = "kolm-local-tests-signing-key"


def truth(query: str) -> str:
    """The namespace whose topic word occurs in the query (the longest match), else "none"."""
    best, size = "none", 0
    for ns, topics in _TOPICS.items():
        for t in topics:
            if t in query.lower() and len(t) > size:
                best, size = ns, len(t)
    return best


def upstream_answer(query: str) -> str:
    """The stand-in frontier's assistant text for a query: {"namespace": ...}."""
    return json.dumps({"namespace": truth(query)})


def build_tagger(
    tmp: Path, seed: int = 0, epochs: int = 8, name: str = "tagger", threshold: float | None = None
) -> Path:
    """validate -> train_loop_per_worker (plain) -> build_artifact: a signed tiny-encoder tagger.

    KOLM_TEST_TAGGER_CACHE names a directory where taggers built earlier by this function (signed with
    SIGNING_KEY) are kept, to skip the training when iterating locally.
    """
    import os
    import shutil

    cache = os.environ.get("KOLM_TEST_TAGGER_CACHE")
    cached = Path(cache) / f"{name}-{seed}-{epochs}-{threshold}.kolm" if cache else None
    fallback = "low-confidence-fallback-broad" + (f"={threshold}" if threshold is not None else "")
    if cached is not None and cached.is_file():
        return cached
    from kolm_ray.cli import build_parser
    from kolm_ray.compile.compile import build_artifact, train_config
    from kolm_ray.compile.plan import validate
    from kolm_ray.compile.train.loop import train_loop_per_worker

    tmp.mkdir(parents=True, exist_ok=True)
    (tmp / "pairs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in pairs(seed)))
    (tmp / "namespaces.json").write_text(json.dumps(NAMESPACES))
    argv = [
        "compile", "topic router", "--base", "tiny-encoder", "--pairs", str(tmp / "pairs.jsonl"),
        "--namespaces", str(tmp / "namespaces.json"), "--verifier", f"closed-vocab,{fallback}",
        "--k-floor", "0.5", "--epochs", str(epochs), "--output", str(tmp / f"{name}.kolm"),
    ]  # fmt: skip
    plan = validate(build_parser().parse_args(argv))
    cfg = replace(train_config(plan), output_dir=str(tmp / "run"), progress=False, seed=seed)
    metrics = train_loop_per_worker(cfg.to_dict())
    build_artifact(plan, Path(metrics["checkpoint"]), {"losses": metrics["losses"]}, tmp)
    if cached is not None:
        cached.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(plan.output, cached)
    return plan.output
