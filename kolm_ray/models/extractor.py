"""The encoder extractor: one encoder, a BIO tag head over its tokens for the span fields, and one class
head per categorical field on the mean-pooled vector (the JointBERT shape: intent + slots from one pass).

    model = EncoderExtractor(encoder, layout)          # layout: models.extract_layout.extraction_layout
    tags, classes = model(input_ids, attention_mask)   # (batch, tokens, 1 + 2 * spans), (batch, sum of classes)

Tags: 0 = outside, 1 + 2j = begins span field j, 2 + 2j = inside it. BIO rather than start/end pointers:
one softmax per token covers every field at once (39 SNIPS slot types are one 79-way head, not 78 pointer
heads), "this field is absent" needs no extra head (no B tag for it), and a token's tag distribution gives
the answer's probability directly (the product of the chosen tags' probabilities), which is what the
calibrated confidence starts from. Spans are cut from the input by the tokenizer's character offsets, so a
grounded value is always an exact substring of the input.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from kolm_ray.models.extract_layout import ABSENT, class_index, classes, span_text, spans

IGNORE = -100
_WORD = re.compile(r"\w")


class EncoderExtractor(nn.Module):
    """Encoder + token tag head (span fields) + pooled class heads (categorical fields)."""

    def __init__(self, encoder: nn.Module, layout: dict[str, Any], dropout: float = 0.1):
        super().__init__()
        if getattr(encoder, "pooler", None) is not None:
            encoder.pooler = None  # unused, and an unused parameter stalls DDP
        self.encoder = encoder
        self.layout = layout
        hidden = encoder.config.hidden_size
        self.dropout = nn.Dropout(dropout)
        self.sizes = [len(f["values"]) + int(f["absent"]) for f in classes(layout)]
        self.heads = nn.ModuleList([nn.Linear(hidden, n) for n in self.sizes])
        self.span_head = nn.Linear(hidden, 1 + 2 * len(spans(layout)))

    def freeze(self, embeddings: bool = True, layers: int = 0) -> None:
        emb = getattr(self.encoder, "embeddings", None)
        if embeddings and emb is not None:
            emb.requires_grad_(False)
        blocks = getattr(getattr(self.encoder, "encoder", None), "layer", None)
        if blocks is not None:
            for block in list(blocks)[:layers]:
                block.requires_grad_(False)

    def forward(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        hidden = self.encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        m = attention_mask.unsqueeze(-1).to(hidden.dtype)
        pooled = (hidden * m).sum(1) / m.sum(1).clamp(min=1.0)
        tags = self.span_head(self.dropout(hidden))
        pooled = self.dropout(pooled)
        if self.heads:
            cls = torch.cat([h(pooled) for h in self.heads], dim=-1)
        else:
            cls = pooled.new_zeros(pooled.shape[0], 0)
        return tags, cls


def extractor_loss(
    tags: torch.Tensor,
    cls: torch.Tensor,
    tag_targets: torch.Tensor,
    class_targets: torch.Tensor,
    sizes: Sequence[int],
) -> torch.Tensor:
    """Token cross-entropy (IGNORE on padding and special tokens) + one cross-entropy per class head (-1:
    unknown value)."""
    loss = nn.functional.cross_entropy(
        tags.float().reshape(-1, tags.shape[-1]), tag_targets.reshape(-1), ignore_index=IGNORE
    )
    start = 0
    for i, n in enumerate(sizes):
        t = class_targets[:, i]
        if (t >= 0).any():
            loss = loss + nn.functional.cross_entropy(cls[:, start : start + n].float(), t, ignore_index=-1)
        start += n
    return loss + 0.0 * cls.sum()  # every head in the graph, labelled or not (DDP waits for each gradient)


def find_span(text: str, value: str) -> tuple[int, int] | None:
    """Character span of `value` in `text`: the first occurrence on word boundaries, else the first at all."""
    first, pos = None, text.find(value)
    while pos >= 0:
        end = pos + len(value)
        if first is None:
            first = (pos, end)
        before = pos == 0 or not _WORD.match(text[pos - 1]) or not _WORD.match(value[0])
        after = end == len(text) or not _WORD.match(text[end]) or not _WORD.match(value[-1])
        if before and after:
            return pos, end
        pos = text.find(value, pos + 1)
    return first


def continuation(words: Sequence[int | None] | None, i: int) -> bool:
    """True for a word's second and later word pieces: they take their word's first piece's tag."""
    return words is not None and i > 0 and words[i] is not None and words[i] == words[i - 1]


def tag_targets(
    text: str,
    offsets: Sequence[tuple[int, int]],
    output: Any,
    layout: dict[str, Any],
    words: Sequence[int | None] | None = None,
) -> list[int]:
    """Gold BIO tag per token: IGNORE for special tokens (empty offsets) and, given the tokenizer's word ids,
    for every word piece after a word's first (JointBERT labels first pieces; decoding snaps to whole words)."""
    from kolm_ray.models.extract_layout import _get

    tags = [IGNORE if e <= s or continuation(words, i) else 0 for i, (s, e) in enumerate(offsets)]
    for j, f in enumerate(spans(layout)):
        value = span_text(_get(output, f["path"]))
        if value is None:
            continue
        where = find_span(text, value)
        if where is None:
            continue
        a, b = where
        inside = [i for i, (s, e) in enumerate(offsets) if e > s and s < b and e > a and tags[i] != IGNORE]
        for k, i in enumerate(inside):
            if tags[i] == 0:
                tags[i] = 1 + 2 * j + (1 if k else 0)
    return tags


def class_targets(output: Any, layout: dict[str, Any]) -> list[int]:
    from kolm_ray.models.extract_layout import _get

    return [class_index(f, _get(output, f["path"])) for f in classes(layout)]


def decode_spans(
    text: str,
    offsets: Sequence[tuple[int, int]],
    logprobs: torch.Tensor,
    n_spans: int,
    words: Sequence[int | None] | None = None,
) -> tuple[list[str | None], float]:
    """Best tag per word (its first piece's) -> one text per span field (the most probable of its runs, cut
    from the input by character offsets, to the end of its last word), and the log-probability of the chosen
    tag sequence. logprobs: (tokens, 1 + 2 * n_spans) for this row's real tokens (offsets)."""
    best = logprobs.max(dim=-1)
    tags = best.indices.tolist()
    top = best.values.tolist()
    heads = [i for i, (s, e) in enumerate(offsets) if e > s and not continuation(words, i)]
    last = {}  # a word's first piece -> its last piece
    for i in heads:
        j = i
        while j + 1 < len(offsets) and continuation(words, j + 1):
            j += 1
        last[i] = j
    runs: dict[int, list[tuple[float, int, int]]] = {}
    total = sum(top[i] for i in heads)
    k = 0
    while k < len(heads):
        t = tags[heads[k]]
        if t == 0:
            k += 1
            continue
        j = (t - 1) // 2
        a, score = k, top[heads[k]]
        k += 1
        while k < len(heads) and tags[heads[k]] == 2 + 2 * j:
            score += top[heads[k]]
            k += 1
        runs.setdefault(j, []).append((score / (k - a), heads[a], last[heads[k - 1]]))
    out: list[str | None] = [None] * n_spans
    for j, rs in runs.items():
        if j < n_spans:
            _, a, b = max(rs)
            out[j] = text[offsets[a][0] : offsets[b][1]]
    return out, total


def class_answers(cls_logprobs: torch.Tensor, layout: dict[str, Any]) -> tuple[list[Any], float]:
    """Per class field its value (ABSENT for the absent class) and the summed log-probability of the choices."""
    values, total, start = [], 0.0, 0
    for f in classes(layout):
        n = len(f["values"]) + int(f["absent"])
        lp = cls_logprobs[start : start + n]
        k = int(lp.argmax())
        total += float(lp[k])
        values.append(ABSENT if k == len(f["values"]) else f["values"][k])
        start += n
    return values, total
