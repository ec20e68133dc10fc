"""The two model families a base turns into.

EncoderTagger (encoder bases such as minilm-l6): the encoder, mean pooling over real tokens, and one
linear head per closed-vocab field. forward() returns {field: logits}; a boolean mask of allowed values
per field is applied to the logits before any softmax, so a masked value can never be the answer.

Routers trained with "none of these" inputs also carry, per field, the class means and a shared precision
of the L2-normalised pooled vectors (ClassGaussians): the Mahalanobis distance to the nearest allowed class
says how far an input is from everything the tagger was trained on, which the softmax alone cannot
(Podolskiy et al., AAAI 2021, measured it on CLINC150's out-of-scope queries). Calibration turns it into a
"none of these" logit beside the classes (evaluate.fit_outlier_calibration).

Causal LMs (qwen2.5-coder-*, local causal directories): LoRA (PEFT) supervised fine-tuning on the chat
template with the loss on the answer tokens only. At inference a closed-vocab answer is chosen by
scoring every allowed completion's log-likelihood (packed behind one read of the prompt,
score_candidates), so the answer is always in the vocabulary and the softmax over those log-likelihoods
is its confidence; other outputs are generated greedily.
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


class ClassGaussians(nn.Module):
    """One field's class means and shared precision over L2-normalised pooled vectors.

    forward(pooled) -> (batch, n_classes) squared Mahalanobis distance to each class mean, divided by
    `scale` (the median distance of the training rows to their own class), so 1.0 is a typical in-scope input.
    """

    def __init__(self, n_classes: int, hidden: int):
        super().__init__()
        self.register_buffer("means", torch.zeros(n_classes, hidden))
        self.register_buffer("precision", torch.eye(hidden))
        self.register_buffer("scale", torch.ones(()))

    def forward(self, pooled: torch.Tensor) -> torch.Tensor:
        x = nn.functional.normalize(pooled.float(), dim=-1)
        xp = x @ self.precision
        mp = self.means @ self.precision
        d = (xp * x).sum(-1, keepdim=True) - 2 * xp @ self.means.T + (mp * self.means).sum(-1)
        return d.clamp(min=0) / self.scale

    @classmethod
    def fit(cls, pooled: torch.Tensor, targets: torch.Tensor, n_classes: int) -> ClassGaussians:
        """Means per class and a shrunk shared covariance from (rows, hidden) vectors and their class ids.

        Shrinkage toward a scaled identity with weight hidden / (hidden + rows): a covariance of 384
        dimensions from a few hundred rows is singular without it, and almost untouched from 15,000.
        """
        x = nn.functional.normalize(pooled.double(), dim=-1)
        hidden = x.shape[1]
        g = cls(n_classes, hidden)
        means = torch.zeros(n_classes, hidden, dtype=torch.float64)
        for k in range(n_classes):
            if (targets == k).any():
                means[k] = x[targets == k].mean(0)
        resid = x - means[targets]
        cov = resid.T @ resid / max(len(x), 1)
        alpha = hidden / (hidden + len(x))
        cov = (1 - alpha) * cov + alpha * cov.trace() / hidden * torch.eye(hidden, dtype=torch.float64)
        g.means.copy_(means.float())
        g.precision.copy_(torch.linalg.inv(cov).float())
        own = g(pooled.float()).gather(1, targets[:, None]).squeeze(1) if len(x) else torch.ones(1)
        g.scale.copy_(own.median().clamp(min=1e-6))
        return g


class EncoderTagger(nn.Module):
    """Encoder + mean pooling + one linear head per closed-vocab field (+ optional ClassGaussians per field)."""

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
        self.gaussians: nn.ModuleList | None = None  # per field, by position; set by compile for routers

    def add_gaussians(self, gaussians: Sequence[ClassGaussians] | None = None) -> None:
        """Attach one ClassGaussians per field (fresh ones, to load a saved state dict into, when None)."""
        hidden = self.encoder.config.hidden_size
        self.gaussians = nn.ModuleList(
            gaussians or [ClassGaussians(len(v), hidden) for v in self.labels.values()]
        )

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

    def scores(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        masks: dict[str, torch.Tensor] | None = None,
    ) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        """Inference: per-field logits and, with gaussians, per-field class distances (masked values +inf)."""
        pooled = self.pooled(input_ids, attention_mask)
        logits, dists = {}, {}
        for i, (field, head) in enumerate(zip(self.fields, self.heads, strict=True)):
            lg = head(pooled)
            d = self.gaussians[i](pooled) if self.gaussians is not None else None
            if masks is not None and field in masks:
                allowed = masks[field].to(lg.device)
                lg = lg.masked_fill(~allowed, float("-inf"))
                d = d.masked_fill(~allowed, float("inf")) if d is not None else None
            logits[field] = lg
            if d is not None:
                dists[field] = d
        return logits, dists


def outlier_probs(
    logits: torch.Tensor, temperature: float, distance: torch.Tensor | None = None, outlier=None
) -> torch.Tensor:
    """Calibrated probabilities over the field's values (batch, n_values).

    With `distance` (batch, n_values; +inf where masked) and outlier {"weight": b, "offset": c}: a "none of
    these" logit b * (nearest allowed distance - c) joins the softmax and is then dropped, so the values'
    probabilities sum to less than 1 far from every class. The answer (argmax) is unchanged.
    """
    z = logits.to(torch.promote_types(logits.dtype, torch.float32)) / temperature  # float64 stays (fitting)
    if distance is None or not outlier or not outlier.get("weight"):
        return torch.softmax(z, dim=-1)
    nearest = distance.to(z.dtype).amin(dim=-1)
    none = outlier["weight"] * (nearest - outlier["offset"])
    none = torch.where(torch.isfinite(nearest), none, torch.full_like(none, float("-inf")))
    return torch.softmax(torch.cat([z, none[:, None]], dim=-1), dim=-1)[:, :-1]


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


# Candidate tokens (x inputs) per forward pass: bounds the kept [tokens x vocabulary] logits.
MAX_SCORED_TOKENS = 256


@torch.no_grad()
def score_candidates(
    model: nn.Module,
    tokenizer,
    inputs: Sequence[str],
    candidates: Sequence[str],
    max_tokens: int = MAX_SCORED_TOKENS,
) -> torch.Tensor:
    """(len(inputs), len(candidates)) summed log-likelihood of each candidate answer (+ end-of-turn).

    Each input's prompt is read once, with every candidate packed behind it in the same row: a 4D attention
    mask lets each candidate token see the prompt and its own earlier tokens only, and its position ids
    continue from the prompt's end, so every candidate is scored on exactly the context it would have alone.
    Prompts are left-padded to a common end, so the candidates sit at the same columns in every row of a
    batch and logits are computed only there (`logits_to_keep`), never [tokens x vocabulary] for the whole
    sequence. A pass holds at most `max_tokens` candidate tokens summed over its rows (several inputs per
    pass when the candidates are short; the candidates split over passes when they are many).
    """
    device = next(model.parameters()).device
    dtype = next(model.parameters()).dtype
    cand_ids = [tokenizer(c, add_special_tokens=False)["input_ids"] + _end_ids(tokenizer) for c in candidates]
    if any(not c for c in cand_ids):
        raise ValueError("a candidate answer has no tokens")
    chunks, chunk, used = [], [], 0
    for j, c in enumerate(cand_ids):
        if chunk and used + len(c) > max_tokens:
            chunks.append(chunk)
            chunk, used = [], 0
        chunk.append(j)
        used += len(c)
    chunks.append(chunk)
    prompts = [tokenizer(prompt_text(tokenizer, t), add_special_tokens=False)["input_ids"] for t in inputs]
    scores = torch.empty(len(inputs), len(candidates))
    for chunk in chunks:
        cands = [cand_ids[j] for j in chunk]
        rows = max(1, max_tokens // sum(len(c) for c in cands))
        for start in range(0, len(prompts), rows):
            ids, pos, mask, keep, source, targets, owner = _packed(prompts[start : start + rows], cands)
            bias = torch.zeros(mask.shape, dtype=dtype).masked_fill_(~mask, torch.finfo(dtype).min)
            logits = model(
                input_ids=ids.to(device),
                attention_mask=bias[:, None].to(device),
                position_ids=pos.to(device),
                logits_to_keep=keep.to(device),
            ).logits
            logp = torch.log_softmax(logits.float(), dim=-1)  # [rows, kept, vocabulary]
            tok = logp[:, source.to(device), targets.to(device)].cpu()  # [rows, candidate tokens]
            sums = torch.zeros(len(ids), len(cands)).index_add_(1, owner, tok)
            scores[start : start + len(ids), chunk] = sums
    return scores


def _packed(prompts: list[list[int]], cands: list[list[int]]):
    """Rows of [left padding, prompt, candidate 1, candidate 2, ...] with every prompt ending at column P.

    Returns input ids and position ids [rows, L], the attend-mask [rows, L, L], the columns whose logits are
    needed (the prompt's last one, read once, then each candidate's inner columns), and per candidate token
    (the same for every row): which of those kept columns predicts it, the token, and its candidate.
    """
    width = max(len(p) for p in prompts)
    keep, source, targets, owner, spans = [width - 1], [], [], [], []
    col = width
    for k, c in enumerate(cands):
        spans.append((col, col + len(c)))
        # The token at column t is predicted at t - 1: a first token by the prompt's last column.
        source += [0] + list(range(len(keep), len(keep) + len(c) - 1))
        keep += list(range(col, col + len(c) - 1))
        targets += c
        owner += [k] * len(c)
        col += len(c)
    n = col
    ids = torch.zeros(len(prompts), n, dtype=torch.long)
    pos = torch.zeros(len(prompts), n, dtype=torch.long)
    mask = torch.zeros(len(prompts), n, n, dtype=torch.bool)
    flat = torch.tensor([t for c in cands for t in c], dtype=torch.long)
    for r, prompt in enumerate(prompts):
        p, off = len(prompt), width - len(prompt)
        ids[r, off:width] = torch.tensor(prompt, dtype=torch.long)
        ids[r, width:] = flat
        pos[r, off:width] = torch.arange(p)
        m = mask[r]
        m[range(off), range(off)] = True  # padding sees only itself (never a row with nothing to attend to)
        m[off:width, off:width] = torch.ones(p, p, dtype=torch.bool).tril()  # the prompt: causal
        m[width:, off:width] = True  # every candidate token sees the whole prompt ...
        for a, b in spans:  # ... and its own candidate's earlier tokens
            m[a:b, a:b] = torch.ones(b - a, b - a, dtype=torch.bool).tril()
            pos[r, a:b] = torch.arange(p, p + b - a)
    as_long = lambda v: torch.tensor(v, dtype=torch.long)  # noqa: E731
    return ids, pos, mask, as_long(keep), as_long(source), as_long(targets), as_long(owner)


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
