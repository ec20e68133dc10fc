"""Closed-vocab scoring with a causal LM: the packed scorer (kolm_ray.models.modeling.score_candidates) against one
padded row per (query, candidate), the plain way, in one run on the same random-weight model.

    .venv/bin/python benchmarks/causal_scorer.py                       # CPU: a small Qwen2 shape, 152k vocabulary
    .venv/bin/python benchmarks/causal_scorer.py --shape qwen2.5-coder-3b  # on a GPU (bf16): the real 3B shape

The task is the recall router's: each CLINC150 test query against its 10 domains as candidate answers
({"namespace": "banking"}, ...). The packed scorer runs the prompt once with every candidate after it
(4D attention mask, logits only where a candidate token is predicted); the baseline runs prompt + candidate
as one row per candidate, batched, with logits over the whole sequence (what score_candidates did before).
Both must give the same scores (max |difference| is reported). Weights are random in the real shapes (no
download); the tokenizer is the test suite's locally trained BPE with Qwen's chat template, so token counts
are indicative. Writes benchmarks/results/causal_scorer.json and causal_scorer.png.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import torch  # noqa: E402

from kolm_ray.models.bases import resolve_base  # noqa: E402
from kolm_ray.models.modeling import IGNORE, _end_ids, answer_text, pad_batch, prompt_text, score_candidates  # noqa: E402

RESULTS = REPO / "benchmarks" / "results"
CLINC = REPO.parent / "shared" / "datasets" / "clinc150"
# Qwen2 configurations (hidden, layers, heads, kv heads, intermediate, vocabulary, tied embeddings).
SHAPES = {
    "cpu-small": (512, 4, 8, 2, 1408, 151936, True),  # a CPU-sized model with the real vocabulary
    "qwen2.5-coder-0.5b": (896, 24, 14, 2, 4864, 151936, True),
    "qwen2.5-coder-3b": (2048, 36, 16, 2, 11008, 151936, True),
    "qwen2.5-coder-7b": (3584, 28, 28, 4, 18944, 152064, False),
}


def build(shape: str, device: str, dtype: torch.dtype):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    hidden, layers, heads, kv, inter, vocab, tied = SHAPES[shape]
    cfg = Qwen2Config(
        hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv,
        intermediate_size=inter, vocab_size=vocab, tie_word_embeddings=tied, max_position_embeddings=4096,
    )  # fmt: skip
    torch.manual_seed(0)
    with torch.device(device):
        model = Qwen2ForCausalLM(cfg).to(dtype).eval()
    return model


@torch.no_grad()
def one_row_per_candidate(model, tokenizer, inputs, candidates, batch_size: int = 32) -> torch.Tensor:
    """The plain way: prompt + candidate as its own row, right-padded batches, logits for every position."""
    device = next(model.parameters()).device
    cand_ids = [tokenizer(c, add_special_tokens=False)["input_ids"] + _end_ids(tokenizer) for c in candidates]
    scores = torch.empty(len(inputs), len(candidates))
    rows = []
    for i, text in enumerate(inputs):
        prompt = tokenizer(prompt_text(tokenizer, text), add_special_tokens=False)["input_ids"]
        rows += [(i, j, prompt + c, [IGNORE] * len(prompt) + c) for j, c in enumerate(cand_ids)]
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    for start in range(0, len(rows), batch_size):
        chunk = rows[start : start + batch_size]
        ids, mask, lab = pad_batch([r[2] for r in chunk], [r[3] for r in chunk], pad)
        logits = model(input_ids=ids.to(device), attention_mask=mask.to(device)).logits[:, :-1].float()
        target = lab[:, 1:].to(device)
        logp = torch.log_softmax(logits, dim=-1)
        tok = logp.gather(-1, target.clamp(min=0).unsqueeze(-1)).squeeze(-1) * (target != IGNORE)
        for (i, j, _, _), s in zip(chunk, tok.sum(-1).cpu(), strict=True):
            scores[i, j] = s
    return scores


def timed(fn, queries, repeat_warmup: int = 2) -> tuple[list[float], torch.Tensor, float]:
    """Per-query latency (ms), the scores, and peak CUDA memory (GiB, 0 on CPU)."""
    for q in queries[:repeat_warmup]:
        fn([q])
    if torch.cuda.is_available():
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    ms, out = [], []
    for q in queries:
        t0 = time.perf_counter()
        out.append(fn([q]))
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        ms.append((time.perf_counter() - t0) * 1e3)
    peak = torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else 0.0
    return ms, torch.cat(out), peak


def queries_and_domains(n: int) -> tuple[list[str], list[str]]:
    data = json.loads((CLINC / "data_full.json").read_text())
    domains = sorted(json.loads((CLINC / "domains.json").read_text()))
    return [t for t, _ in data["test"][:: max(1, len(data["test"]) // n)][:n]], domains


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument(
        "--shape", default=None, choices=sorted(SHAPES), help="default: 3B on a GPU, cpu-small else"
    )
    ap.add_argument("--queries", type=int, default=40)
    ap.add_argument("--out", default=str(RESULTS))
    a = ap.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    shape = a.shape or ("qwen2.5-coder-3b" if device == "cuda" else "cpu-small")
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    if device == "cpu":
        torch.set_num_threads(min(2, os.cpu_count() or 1))
    tokenizer = resolve_base("tiny-causal-lm").load_tokenizer()
    model = build(shape, device, dtype)
    queries, domains = queries_and_domains(a.queries)
    candidates = [answer_text({"namespace": d}) for d in domains]
    ours_ms, ours, ours_peak = timed(lambda q: score_candidates(model, tokenizer, q, candidates), queries)
    base_ms, base, base_peak = timed(
        lambda q: one_row_per_candidate(model, tokenizer, q, candidates), queries
    )
    prompt_tokens = statistics.mean(
        len(tokenizer(prompt_text(tokenizer, q), add_special_tokens=False)["input_ids"]) for q in queries
    )
    cand_tokens = [len(tokenizer(c, add_special_tokens=False)["input_ids"]) + 1 for c in candidates]

    def summary(ms, peak):
        return {"p50_ms": round(statistics.median(ms), 2), "mean_ms": round(statistics.mean(ms), 2),
                "queries_per_s": round(1e3 / statistics.mean(ms), 2), "peak_gib": round(peak, 2)}  # fmt: skip

    report = {
        "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]),
        "device": torch.cuda.get_device_name() if device == "cuda" else f"cpu ({torch.get_num_threads()} threads)",
        "dtype": str(dtype).replace("torch.", ""),
        "shape": dict(zip(("hidden", "layers", "heads", "kv_heads", "intermediate", "vocab", "tied"), SHAPES[shape], strict=True)),
        "shape_name": shape,
        "parameters": sum(p.numel() for p in model.parameters()),
        "queries": len(queries),
        "candidates": len(candidates),
        "mean_prompt_tokens": round(prompt_tokens, 1),
        "candidate_tokens": cand_tokens,
        "packed": summary(ours_ms, ours_peak),
        "one_row_per_candidate": summary(base_ms, base_peak),
        "speedup_p50": round(statistics.median(base_ms) / statistics.median(ours_ms), 2),
        "max_abs_score_difference": float((ours - base).abs().max()),
        "same_top_answer": float((ours.argmax(1) == base.argmax(1)).float().mean()),
        "machine": {"cpus": os.cpu_count(), "load_avg_at_end": os.getloadavg()},
    }  # fmt: skip
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "causal_scorer.json").write_text(json.dumps(report, indent=2))
    plot(report, ours_ms, base_ms, out / "causal_scorer.png")
    print(json.dumps({k: report[k] for k in ("shape_name", "device", "packed", "one_row_per_candidate",
                                             "speedup_p50", "max_abs_score_difference", "same_top_answer")}, indent=2))  # fmt: skip
    return 0


def plot(report, ours_ms, base_ms, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.8))
    ax.boxplot([base_ms, ours_ms], showfliers=False)
    ax.set_xticks([1, 2], ["one row per candidate", "packed (kolm)"])
    ax.set_ylabel("ms per query (10 candidates)")
    ax.set_title(
        f"closed-vocab scoring, {report['shape_name']} random weights, {report['device']}: "
        f"{report['speedup_p50']}x",
        fontsize=8,
    )
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    raise SystemExit(main())
