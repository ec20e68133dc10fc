"""kolm compile: validate -> train (Ray Train) -> evaluate -> gate -> pack and sign. Nothing else.
The first phase (flags and recipe -> a checked Plan, nothing trained) is compile_plan.py.

    kolm compile "recall query namespace router" --base minilm-l6 \\
      --pairs ./query-namespace-pairs.jsonl --namespaces ./namespaces.json \\
      --verifier closed-vocab,calibrated-brier=0.10 --k-floor 0.85 --output namespace-tagger.kolm
    kolm compile --recipe ./recipe-out --output namespace-tagger.kolm [--base ...] [--epochs N] [--dry-run]

Exit codes: 0 written; 2 bad flags/files/pairs (nothing written); 3 K-score below the floor or a
set-level verifier (calibrated-brier) failed (nothing written); 4 artifact problems.
"""

from __future__ import annotations

import json
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from kolm_ray.compile.plan import COMPILE_ONLY_KEYS, DEEPSPEED_DIR, Plan, validate
from kolm_ray.errors import GateError, KolmError

# ---- train -------------------------------------------------------------------------------------------------


def train_config(plan: Plan, deepspeed: dict[str, Any] | None = None):
    """The per-worker TrainConfig: the plan's training settings minus those compile itself uses."""
    from kolm_ray.compile.train.config import TrainConfig

    return TrainConfig(
        base=plan.base.source if plan.base.is_local else plan.base.name,
        kind=plan.kind,
        rows=plan.train_rows,
        labels=plan.labels,
        extract=plan.extract,
        deepspeed=deepspeed,
        **{k: v for k, v in plan.training.items() if k not in COMPILE_ONLY_KEYS},
    )


def train(plan: Plan, workdir: Path):
    """Fine-tune on Ray Train (GPU workers with DeepSpeed when the cluster has GPUs, else DDP on CPU)."""
    from kolm_ray.compile.train.trainer import fit
    from kolm_ray.placement import cluster_gpus, ray_session, resolve_use_gpu

    with ray_session():
        gpu = resolve_use_gpu(plan.use_gpu)
        workers = plan.num_workers or (max(1, int(cluster_gpus())) if gpu else 1)
        ds = plan.deepspeed
        if ds is None and gpu and plan.base.kind == "causal-lm":
            ds = json.loads((DEEPSPEED_DIR / "zero2.json").read_text())  # ZeRO-2 when workers have GPUs
        cfg = train_config(plan, ds)
        print(
            f"training {plan.base.name} ({plan.kind}) on {len(plan.train_rows)} pairs: "
            f"{workers} Ray Train worker(s), {'GPU' if gpu else 'CPU'}"
            f"{', DeepSpeed ZeRO-' + str(ds['zero_optimization']['stage']) if ds else ', DDP' if workers > 1 else ''}",
            file=sys.stderr,
        )
        return fit(cfg, num_workers=workers, use_gpu=gpu, max_failures=plan.max_failures, workdir=workdir), ds


def stage(plan: Plan, checkpoint_dir: Path, staging: Path) -> str:
    """Write the artifact's files (weights, config, tokenizer, labels) into `staging`; returns its kind."""
    import torch
    from safetensors.torch import save_file

    from kolm_ray.compile.train.checkpoint import WEIGHTS, load_trainable
    from kolm_ray.compile.train.data import encode_tagger_rows
    from kolm_ray.compile.train.encoder import fit_gaussians
    from kolm_ray.inference.predictors import TAGGER_FILE
    from kolm_ray.models.modeling import EncoderTagger, add_lora

    tokenizer = plan.base.load_tokenizer()
    if plan.extract is not None:
        from kolm_ray.compile.extract import stage_extractor

        return stage_extractor(plan, checkpoint_dir, staging, tokenizer)
    if plan.base.kind == "encoder":
        model = EncoderTagger(plan.base.load_model(), plan.labels)
        load_trainable(model, checkpoint_dir / WEIGHTS)
        if plan.eval_negatives:  # "none of these" inputs to calibrate a distance against: keep class shapes
            examples = encode_tagger_rows(
                plan.train_rows, tokenizer, plan.labels, int(plan.training["max_len"])
            )
            fit_gaussians(model, examples, tokenizer.pad_token_id or 0)
        state = {k: v.contiguous() for k, v in model.state_dict().items()}
        save_file(state, str(staging / "model.safetensors"), metadata={"format": "pt"})
        model.encoder.config.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        meta = {"labels": plan.labels, "max_len": int(plan.training.get("max_len", 64)), "pooling": "mean"}
        (staging / TAGGER_FILE).write_text(json.dumps(meta, indent=2))
        return "encoder-tagger"
    lm = plan.base.load_model(dtype=torch.float32)
    peft_model = add_lora(lm, r=int(plan.training["lora_r"]), alpha=int(plan.training["lora_alpha"]))
    load_trainable(peft_model, checkpoint_dir / WEIGHTS)
    tokenizer.save_pretrained(staging)
    if plan.bundle_base:
        merged = peft_model.merge_and_unload()
        merged.save_pretrained(staging, safe_serialization=True)
        return "causal-lm"
    peft_model.save_pretrained(staging, safe_serialization=True)
    return "causal-lm-lora"


# ---- evaluate, gate, pack ----------------------------------------------------------------------------------


def evaluate_staged(plan: Plan, staging: Path, manifest: dict[str, Any]):
    """Load the staged files through the same Predictor `kolm run` uses, calibrate, and score; returns
    (metrics, the calibrated predictor)."""
    from kolm_ray.compile.evaluate import NEGATIVE_CALIBRATION_WEIGHT, evaluate
    from kolm_ray.inference.predictors import CALIBRATION_FILE, predictor_from_dir

    predictor = predictor_from_dir(staging, manifest)
    if predictor.kind == "encoder-extractor":  # spans + classes: its own calibration, threshold and metrics
        from kolm_ray.compile.extract import evaluate_extractor

        metrics = evaluate_extractor(
            predictor, plan.eval_rows, plan.spec, progress=True, k_floor=plan.k_floor
        )
        (staging / CALIBRATION_FILE).write_text(json.dumps(predictor.calibration(), indent=2))
        return metrics, predictor
    metrics = evaluate(
        predictor,
        plan.eval_rows,
        plan.spec,
        negatives=plan.eval_negatives,
        negative_weight=float(plan.training.get("calibration_negative_weight", NEGATIVE_CALIBRATION_WEIGHT)),
        progress=True,
        k_floor=plan.k_floor,
    )
    (staging / CALIBRATION_FILE).write_text(json.dumps(predictor.calibration(), indent=2))
    return metrics, predictor


def gate(plan: Plan, metrics: dict[str, Any]) -> None:
    """The selective gate (selective.py: answered-accuracy >= k_floor and coverage >= its floor on the eval
    rows the threshold was not chosen on) and the set-level verifiers: GateError (exit 3)."""
    k = metrics["k_score"]
    sel = metrics.get("selective")
    if sel is not None and not sel["passed"]:
        raise GateError(f"{sel['reason']} (K-score {k:.2f} on all {metrics['n_eval']} eval pairs)")
    if sel is None and k < plan.k_floor:
        raise GateError(f"K-score {k:.2f} below floor {plan.k_floor:.2f}")
    for name, v in metrics.get("verifiers", {}).items():
        if not v["passed"]:
            raise GateError(f"{name} {v['value']:.3f} above threshold {v['threshold']} (K-score {k:.2f})")


def build_artifact(
    plan: Plan,
    checkpoint_dir: Path,
    training: dict[str, Any],
    workdir: str | Path | None = None,
    started: Any = None,
) -> dict[str, Any]:
    """stage -> evaluate -> gate -> pack from a training checkpoint; returns the metrics in the manifest.
    `started` (compute.Meter, begun before training): the run's measured CPU/GPU seconds go in
    metrics.compute."""
    from kolm_ray.artifact import pack

    staging = Path(tempfile.mkdtemp(prefix="staging-", dir=workdir))
    try:
        kind = stage(plan, Path(checkpoint_dir), staging)
        manifest = {
            "name": plan.output.stem,
            "description": plan.description,
            "kind": kind,
            "base": plan.base.describe(),
            "spec": plan.spec.to_json(),
            "k_floor": plan.k_floor,
        }
        if plan.request_shape is not None:
            manifest["request_shape"] = plan.request_shape
        if plan.lineage is not None:  # under the signature: what data the model was trained on
            manifest["lineage"] = plan.lineage
        metrics, teacher = evaluate_staged(plan, staging, manifest)
        metrics["training"] = {**training, "n_train": len(plan.train_rows), "settings": plan.training}
        gate(plan, metrics)
        if kind == "encoder-tagger":  # the cascade's first stage, shipped only if it holds the teacher's K
            from kolm_ray.compile.student_fit import fit_student

            metrics["student"] = fit_student(teacher, plan, staging)
        teacher.close()
        if started is not None:
            metrics["compute"] = started.usage(training)
        pack(staging, plan.output, {**manifest, "metrics": metrics})
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return metrics


def compile_command(args) -> int:
    """kolm compile: validate -> train -> evaluate -> gate -> pack/sign. Prints `ok wrote OUT`."""
    from kolm_ray.artifact.signing import signing_alg
    from kolm_ray.placement import quiet_deepspeed_on_cpu

    quiet_deepspeed_on_cpu()
    t0 = time.perf_counter()
    plan = validate(args)
    alg = signing_alg()  # a bad KOLM_SIGNING_KEY_FILE is exit 2 here (dry runs too), not after training
    problem = plan.base.fetch_problem()  # before Ray starts: a missing base is a user's fix, not a crash
    if args.dry_run:
        if problem:
            print(f"warning: {problem}", file=sys.stderr)
        print(
            f"ok dry run: base {plan.base.name} ({plan.kind}), {len(plan.train_rows)} train / "
            f"{len(plan.eval_rows)} eval pairs, verifiers {', '.join(v.name for v in plan.spec.verifier) or 'none'}, "
            f"k_floor {plan.k_floor}; nothing written"
        )
        return 0
    if problem:
        raise KolmError(problem)
    from kolm_ray.compile.compute import Meter

    workdir = Path(tempfile.mkdtemp(prefix="kolm-compile-"))
    meter = Meter()  # this process's CPU from here on, plus the Ray Train workers' (they report theirs)
    try:
        result, ds = train(plan, workdir)
        training = {
            "seconds": round(result.seconds, 2),
            "losses": result.metrics.get("losses"),
            "examples_per_s": result.metrics.get("examples_per_s"),
            "world_size": result.metrics.get("world_size"),
            "batch_size": result.metrics.get("batch_size"),  # per worker, after min_steps
            "deepspeed_stage": ds["zero_optimization"]["stage"] if ds else None,
            "worker_cpu_s": result.metrics.get("worker_cpu_s"),
            "gpus": result.metrics.get("gpus"),
        }
        metrics = build_artifact(plan, result.checkpoint_dir, training, workdir, started=meter)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    print(f"ok wrote {plan.output}")
    print(f"   k_score={metrics['k_score']:.2f}  signature={alg}")
    print(
        f"   accuracy={metrics['accuracy']:.3f}  brier={metrics['brier']:.4f}  ece={metrics['ece']:.4f}  "
        f"eval={metrics['n_eval']}  train={len(plan.train_rows)}  seconds={time.perf_counter() - t0:.0f}",
        file=sys.stderr,
    )
    sel = metrics.get("selective")
    if sel is not None:
        print(
            f"   answered_accuracy={sel['answered_accuracy']:.3f}  coverage={sel['coverage']:.3f}  "
            f"threshold={sel['threshold']}  (on {sel['n_gate_rows']} eval pairs the threshold was not chosen on)",
            file=sys.stderr,
        )
    return 0
