"""The two model families a base turns into.

EncoderTagger (encoder bases such as minilm-l6): the encoder, mean pooling over real tokens, and one
linear head per closed-vocab field. forward() returns {field: logits}; a boolean mask of allowed values
per field is applied to the logits before any softmax, so a masked value can never be the answer.

Causal LMs (qwen2.5-coder-*, local causal directories): LoRA (PEFT) supervised fine-tuning on the chat
template with the loss on the answer tokens only. At inference a closed-vocab answer is chosen by
scoring every allowed completion's log-likelihood, so the answer is always in the vocabulary and the
softmax over those log-likelihoods is its confidence; other outputs are generated greedily.
"""

from __future__ import annotations

import itertools
import json
import math
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

IGNORE = -100  # label id the loss skips (prompt tokens, padding)
MAX_CANDIDATES = 512  # above this many joint closed-vocab answers, generate instead of scoring each


class EncoderTagger(nn.Module):
    """Encoder + mean pooling + one linear head per closed-vocab field."""

    def __init__(self, encoder: nn.Module, labels: dict[str, list[Any]], dropout: float = 0.1):
        super().__init__()
        if getattr(encoder, "pooler", None) is not None:
            encoder.pooler = None  # we mean-pool; an unused pooler would also stall DDP (no gradient)
        self.encoder = encoder
        self.labels = {k: list(v) for k, v in labels.items()}
        self.fields = list(self.labels)
        hidden = encoder.config.hidden_size
        self.dropout = nn.Dropout(dropout)
        # Heads are keyed by position: field names may hold characters ModuleDict refuses ('.').
        self.heads = nn.ModuleList([nn.Linear(hidden, len(v)) for v in self.labels.values()])

    def freeze(self, embeddings: bool = True, layers: int = 0) -> None:
        """Freeze the embeddings and the lowest `layers` encoder layers (fewer gradients, faster CPU epochs)."""
        emb = getattr(self.encoder, "embeddings", None)
        if embeddings and emb is not None:
            emb.requires_grad_(False)
        blocks = getattr(getattr(self.encoder, "encoder", None), "layer", None)
        if blocks is not None:
            for block in list(blocks)[:layers]:
                block.requires_grad_(False)

    def pooled(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        hidden = self.encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        m = attention_mask.unsqueeze(-1).to(hidden.dtype)
        return (hidden * m).sum(1) / m.sum(1).clamp(min=1.0)

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        masks: dict[str, torch.Tensor] | None = None,
        mix_partner: torch.Tensor | None = None,
        mix_lambda: torch.Tensor | None = None,
    ) -> dict[str, torch.Tensor]:
        """Per-field logits (batch, n_values); values where masks[field] is False get -inf.

        Training with mix_partner (batch,) and mix_lambda (batch,): `batch` more rows follow the real ones,
        row i's pooled vector mixed with row mix_partner[i]'s (lambda * a + (1 - lambda) * b), for
        encoder_loss's pseudo-outliers.
        """
        pooled = self.pooled(input_ids, attention_mask)
        if mix_partner is not None and mix_lambda is not None:
            lam = mix_lambda.to(pooled.dtype).unsqueeze(-1)
            pooled = torch.cat([pooled, lam * pooled + (1 - lam) * pooled[mix_partner]])
        pooled = self.dropout(pooled)
        out = {}
        for field, head in zip(self.fields, self.heads, strict=True):
            logits = head(pooled)
            if masks is not None and field in masks:
                logits = logits.masked_fill(~masks[field].to(logits.device), float("-inf"))
            out[field] = logits
        return out


def encoder_loss(
    logits: dict[str, torch.Tensor],
    targets: torch.Tensor,
    negative: torch.Tensor,
    negative_weight: float = 1.0,
    mix_partner: torch.Tensor | None = None,
    mix_weight: float = 0.0,
) -> torch.Tensor:
    """Cross-entropy per field for labelled rows; for `negative` rows ("none of these"), the KL divergence
    from the uniform distribution, which pushes their confidence down toward 1/n_values.

    With mix_partner (the logits then hold the forward's mixed rows after the real ones): the same KL on
    each mixed row whose two sources have different values for the field. These pseudo-outliers sit
    between the classes, where out-of-scope inputs tend to land; trained toward "none of these", they
    keep the head from being confident there (Zhan et al., ACL 2021, mix in-domain representations the
    same way for out-of-scope intent detection).

    targets: (batch, n_fields) value index, -1 where a row has no label for that field.
    """
    total = torch.zeros((), device=targets.device)
    n = targets.shape[0]
    for i, lg in enumerate(logits.values()):
        logp = torch.log_softmax(lg.float(), dim=-1)
        # KL(uniform || p) = cross-entropy to uniform - log(n): same gradient, and 0 when p is uniform
        kl = -logp.mean(dim=-1) - math.log(lg.shape[-1])
        t = targets[:, i]
        pos = (t >= 0) & ~negative
        if pos.any():
            total = total + nn.functional.nll_loss(logp[:n][pos], t[pos])
        if negative.any():
            total = total + negative_weight * kl[:n][negative].mean()
        if mix_partner is not None and mix_weight > 0:
            other = t[mix_partner]
            apart = pos & (other >= 0) & ~negative[mix_partner] & (t != other)
            if apart.any():
                total = total + mix_weight * kl[n:][apart].mean()
    return total


# ---- causal LMs -------------------------------------------------------------------------------------------


def answer_text(output: Any) -> str:
    """The text a causal LM is trained to answer: the string itself, or compact sorted JSON."""
    if isinstance(output, str):
        return output
    return json.dumps(output, ensure_ascii=False, sort_keys=True)


def prompt_text(tokenizer, input_text: str, system: str | None = None) -> str:
    """The chat-template prompt for one input, ending where the assistant's answer starts."""
    messages = ([{"role": "system", "content": system}] if system else []) + [
        {"role": "user", "content": input_text}
    ]
    return tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)


def _end_ids(tokenizer) -> list[int]:
    return [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []


def sft_example(tokenizer, input_text: str, output: Any, max_len: int = 512, system: str | None = None):
    """(input_ids, labels) for one pair: prompt tokens labelled IGNORE, answer tokens + end-of-turn kept."""
    prompt = tokenizer(prompt_text(tokenizer, input_text, system), add_special_tokens=False)["input_ids"]
    answer = tokenizer(answer_text(output), add_special_tokens=False)["input_ids"] + _end_ids(tokenizer)
    prompt = prompt[-max(1, max_len - len(answer)) :]  # keep the answer whole; trim the prompt's start
    ids = (prompt + answer)[:max_len]
    labels = ([IGNORE] * len(prompt) + answer)[:max_len]
    return ids, labels


def pad_batch(seqs: Sequence[Sequence[int]], labels: Sequence[Sequence[int]] | None, pad_id: int):
    """Right-pad to the longest sequence: input_ids, attention_mask, labels (IGNORE on padding)."""
    n = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), n), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), n), dtype=torch.long)
    lab = torch.full((len(seqs), n), IGNORE, dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, : len(s)] = torch.tensor(s)
        mask[i, : len(s)] = 1
        if labels is not None:
            lab[i, : len(s)] = torch.tensor(labels[i])
    return ids, mask, lab


def add_lora(model: nn.Module, r: int = 16, alpha: int = 32, dropout: float = 0.05) -> nn.Module:
    """Wrap a causal LM with LoRA adapters on all linear layers (PEFT)."""
    from peft import LoraConfig, TaskType, get_peft_model

    cfg = LoraConfig(
        task_type=TaskType.CAUSAL_LM, r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules="all-linear"
    )
    return get_peft_model(model, cfg)


def candidate_answers(vocab: dict[str, list[Any]], allowed: dict[str, list[Any]] | None = None) -> list[dict]:
    """Every joint answer over the closed-vocab fields (allowed values only), or [] when there are too many."""
    fields = list(vocab)
    values = [[v for v in vocab[f] if allowed is None or f not in allowed or v in allowed[f]] for f in fields]
    n = 1
    for v in values:
        n *= len(v)
    if n == 0 or n > MAX_CANDIDATES:
        return []
    return [dict(zip(fields, combo, strict=True)) for combo in itertools.product(*values)]


@torch.no_grad()
def score_candidates(
    model: nn.Module, tokenizer, inputs: Sequence[str], candidates: Sequence[str], batch_size: int = 32
) -> torch.Tensor:
    """(len(inputs), len(candidates)) summed log-likelihood of each candidate answer (+ end-of-turn)."""
    device = next(model.parameters()).device
    cand_ids = [tokenizer(c, add_special_tokens=False)["input_ids"] + _end_ids(tokenizer) for c in candidates]
    scores = torch.empty(len(inputs), len(candidates))
    rows = []
    for i, text in enumerate(inputs):
        prompt = tokenizer(prompt_text(tokenizer, text), add_special_tokens=False)["input_ids"]
        for j, c in enumerate(cand_ids):
            rows.append((i, j, prompt + c, [IGNORE] * len(prompt) + c))
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    for start in range(0, len(rows), batch_size):
        chunk = rows[start : start + batch_size]
        ids, mask, lab = pad_batch([r[2] for r in chunk], [r[3] for r in chunk], pad)
        ids, mask, lab = ids.to(device), mask.to(device), lab.to(device)
        logits = model(input_ids=ids, attention_mask=mask).logits[:, :-1].float()
        target = lab[:, 1:]
        logp = torch.log_softmax(logits, dim=-1)
        keep = target != IGNORE
        tok = logp.gather(-1, target.clamp(min=0).unsqueeze(-1)).squeeze(-1) * keep
        for (i, j, _, _), s in zip(chunk, tok.sum(-1).cpu(), strict=True):
            scores[i, j] = s
    return scores


@torch.no_grad()
def generate(
    model: nn.Module, tokenizer, inputs: Sequence[str], max_new_tokens: int = 128
) -> list[tuple[str, float]]:
    """Greedy answers with a confidence: exp(mean log-probability of the generated tokens)."""
    device = next(model.parameters()).device
    out = []
    for text in inputs:
        enc = tokenizer(prompt_text(tokenizer, text), add_special_tokens=False, return_tensors="pt").to(
            device
        )
        gen = model.generate(
            **enc,
            max_new_tokens=max_new_tokens,
            do_sample=False,
            output_scores=True,
            return_dict_in_generate=True,
            pad_token_id=tokenizer.pad_token_id,
            eos_token_id=tokenizer.eos_token_id,
        )
        new = gen.sequences[0, enc["input_ids"].shape[1] :]
        logps = [torch.log_softmax(s[0].float(), -1)[t].item() for s, t in zip(gen.scores, new, strict=False)]
        conf = float(torch.tensor(logps).mean().exp()) if logps else 0.0
        out.append((tokenizer.decode(new, skip_special_tokens=True).strip(), conf))
    return out
