"""The per-worker training function. A plain function of one dict: Ray Train's TorchTrainer runs it on
every worker (DDP over gloo on CPU, NCCL on GPU, or DeepSpeed ZeRO when the config names one), and it
runs as-is without Ray too (one process, or `torchrun` for several), so it can be checked on a GPU
machine where Ray is not installed:

    from kolm_ray.compile.train.loop import train_loop_per_worker
    train_loop_per_worker({"base": "tiny-encoder", "kind": "encoder", "rows": rows,
                           "labels": {"namespace": ["a", "b"]}, "output_dir": "/tmp/run"})

Checkpoints (train/checkpoint.py) hold only the trainable weights (encoder layers that were not frozen +
heads, or the LoRA adapter) as safetensors, the optimizer state as safetensors + JSON, and state.json.
Under Ray they are reported with ray.train.report(checkpoint=...), and a restarted worker group (see
FailureConfig in train/trainer.py) resumes from ray.train.get_checkpoint(); without Ray they are
written to output_dir/epoch-N and `resume_from` resumes from one.
"""

from __future__ import annotations

import json
import math
import os
import signal
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader
from transformers.trainer_pt_utils import DistributedLengthGroupedSampler, LengthGroupedSampler

from kolm_ray.compile.train.checkpoint import (
    DS_DIR,
    OPTIM,
    STATE,
    WEIGHTS,
    load_optimizer,
    load_trainable,
    write_checkpoint,
)
from kolm_ray.compile.train.config import TrainConfig
from kolm_ray.compile.train.data import (
    collate_extractor,
    collate_sft,
    collate_tagger,
    encode_extractor_rows,
    encode_sft_rows,
    encode_tagger_rows,
    pack_sft,
)
from kolm_ray.compile.train.encoder import init_heads

# ---- model, data and optimizer -----------------------------------------------------------------------------


def build_model(cfg: TrainConfig) -> tuple[nn.Module, Any]:
    """The trainable model and its tokenizer, freshly initialised from the base (same seed on every rank)."""
    from kolm_ray.models.bases import resolve_base
    from kolm_ray.models.modeling import EncoderTagger, add_lora

    base = resolve_base(cfg.base)
    tokenizer = base.load_tokenizer()
    torch.manual_seed(cfg.seed)
    if cfg.kind == "encoder":
        model = EncoderTagger(base.load_model(), cfg.labels)
        model.freeze(embeddings=cfg.freeze_embeddings, layers=max(cfg.freeze_layers, 0))
        return model, tokenizer
    if cfg.kind == "extractor":
        from kolm_ray.models.extractor import EncoderExtractor

        model = EncoderExtractor(base.load_model(), cfg.extract or {})
        model.freeze(embeddings=cfg.freeze_embeddings, layers=max(cfg.freeze_layers, 0))
        return model, tokenizer
    lm = base.load_model(dtype=torch.bfloat16 if torch.cuda.is_available() else torch.float32, attn="sdpa")
    if cfg.gradient_checkpointing:
        lm.gradient_checkpointing_enable()
        lm.enable_input_require_grads()
    return add_lora(lm, r=cfg.lora_r, alpha=cfg.lora_alpha), tokenizer


def _param_groups(model: nn.Module, cfg: TrainConfig) -> list[dict]:
    fresh = ("heads.", "span_head.")  # freshly initialised heads learn at head_lr
    heads = [p for n, p in model.named_parameters() if p.requires_grad and n.startswith(fresh)]
    body = [p for n, p in model.named_parameters() if p.requires_grad and not n.startswith(fresh)]
    groups = [{"params": body, "lr": cfg.lr, "base_lr": cfg.lr}]
    if heads:
        groups.append({"params": heads, "lr": cfg.head_lr, "base_lr": cfg.head_lr})
    return [g for g in groups if g["params"]]


def _lr_factor(step: int, total: int, warmup: float) -> float:
    w = max(1, int(total * warmup))
    if step < w:
        return (step + 1) / w
    return max(0.0, (total - step) / max(1, total - w))


# ---- distributed set-up ------------------------------------------------------------------------------------


def _rank_world(cfg: TrainConfig) -> tuple[int, int]:
    if cfg.in_ray:
        import ray.train

        ctx = ray.train.get_context()
        return ctx.get_world_rank(), ctx.get_world_size()
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


def _init_plain_distributed(use_deepspeed: bool) -> None:
    """Without Ray: join a process group when launched by torchrun (or DeepSpeed needs one of size 1)."""
    if torch.distributed.is_initialized():
        return
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 or use_deepspeed:
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(29500 + os.getpid() % 1000))
        os.environ.setdefault("RANK", "0")
        os.environ.setdefault("LOCAL_RANK", "0")
        os.environ.setdefault("WORLD_SIZE", "1")
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        torch.distributed.init_process_group(backend=backend)


def deepspeed_config(raw: dict[str, Any], cfg: TrainConfig, world: int, on_gpu: bool) -> dict[str, Any]:
    """Fill a configs/deepspeed/*.json template: drop `_comment` keys and resolve "auto" values."""

    def clean(obj):
        if isinstance(obj, dict):
            return {k: clean(v) for k, v in obj.items() if not k.startswith("_")}
        return obj

    ds = clean(raw)
    auto = {
        "train_micro_batch_size_per_gpu": cfg.batch_size,
        "gradient_accumulation_steps": 1,
    }
    for k, v in auto.items():
        if ds.get(k, "auto") == "auto":
            ds[k] = v
    ds["train_batch_size"] = ds["train_micro_batch_size_per_gpu"] * ds["gradient_accumulation_steps"] * world
    bf16_ok = on_gpu and torch.cuda.is_bf16_supported()
    for prec in ("bf16", "fp16"):
        if isinstance(ds.get(prec), dict) and ds[prec].get("enabled") == "auto":
            ds[prec]["enabled"] = bf16_ok if prec == "bf16" else False
    opt = ds.get("optimizer")
    if isinstance(opt, dict):
        params = opt.setdefault("params", {})
        if params.get("lr", "auto") == "auto":
            params["lr"] = cfg.lr
        if params.get("weight_decay", "auto") == "auto":
            params["weight_decay"] = cfg.weight_decay
        # torch's AdamW, on GPU too: DeepSpeed's FusedAdam is compiled on first use (nvcc on every worker,
        # a minute each), and for a LoRA adapter's few million weights the optimizer step is not the cost.
        params["torch_adam"] = True
    return ds


# ---- the loop ----------------------------------------------------------------------------------------------


def _compute_loss(model, batch: dict[str, torch.Tensor], cfg: TrainConfig) -> torch.Tensor:
    from kolm_ray.models.modeling import encoder_loss

    if cfg.kind == "extractor":
        from kolm_ray.models.extractor import extractor_loss

        tags, cls = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
        sizes = getattr(model, "module", model).sizes
        return extractor_loss(tags, cls, batch["tag_targets"], batch["class_targets"], sizes)
    if cfg.kind == "encoder":
        ids, mask = batch["input_ids"], batch["attention_mask"]
        partner = lam = None
        if cfg.mix_weight > 0:  # pseudo-outliers: each row's pooled vector mixed with a random other's
            partner = torch.randperm(len(ids)).to(ids.device)
            lam = torch.empty(len(ids)).uniform_(0.3, 0.7).to(ids.device)
        logits = model(input_ids=ids, attention_mask=mask, mix_partner=partner, mix_lambda=lam)
        return encoder_loss(
            logits, batch["targets"], batch["negative"], cfg.negative_weight, partner, cfg.mix_weight
        )
    from kolm_ray.compile.train.lm_loss import output_token_loss

    return output_token_loss(model, batch)


def train_loop_per_worker(config: dict[str, Any]) -> dict[str, Any]:
    """Train one worker's share; under Ray Train report metrics + checkpoints each epoch.

    Returns the last epoch's metrics (plus "checkpoint": the last checkpoint directory when run without Ray).
    """
    cfg = TrainConfig(**config)
    if cfg.in_ray and not cfg.verbose:  # our bar (or line) per epoch says enough; Ray Train's INFO is noise
        import logging

        logging.getLogger("ray.train").setLevel(logging.WARNING)
        # `Reporting training result ...` comes from a logger named after its file, which only the root
        # logger's level (INFO under Ray Train) governs.
        logging.getLogger().setLevel(logging.WARNING)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    if not cfg.in_ray:
        _init_plain_distributed(cfg.deepspeed is not None)
    rank, world = _rank_world(cfg)
    cfg = replace(cfg, batch_size=batch_size_for(len(cfg.rows), cfg, world))
    on_gpu = torch.cuda.is_available()
    model, tokenizer = build_model(cfg)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0

    if cfg.kind == "encoder":
        examples = encode_tagger_rows(cfg.rows, tokenizer, cfg.labels, cfg.max_len)
        collate = lambda b: collate_tagger(b, pad)  # noqa: E731
        if cfg.probe_init:  # every rank fits the same probe on the same rows; a resume overwrites it below
            init_heads(model, examples, pad)
    elif cfg.kind == "extractor":
        examples = encode_extractor_rows(cfg.rows, tokenizer, cfg.extract or {}, cfg.max_len)
        collate = lambda b: collate_extractor(b, pad)  # noqa: E731
    else:
        examples = encode_sft_rows(cfg.rows, tokenizer, cfg.max_len)
        if cfg.pack_len > 0:
            collate = lambda b: pack_sft(b, cfg.pack_len, pad)  # noqa: E731
        else:
            collate = lambda b: collate_sft(b, pad)  # noqa: E731
    # Batches of similar lengths (Hugging Face's length-grouped samplers): dynamic padding then pads little.
    # On CLINC150 a random batch of 32 pads to 1.8x its real tokens, a length-grouped one to 1.03x.
    # The distributed one is a DistributedSampler, so Ray's prepare_data_loader keeps it as it is.
    lengths = [len(e[0]) for e in examples]
    if world > 1:
        sampler = DistributedLengthGroupedSampler(
            cfg.batch_size * world, num_replicas=world, rank=rank, seed=cfg.seed, lengths=lengths
        )
    else:
        sampler = LengthGroupedSampler(
            cfg.batch_size, lengths=lengths, generator=torch.Generator().manual_seed(cfg.seed)
        )
    loader = DataLoader(examples, batch_size=cfg.batch_size, sampler=sampler, collate_fn=collate)

    # Resume: Ray hands the latest reported checkpoint to a restarted worker group.
    resume_dir, ckpt_ctx = None, None
    if cfg.in_ray:
        import ray.train

        ckpt = ray.train.get_checkpoint()
        if ckpt is not None:
            ckpt_ctx = ckpt.as_directory()
            resume_dir = Path(ckpt_ctx.__enter__())
    elif cfg.resume_from:
        resume_dir = Path(cfg.resume_from)
    state = {"epoch": -1, "step": 0, "losses": []}
    if resume_dir is not None:
        state = json.loads((resume_dir / STATE).read_text())
        load_trainable(model, resume_dir / WEIGHTS)

    engine = None
    if cfg.deepspeed is not None:
        import deepspeed

        model.to("cuda" if on_gpu else "cpu")
        engine, opt, _, _ = deepspeed.initialize(
            model=model,
            model_parameters=_param_groups(model, cfg),
            config=deepspeed_config(cfg.deepspeed, cfg, world, on_gpu),
        )
        if resume_dir is not None and (resume_dir / DS_DIR).exists():
            engine.load_checkpoint(str(resume_dir / DS_DIR), tag="state")
        device = engine.device
        if world > 1 and cfg.in_ray:
            import ray.train.torch

            loader = ray.train.torch.prepare_data_loader(loader, move_to_device=False)
        train_model, step_model = engine, engine
    else:
        opt = torch.optim.AdamW(_param_groups(model, cfg), weight_decay=cfg.weight_decay)
        if resume_dir is not None and (resume_dir / OPTIM).exists():
            load_optimizer(opt, resume_dir)
        if cfg.in_ray:
            import ray.train.torch

            model = ray.train.torch.prepare_model(
                model, parallel_strategy_kwargs={"find_unused_parameters": False}
            )
            loader = ray.train.torch.prepare_data_loader(loader, move_to_device=False)
            device = ray.train.torch.get_device()
        else:
            device = torch.device("cuda" if on_gpu else "cpu")
            model.to(device)
            if world > 1:
                model = nn.parallel.DistributedDataParallel(model)
        train_model, step_model = model, None
    if ckpt_ctx is not None:
        ckpt_ctx.__exit__(None, None, None)

    start_epoch = state["epoch"] + 1
    steps_per_epoch = len(loader)
    total_steps = max(1, steps_per_epoch * cfg.epochs)
    step = state["step"]
    metrics: dict[str, Any] = {"start_epoch": start_epoch, "world_size": world, "batch_size": cfg.batch_size}
    unwrapped = engine.module if engine is not None else getattr(model, "module", model)
    for epoch in range(start_epoch, cfg.epochs):
        train_model.train()
        if hasattr(loader, "sampler") and hasattr(loader.sampler, "set_epoch"):
            loader.sampler.set_epoch(epoch)
        total, seen, tokens, t0 = 0.0, 0, 0, time.perf_counter()
        bar = _progress(
            steps_per_epoch, f"epoch {epoch + 1}/{cfg.epochs}", enabled=cfg.progress and rank == 0
        )
        for batch in loader:
            n = int(batch.pop("examples", len(batch["input_ids"])))
            tokens += int(batch.pop("tokens")) if "tokens" in batch else int(batch["attention_mask"].sum())
            batch = {k: v.to(device) for k, v in batch.items()}
            factor = _lr_factor(step, total_steps, cfg.warmup)
            for group in (engine.optimizer if engine is not None else opt).param_groups:
                group["lr"] = group.get("base_lr", cfg.lr) * factor
            loss = _compute_loss(train_model, batch, cfg)
            if step_model is not None:
                step_model.backward(loss)
                step_model.step()
            else:
                loss.backward()
                torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], 1.0)
                opt.step()
                opt.zero_grad(set_to_none=True)
            step += 1
            total += loss.item() * n
            seen += n
            if bar is not None:
                bar.set_postfix(loss=f"{loss.item():.4f}")
                bar.update(1)
        if bar is not None:
            bar.close()
        seconds = time.perf_counter() - t0
        mean_loss = total / max(seen, 1)
        if world > 1:
            t = torch.tensor([total, float(seen)])
            torch.distributed.all_reduce(t)
            mean_loss = (t[0] / t[1].clamp(min=1)).item()
        if not cfg.progress and rank == 0:  # no bar (output is not a terminal): one line per epoch
            print(f"epoch {epoch + 1}/{cfg.epochs}: loss {mean_loss:.4f}, {steps_per_epoch} batches, "
                  f"{seconds:.0f} s", file=sys.stderr, flush=True)  # fmt: skip
        state = {"epoch": epoch, "step": step, "losses": [*state["losses"], mean_loss]}
        # This worker process's CPU seconds so far (its whole life: loading the base, every epoch), summed
        # over the workers: what the compile's net-savings arithmetic prices (compile/compute.py).
        cpu = torch.tensor([time.process_time()], dtype=torch.float64)
        if world > 1:
            summed = cpu.to(device) if on_gpu else cpu  # NCCL reduces GPU tensors only
            torch.distributed.all_reduce(summed)
            cpu = summed.cpu()
        metrics = {
            "epoch": epoch,
            "loss": mean_loss,
            "losses": state["losses"],
            "examples_per_s": seen * world / max(seconds, 1e-9),
            "tokens_per_s": tokens * world / max(seconds, 1e-9),
            "start_epoch": start_epoch,
            "world_size": world,
            "batch_size": cfg.batch_size,
            "worker_cpu_s": round(float(cpu[0]), 3),
            "gpus": world if on_gpu else 0,
        }
        metrics["checkpoint"] = _checkpoint(cfg, unwrapped, opt, state, rank, engine, epoch, metrics)
        _maybe_kill(cfg, rank, epoch)
    return metrics


def _progress(total: int, desc: str, enabled: bool):
    if not enabled:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit="batch", leave=False, mininterval=2.0)


def _checkpoint(cfg: TrainConfig, model, opt, state, rank, engine, epoch, metrics) -> str | None:
    """Report (Ray) or write (plain) this epoch's checkpoint; returns its directory in plain runs."""
    if cfg.in_ray:
        import ray.train
        from ray.train import Checkpoint

        with tempfile.TemporaryDirectory() as tmp:
            write_checkpoint(Path(tmp), model, opt, state, rank, engine)
            has_files = any(Path(tmp).iterdir())
            reported = {k: v for k, v in metrics.items() if k != "checkpoint"}
            ray.train.report(reported, checkpoint=Checkpoint.from_directory(tmp) if has_files else None)
        return None
    out = Path(cfg.output_dir or tempfile.mkdtemp(prefix="kolm-train-")) / f"epoch-{epoch}"
    out.mkdir(parents=True, exist_ok=True)
    write_checkpoint(out, model, opt, state, rank, engine)
    return str(out)


def _maybe_kill(cfg: TrainConfig, rank: int, epoch: int) -> None:
    k = cfg.kill_once
    if not k or rank != k.get("rank", 0) or epoch != k.get("after_epoch", 0):
        return
    marker = Path(k["marker"])
    if marker.exists():
        return
    if k.get("wait_for"):
        import glob
        import time

        deadline = time.monotonic() + 120
        while not glob.glob(k["wait_for"]) and time.monotonic() < deadline:
            time.sleep(0.2)
    marker.write_text(str(os.getpid()))
    os.kill(os.getpid(), signal.SIGKILL)


MIN_BATCH = 8  # per worker: below this a CPU step costs nearly what a bigger one does


def batch_size_for(n_rows: int, cfg: TrainConfig, world: int) -> int:
    """The per-worker batch: cfg.batch_size, or less (not below MIN_BATCH) when the train split is too small
    for cfg.min_steps optimizer steps over cfg.epochs."""
    if cfg.min_steps <= 0 or cfg.batch_size <= MIN_BATCH:
        return cfg.batch_size
    per_epoch = math.ceil(cfg.min_steps / max(1, cfg.epochs))
    return max(MIN_BATCH, min(cfg.batch_size, math.ceil(n_rows / world) // per_epoch))


def steps_for(n_rows: int, batch_size: int, world: int) -> int:
    """Optimizer steps per epoch for n_rows split across `world` workers."""
    return math.ceil(math.ceil(n_rows / world) / batch_size)
