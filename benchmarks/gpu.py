"""The GPU path in one run: LoRA throughput (HF+PEFT eager against kolm's own training step), DeepSpeed
ZeRO-2/3 through the same per-worker function, and the closed-vocab scorer's served form against eager.

    python3 benchmarks/gpu.py                  # on a GPU: the real Qwen2.5-Coder 3B and 7B shapes, bf16
    python3 benchmarks/gpu.py --small --out /tmp/gpu.json   # CPU-small: tiny shapes, the same code, seconds
    bash benchmarks/gpu.sh                     # on a lent GPU machine: install carried wheels, then the above

- LoRA: r=16 (alpha 32, dropout 0.05) on every linear layer, random weights in the real shapes (configs from
  the published Qwen2.5-Coder values, no download), rows of `seq_len` tokens. The baseline is plain
  transformers + PEFT: a full-row loss through `model(labels=...)`, PyTorch eager, AdamW. kolm's step is
  `kolm_ray.compile.train.loop.train_loop_per_worker` itself, called without Ray on a local directory holding the
  same random weights: SFT pairs packed into `seq_len`-token rows (position ids restart per pair), the loss
  on answer tokens only (Liger's fused linear cross-entropy when importable, else chunked), SDPA. Two epochs
  of `--steps` steps each: the first warms up, the second is timed (the loop's own tokens_per_s). Baseline:
  `--warmup` steps, then `--steps` timed. Both count the tokens they run through the model.
- DeepSpeed: configs/deepspeed/zero2.json and zero3.json, a tiny model, the per-worker function on one
  device. The loss must fall, and the checkpoint must reload to the same loss two ways: the trainable
  weights kolm compile packs (model.safetensors) and DeepSpeed's own ZeRO shards (zero_to_fp32), each into a
  fresh model; reload_ok also needs that loss below the untrained model's.
- Scorer: one input of at most 32 tokens (prompt + every candidate, packed) on the 3B shape: models.
  score_candidates (eager) against static_scorer.StaticScorer (one CUDA graph per length bucket; on CPU
  the same static path without a graph), p50 of `--queries` queries.

The models, rows and memory helpers the parts share are in benchmarks/gpu_models.py. Imports nothing of Ray
(the GPU machine has none). Writes the JSON after every part, so a run cut short keeps what it measured
("complete": false).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))  # gpu_models.py beside this script

import torch  # noqa: E402
from gpu_models import (  # noqa: E402
    SHAPES,
    SMALL,
    TINY_DS,
    WORDS,
    peak_gib,
    random_lm,
    reset_peak,
    save_base,
    sft_rows,
    sync,
    tiny_tokenizer,
)

BATCH = {"qwen2.5-coder-3b": 8, "qwen2.5-coder-7b": 4}  # rows per step: the HF+PEFT H100 runs
LORA = {"r": 16, "alpha": 32, "dropout": 0.05}


# ---- LoRA throughput --------------------------------------------------------------------------------------


def hf_peft_baseline(shape, seq: int, batch: int, warmup: int, steps: int, device: str, dtype) -> dict:
    """Plain transformers + PEFT: full rows, `model(labels=input_ids)` (logits for every position), AdamW."""
    from peft import LoraConfig, TaskType, get_peft_model

    reset_peak()
    model = random_lm(shape, device, dtype)
    cfg = LoraConfig(task_type=TaskType.CAUSAL_LM, r=LORA["r"], lora_alpha=LORA["alpha"],
                     lora_dropout=LORA["dropout"], target_modules="all-linear")  # fmt: skip
    model = get_peft_model(model, cfg).train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    gen = torch.Generator().manual_seed(0)
    batches = [
        torch.randint(0, shape[5], (batch, seq), generator=gen).to(device) for _ in range(warmup + steps)
    ]
    losses, t0 = [], 0.0
    for i, ids in enumerate(batches):
        if i == warmup:
            sync()
            t0 = time.perf_counter()
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
    sync()
    seconds = time.perf_counter() - t0
    out = {"tok_s": batch * seq * steps / seconds, "peak_gib": peak_gib(), "loss_last": losses[-1]}
    del model, opt, batches
    reset_peak()
    return out


def kolm_step(base_dir: Path, seq: int, batch: int, steps: int, tokenizer, work: Path, liger: bool) -> dict:
    """train_loop_per_worker on packed SFT pairs: epoch 1 warms up, epoch 2 is the timed one."""
    from kolm_ray.compile.train.config import TrainConfig
    from kolm_ray.compile.train.loop import train_loop_per_worker

    pair = max(32, seq // 4)  # four pairs to a row on average
    rows = sft_rows(batch * 4 * steps, pair, tokenizer)
    os.environ["KOLM_LIGER"] = "1" if liger else "0"
    reset_peak()
    cfg = TrainConfig(
        base=str(base_dir), kind="causal-lm", rows=rows, epochs=2, batch_size=batch * 4, min_steps=0, lr=2e-4,
        warmup=0.0, max_len=seq, pack_len=seq, lora_r=LORA["r"], lora_alpha=LORA["alpha"], progress=False,
        output_dir=str(work / "run"), seed=0,
    )  # fmt: skip
    m = train_loop_per_worker(cfg.to_dict())
    sync()
    out = {"tok_s": m["tokens_per_s"], "peak_gib": peak_gib(), "losses": m["losses"],
           "steps_per_epoch": math.ceil(len(rows) / (batch * 4))}  # fmt: skip
    shutil.rmtree(work / "run", ignore_errors=True)
    reset_peak()
    return out


def lora_part(name: str, shape, a, device: str, dtype, tokenizer, work: Path) -> dict:
    from kolm_ray.compile.train.lm_loss import liger_available

    batch = a.batch or BATCH[name]
    t0 = time.perf_counter()
    hf = hf_peft_baseline(shape, a.seq_len, batch, a.warmup, a.steps, device, dtype)
    base_dir = work / f"base-{name}"
    save_base(shape, base_dir, tokenizer, dtype)
    liger, liger_error = liger_available(), None
    try:
        kolm = kolm_step(base_dir, a.seq_len, batch, a.steps, tokenizer, work, liger=liger)
    except Exception as e:  # Liger's kernels first run here, on the GPU: keep the run, time the chunked loss
        if not liger:
            raise
        liger, liger_error = False, f"{type(e).__name__}: {str(e).strip()[:300]}"
        kolm = kolm_step(base_dir, a.seq_len, batch, a.steps, tokenizer, work, liger=False)
    out: dict[str, Any] = {
        "hf_peft_tok_s": round(hf["tok_s"], 1), "kolm_tok_s": round(kolm["tok_s"], 1),
        "kolm_peak_gib": round(kolm["peak_gib"], 2), "seq_len": a.seq_len, "batch": batch,
        "speedup": round(kolm["tok_s"] / hf["tok_s"], 3), "hf_peft_peak_gib": round(hf["peak_gib"], 2),
        "kolm_losses": kolm["losses"], "kolm_steps_per_epoch": kolm["steps_per_epoch"],
        "kolm_loss": "liger fused linear cross-entropy" if liger else "chunked cross-entropy",
        "parameters": sum(math.prod(s) for s in _shapes_of(shape)),
    }  # fmt: skip
    if liger_error:
        out["liger_error"] = liger_error
    if liger and name == "qwen2.5-coder-3b" and not a.small:  # Liger against our own chunked CE
        out["kolm_chunked_tok_s"] = round(
            kolm_step(base_dir, a.seq_len, batch, a.steps, tokenizer, work, False)["tok_s"], 1
        )
    shutil.rmtree(base_dir, ignore_errors=True)
    out["seconds"] = round(time.perf_counter() - t0, 1)
    return out


def _shapes_of(shape) -> list[tuple[int, ...]]:
    hidden, layers, heads, kv, inter, vocab, tied = shape
    head_dim = hidden // heads
    per_layer = [(hidden, hidden), (kv * head_dim, hidden), (kv * head_dim, hidden), (hidden, hidden),
                 (inter, hidden), (inter, hidden), (hidden, inter)]  # fmt: skip
    return [(vocab, hidden)] * (1 if tied else 2) + per_layer * layers


# ---- DeepSpeed ZeRO-2 / ZeRO-3 ----------------------------------------------------------------------------


def eval_loss(model, examples, pad: int) -> float:
    from kolm_ray.compile.train.data import pack_sft
    from kolm_ray.compile.train.lm_loss import output_token_loss

    device = next(model.parameters()).device
    model.eval()
    with torch.no_grad():
        batch = {k: v.to(device) for k, v in pack_sft(examples, 512, pad).items()}
        return float(output_token_loss(model, batch))


def deepspeed_part(stage: int, tokenizer, work: Path, device: str) -> dict:
    """One ZeRO stage through the per-worker function; then both checkpoint forms reload to the same loss."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint
    from safetensors.torch import load_file

    from kolm_ray.compile.train.checkpoint import DS_DIR, WEIGHTS
    from kolm_ray.compile.train.config import TrainConfig
    from kolm_ray.compile.train.loop import train_loop_per_worker
    from kolm_ray.models.bases import resolve_base
    from kolm_ray.models.modeling import add_lora, sft_example

    base_dir = work / "ds-base"
    if not base_dir.exists():
        save_base(TINY_DS, base_dir, tokenizer, torch.float32)
    rows = sft_rows(64, 48, tokenizer, seed=stage)
    raw = json.loads((REPO / "configs" / "deepspeed" / f"zero{stage}.json").read_text())
    cfg = TrainConfig(
        base=str(base_dir), kind="causal-lm", rows=rows, epochs=3, batch_size=8, min_steps=0, lr=3e-3,
        warmup=0.0, max_len=128, pack_len=256, lora_r=8, lora_alpha=16, progress=False, deepspeed=raw,
        output_dir=str(work / f"zero{stage}"), seed=0,
    )  # fmt: skip
    t0 = time.perf_counter()
    m = train_loop_per_worker(cfg.to_dict())
    seconds = time.perf_counter() - t0
    ckpt = Path(m["checkpoint"])
    base = resolve_base(str(base_dir))
    pad = tokenizer.pad_token_id
    examples = [sft_example(tokenizer, r["input"], r["output"], 128) for r in rows[:16]]

    def fresh():
        torch.manual_seed(0)
        return add_lora(base.load_model(dtype=torch.float32, attn="sdpa"), r=8, alpha=16).to(device)

    untrained = eval_loss(fresh(), examples, pad)
    packed = fresh()
    packed.load_state_dict(load_file(str(ckpt / WEIGHTS)), strict=False)
    loss_packed = eval_loss(packed, examples, pad)
    sharded = fresh()
    full = get_fp32_state_dict_from_zero_checkpoint(str(ckpt / DS_DIR), tag="state")
    lora = {k: v for k, v in full.items() if "lora_" in k}
    missing, unexpected = sharded.load_state_dict(lora, strict=False)
    loss_sharded = eval_loss(sharded, examples, pad)
    ok = (
        bool(lora) and not unexpected and math.isfinite(loss_packed)
        and abs(loss_packed - loss_sharded) <= 1e-2 * max(1.0, abs(loss_packed)) and loss_packed < untrained
    )  # fmt: skip
    return {
        "loss_first": m["losses"][0], "loss_last": m["losses"][-1], "reload_ok": ok, "losses": m["losses"],
        "reloaded_loss": loss_packed, "reloaded_from_zero_shards_loss": loss_sharded, "untrained_loss": untrained,
        "lora_tensors": len(lora), "seconds": round(seconds, 1),
    }  # fmt: skip


# ---- the closed-vocab scorer ------------------------------------------------------------------------------


def scorer_part(shape, a, device: str, dtype, tokenizer) -> dict:
    from kolm_ray.inference.static_scorer import StaticScorer
    from kolm_ray.models.modeling import _end_ids, prompt_text, score_candidates

    model = random_lm(shape, device, dtype, tokenizer).eval()
    # A router's answers (bare namespace names) behind prompts of 1-3 words: rows of at most 32 tokens.
    names = ["billing", "runbooks", "incidents", "search"]
    size = lambda t: len(tokenizer(t, add_special_tokens=False)["input_ids"])  # noqa: E731
    cand_len = [size(n) + len(_end_ids(tokenizer)) for n in names]
    shortest = size(prompt_text(tokenizer, "restart"))
    k = max(2, max(i for i in range(1, len(names) + 1) if shortest + sum(cand_len[:i]) <= 32))
    cands, cand_tokens = names[:k], sum(cand_len[:k])
    rng = random.Random(1)
    queries = []
    for _ in range(1000 * a.queries):  # prompts that leave the packed row at most 32 tokens
        q = " ".join(rng.choices(WORDS, k=rng.randint(1, 3)))
        if size(prompt_text(tokenizer, q)) + cand_tokens <= 32:
            queries.append(q)
        if len(queries) == a.queries:
            break
    if len(queries) < a.queries:
        raise SystemExit(f"error: only {len(queries)} prompts fit 32 tokens with {k} candidates")
    served = StaticScorer(model, tokenizer, cands, buckets=(32,))

    def timed(fn) -> tuple[list[float], torch.Tensor]:
        for q in queries[:3]:
            fn([q])
        sync()
        ms, out = [], []
        for q in queries:
            t0 = time.perf_counter()
            out.append(fn([q]))  # both return CPU tensors: the time includes the copy back
            ms.append((time.perf_counter() - t0) * 1e3)
        return ms, torch.cat(out)

    eager_ms, eager = timed(lambda q: score_candidates(model, tokenizer, q, cands))
    served_ms, got = timed(served)
    out = {
        "p50_ms": round(statistics.median(served_ms), 3), "eager_p50_ms": round(statistics.median(eager_ms), 3),
        "speedup": round(statistics.median(eager_ms) / statistics.median(served_ms), 2),
        "served": "cuda graph per length bucket" if served.graphs else "static shapes, no graph (CPU)",
        "tokens_per_row": 32, "candidates": len(cands), "queries": len(queries),
        "mean_real_tokens": round(statistics.mean(size(prompt_text(tokenizer, q)) + cand_tokens for q in queries), 1),
        "max_abs_score_difference": float((got - eager).abs().max()),
        "same_top_answer": float((got.argmax(1) == eager.argmax(1)).float().mean()),
    }  # fmt: skip
    return out  # the model goes with this frame; main's reset_peak then frees it


# ---- the run ----------------------------------------------------------------------------------------------


PARTS = ("lora3b", "lora7b", "scorer", "deepspeed")


def run_part(part: str, report: dict, a, shapes, device: str, dtype, tokenizer, work: Path) -> None:
    """One part's figures into `report` (lora3b / lora7b / scorer / deepspeed)."""
    if part in ("lora3b", "lora7b"):
        name = f"qwen2.5-coder-{part[4:]}"
        report["lora"][name] = lora_part(name, shapes[name], a, device, dtype, tokenizer, work)
    elif part == "scorer":
        report["scorer"]["qwen2.5-coder-3b"] = scorer_part(
            shapes["qwen2.5-coder-3b"], a, device, dtype, tokenizer
        )
        reset_peak()
    elif part == "deepspeed":
        try:
            import deepspeed  # noqa: F401
        except ImportError as e:
            report["skipped"]["deepspeed"] = f"deepspeed is not importable: {e}"
            return
        for stage in (2, 3):
            report["deepspeed"][f"zero{stage}"] = deepspeed_part(stage, tokenizer, work, device)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument(
        "--small", action="store_true", help="tiny shapes on whatever device (default without CUDA)"
    )
    ap.add_argument("--out", default=None, help="JSON path (default: benchmarks/results/gpu.json on a GPU)")
    ap.add_argument("--parts", default="lora3b,scorer,deepspeed,lora7b", help="comma-separated, in run order")
    ap.add_argument("--seq-len", type=int, default=None, help="default 1024 (128 with --small)")
    ap.add_argument("--batch", type=int, default=None, help="rows per step (default 8 for 3B, 4 for 7B)")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--steps", type=int, default=None, help="timed steps (default 6, 2 with --small)")
    ap.add_argument("--queries", type=int, default=None, help="scorer queries (default 100, 10 with --small)")
    a = ap.parse_args(argv)
    on_gpu = torch.cuda.is_available()
    a.small = a.small or not on_gpu
    a.seq_len = a.seq_len or (128 if a.small else 1024)
    a.steps = a.steps or (2 if a.small else 6)
    a.queries = a.queries or (10 if a.small else 100)
    if a.small and a.batch is None:
        a.batch = 2
    if a.out is None:
        a.out = (
            str(REPO / "benchmarks" / "results" / "gpu.json")
            if not a.small
            else str(Path(tempfile.gettempdir()) / "gpu-cpu-small.json")
        )
    device = "cuda" if on_gpu else "cpu"
    dtype = torch.bfloat16 if on_gpu else torch.float32
    if not on_gpu:
        torch.set_num_threads(min(2, os.cpu_count() or 1))
    shapes = SMALL if a.small else SHAPES
    import transformers

    report: dict[str, Any] = {
        "device": ("cpu-small" if not on_gpu else torch.cuda.get_device_name() + (" (small shapes)" if a.small else "")),
        "when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "mode": "small" if a.small else "full", "dtype": str(dtype).removeprefix("torch."),
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__,
                     "cuda": torch.version.cuda, "python": sys.version.split()[0]},
        "command": " ".join([Path(sys.argv[0]).name, *(argv if argv is not None else sys.argv[1:])]),
        "load_avg_start": os.getloadavg(), "lora": {}, "deepspeed": {}, "scorer": {}, "skipped": {}, "errors": {},
        "complete": False,
    }  # fmt: skip
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)

    def write() -> None:
        tmp = out.with_suffix(".tmp")
        tmp.write_text(json.dumps(report, indent=2))
        os.replace(tmp, out)  # never a half-written file

    tokenizer = tiny_tokenizer()
    t_start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="kolm-gpu-") as tmp:
        work = Path(tmp)
        for part in [p.strip() for p in a.parts.split(",") if p.strip()]:
            t0 = time.perf_counter()
            print(f"[{time.perf_counter() - t_start:6.1f}s] {part} ...", flush=True)
            if part not in PARTS:
                raise SystemExit(f"error: unknown part {part!r}; known: {', '.join(PARTS)}")
            try:
                run_part(part, report, a, shapes, device, dtype, tokenizer, work)
            except Exception as e:  # one part's failure must not cost the others' figures (one GPU run)
                import traceback

                traceback.print_exc()
                report["errors"][part] = f"{type(e).__name__}: {str(e).strip()[:500]}"
                reset_peak()
            print(
                f"[{time.perf_counter() - t_start:6.1f}s] {part} done in {time.perf_counter() - t0:.1f}s",
                flush=True,
            )
            write()
    report["complete"] = True
    report["seconds"] = round(time.perf_counter() - t_start, 1)
    report["load_avg_end"] = os.getloadavg()
    report["ray_imported"] = "ray" in sys.modules
    write()
    print(summary(report))
    print(f"wrote {out}")
    return 1 if report["errors"] else 0


def summary(r: dict) -> str:
    lines = [f"device {r['device']}  mode {r['mode']}  {r.get('seconds', '?')} s"]
    for name, v in r["lora"].items():
        lines.append(f"lora {name}: hf+peft {v['hf_peft_tok_s']:.0f} tok/s, kolm {v['kolm_tok_s']:.0f} tok/s "
                     f"({v['speedup']}x), kolm peak {v['kolm_peak_gib']} GiB, batch {v['batch']} x {v['seq_len']}")  # fmt: skip
    for name, v in r["deepspeed"].items():
        lines.append(
            f"deepspeed {name}: loss {v['loss_first']:.3f} -> {v['loss_last']:.3f}, reload_ok {v['reload_ok']}"
        )
    for name, v in r["scorer"].items():
        lines.append(
            f"scorer {name}: served p50 {v['p50_ms']} ms, eager p50 {v['eager_p50_ms']} ms ({v['served']})"
        )
    lines += [f"skipped {k}: {v}" for k, v in r["skipped"].items()]
    lines += [f"FAILED {k}: {v}" for k, v in r["errors"].items()]
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())
