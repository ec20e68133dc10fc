"""The causal-LM SFT loss over the answer tokens only, without [tokens x vocabulary] logits for the whole batch.

Hugging Face's `model(labels=...)` projects every position onto the vocabulary and upcasts the logits to
float32 before the cross-entropy: for a batch of 8 x 1024 tokens and Qwen2.5's 151,936 tokens that is a
5 GB tensor (and its gradient), though SFT takes the loss on the answer tokens alone, a small share of a
prompt + answer pair. Here the model runs with `logits_to_keep=1` (the head on one position per row, which
is discarded), a forward hook on its decoder keeps the final hidden states, and the output head is applied
to the positions that predict an answer token only:

- Liger Kernel's fused linear cross-entropy (Triton; never materialises the logits) when it is importable,
  the model is on a GPU and the head's weight is a plain tensor (not partitioned by ZeRO-3);
- else chunks of CHUNK positions through the head module itself, each under activation checkpointing, so
  at most one chunk's float32 logits exist at a time (under ZeRO-3, one call over the answer positions).

The loss is the mean over answer tokens, as Hugging Face's (tests/test_train_lm.py checks they are equal).
"""

from __future__ import annotations

import os

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from kolm_ray.models.modeling import IGNORE

CHUNK = 1024  # positions per head call: 1024 x 151,936 float32 logits is 0.6 GB


def _unwrap(model: nn.Module) -> nn.Module:
    """The transformers model under DDP / DeepSpeed / PEFT wrappers."""
    while hasattr(model, "module"):
        model = model.module
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def _liger_loss():
    try:
        from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss
    except Exception:  # not installed, or no Triton/GPU: the chunked path is exact too
        return None
    return LigerFusedLinearCrossEntropyLoss(ignore_index=IGNORE, reduction="mean")


_LIGER: dict[str, object] = {}


def liger_available() -> bool:
    """Liger's fused loss is importable, and not turned off (KOLM_LIGER=0, e.g. to time the chunked path)."""
    if os.environ.get("KOLM_LIGER", "1") == "0":
        return False
    if "loss" not in _LIGER:
        _LIGER["loss"] = _liger_loss()
    return _LIGER["loss"] is not None


def _chunk_ce(head: nn.Module, h: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    return nn.functional.cross_entropy(head(h).float(), t, reduction="sum")


def output_token_loss(
    model: nn.Module, batch: dict[str, torch.Tensor], *, use_liger: bool | None = None, chunk: int = CHUNK
) -> torch.Tensor:
    """Mean cross-entropy of the tokens labelled != IGNORE, each predicted from the position before it.

    `model` is what the loop trains (a PEFT model, maybe under DDP or a DeepSpeed engine); its forward is
    called as usual, so wrappers see every step. `batch` holds input_ids, labels and attention_mask or
    position_ids (train.data.pack_sft).
    """
    inner = _unwrap(model)
    decoder, head = inner.get_decoder(), inner.get_output_embeddings()
    kept: list[torch.Tensor] = []
    hook = decoder.register_forward_hook(lambda _m, _a, out: kept.append(out.last_hidden_state))
    try:
        model(
            input_ids=batch["input_ids"],
            attention_mask=batch.get("attention_mask"),
            position_ids=batch.get("position_ids"),
            logits_to_keep=1,
            use_cache=False,
        )
    finally:
        hook.remove()
    hidden = kept[-1]
    targets = batch["labels"][:, 1:]
    sel = targets != IGNORE
    h, t = hidden[:, :-1][sel], targets[sel]
    if t.numel() == 0:
        return hidden.sum() * 0.0  # keeps the graph (DDP expects every step to backpropagate)
    weight = getattr(head, "weight", None)
    if use_liger is None:
        use_liger = h.is_cuda and weight is not None and not hasattr(weight, "ds_id") and liger_available()
    if use_liger and liger_available():
        bias = getattr(head, "bias", None)
        return _LIGER["loss"](weight, h, t, bias) if bias is not None else _LIGER["loss"](weight, h, t)
    if weight is not None and hasattr(weight, "ds_id"):
        # ZeRO-3 partitions the head's weight outside its own forward, so a checkpointed chunk could not
        # recompute it in backward: one call, which ZeRO-3 gathers for and re-gathers in backward.
        return nn.functional.cross_entropy(head(h).float(), t)
    total = h.new_zeros((), dtype=torch.float32)
    for start in range(0, len(t), chunk):
        hc, tc = h[start : start + chunk], t[start : start + chunk]
        total = total + checkpoint(_chunk_ce, head, hc, tc, use_reentrant=False)
    return total / len(t)
