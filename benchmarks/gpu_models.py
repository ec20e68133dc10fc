"""What benchmarks/gpu.py's parts build on: the Qwen2.5-Coder shapes as random-weight models (no download),
a local base directory of one, the tiny tokenizer, SFT rows of a given length, and CUDA sync / peak memory.

Imported by gpu.py (which puts the repository and benchmarks/ on sys.path first); nothing of Ray.
"""

from __future__ import annotations

import gc
import random
from pathlib import Path

import torch

# Qwen2.5-Coder-*-Instruct config.json values: hidden, layers, heads, kv heads, intermediate, vocab, tied.
SHAPES: dict[str, tuple[int, int, int, int, int, int, bool]] = {
    "qwen2.5-coder-3b": (2048, 36, 16, 2, 11008, 151936, True),
    "qwen2.5-coder-7b": (3584, 28, 28, 4, 18944, 152064, False),
}
# CPU-small: the same code on tiny bodies that keep the real vocabularies (the loss's cost is the vocabulary).
SMALL: dict[str, tuple[int, int, int, int, int, int, bool]] = {
    "qwen2.5-coder-3b": (64, 2, 4, 2, 128, 151936, True),
    "qwen2.5-coder-7b": (96, 2, 4, 2, 192, 152064, False),
}
TINY_DS = (64, 2, 4, 2, 128, 4096, True)  # the DeepSpeed check's model
WORDS = (
    "restart ingest worker deploy billing invoice refund runbook incident page alert database query namespace "
    "router recall search order status account password reset the a to of and in is it you that for on how"
).split()


def qwen2_config(shape: tuple, tokenizer=None):
    from transformers import Qwen2Config

    hidden, layers, heads, kv, inter, vocab, tied = shape
    return Qwen2Config(
        hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv,
        intermediate_size=inter, vocab_size=vocab, tie_word_embeddings=tied, max_position_embeddings=32768,
        rope_theta=1e6, rms_norm_eps=1e-6,
        eos_token_id=getattr(tokenizer, "eos_token_id", None), pad_token_id=getattr(tokenizer, "pad_token_id", None),
    )  # fmt: skip


def random_lm(shape: tuple, device: str, dtype: torch.dtype, tokenizer=None, seed: int = 0):
    """A Qwen2ForCausalLM with random weights in `shape`, built directly on `device`."""
    from transformers import Qwen2ForCausalLM

    torch.manual_seed(seed)
    cfg = qwen2_config(shape, tokenizer)
    cfg._attn_implementation = "sdpa"
    with torch.device(device):
        return Qwen2ForCausalLM(cfg).to(dtype)


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def peak_gib() -> float:
    return torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else 0.0


def reset_peak() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def tiny_tokenizer():
    from kolm_ray.models.bases import resolve_base

    return resolve_base("tiny-causal-lm").load_tokenizer()


def sft_rows(n: int, pair_tokens: int, tokenizer, seed: int = 0) -> list[dict]:
    """n pairs of about `pair_tokens` tokens each (prompt + a short JSON answer), random corpus words."""
    from kolm_ray.models.modeling import answer_text, prompt_text

    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        answer = {"namespace": rng.choice(WORDS), "order": f"{rng.randrange(10**6)}"}
        words: list[str] = []
        target = int(pair_tokens * rng.uniform(0.7, 1.3))
        # grow the input until prompt + answer reaches the target length (tokenizing in steps of 16 words)
        while True:
            words += rng.choices(WORDS, k=16)
            text = " ".join(words)
            n_tok = len(tokenizer(prompt_text(tokenizer, text) + answer_text(answer))["input_ids"])
            if n_tok >= target:
                break
        rows.append({"input": text, "output": answer})
    return rows


def save_base(shape, directory: Path, tokenizer, dtype) -> None:
    """The random model as a local Hugging Face directory: what `kolm compile --base DIR` trains from."""
    model = random_lm(shape, "cuda" if torch.cuda.is_available() else "cpu", dtype, tokenizer)
    model.save_pretrained(directory, safe_serialization=True)
    tokenizer.save_pretrained(directory)
    del model
    reset_peak()
