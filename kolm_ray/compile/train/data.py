"""Training data: split pairs (read by kolm_ray.recipe.pairs) and turn them into batches.

A `negative` row ("none of these", see kolm_ray.recipe.pairs) trains an encoder tagger to spread its confidence
evenly over the values; a causal LM skips it.
"""

from __future__ import annotations

import json
import random
from collections import defaultdict
from collections.abc import Callable, Sequence
from typing import Any

import torch


def stratified_split(
    pairs: Sequence[dict], key: Callable[[dict], Any], eval_frac: float = 0.2, seed: int = 0
) -> tuple[list[dict], list[dict]]:
    """Hold out `eval_frac` of each stratum (at least one from strata with 2+ members) for evaluation."""
    groups: dict[str, list[dict]] = defaultdict(list)
    for p in pairs:
        groups[json.dumps(key(p), sort_keys=True, default=str)].append(p)
    rng = random.Random(seed)
    train, held = [], []
    for name in sorted(groups):
        rows = groups[name][:]
        rng.shuffle(rows)
        k = round(len(rows) * eval_frac) if len(rows) > 1 else 0
        k = max(k, 1) if len(rows) > 1 else k
        held.extend(rows[:k])
        train.extend(rows[k:])
    rng.shuffle(train)
    rng.shuffle(held)
    return train, held


# ---- encoder taggers ----------------------------------------------------------------------------------------


def encode_tagger_rows(
    rows: Sequence[dict], tokenizer, labels: dict[str, list[Any]], max_len: int = 64
) -> list[tuple[list[int], list[int], bool]]:
    """(token ids, per-field value index or -1, is_negative) for every row."""
    enc = tokenizer([r["input"] for r in rows], truncation=True, max_length=max_len)["input_ids"]
    index = {f: {json.dumps(v): i for i, v in enumerate(vals)} for f, vals in labels.items()}
    out = []
    for ids, r in zip(enc, rows, strict=True):
        neg = bool(r.get("negative"))
        output = r.get("output") if isinstance(r.get("output"), dict) else {}
        targets = [-1 if neg or f not in output else index[f].get(json.dumps(output[f]), -1) for f in labels]
        out.append((list(ids), targets, neg))
    return out


def collate_tagger(
    batch: Sequence[tuple[list[int], list[int], bool]], pad_id: int = 0
) -> dict[str, torch.Tensor]:
    """Pad a batch to its longest row (dynamic padding keeps short queries cheap)."""
    n = max(len(b[0]) for b in batch)
    ids = torch.full((len(batch), n), pad_id, dtype=torch.long)
    mask = torch.zeros((len(batch), n), dtype=torch.long)
    for i, (seq, _, _) in enumerate(batch):
        ids[i, : len(seq)] = torch.tensor(seq)
        mask[i, : len(seq)] = 1
    return {
        "input_ids": ids,
        "attention_mask": mask,
        "targets": torch.tensor([b[1] for b in batch], dtype=torch.long),
        "negative": torch.tensor([b[2] for b in batch], dtype=torch.bool),
    }


# ---- encoder extractors -------------------------------------------------------------------------------------


def encode_extractor_rows(
    rows: Sequence[dict], tokenizer, layout: dict[str, Any], max_len: int = 128
) -> list[tuple[list[int], list[int], list[int]]]:
    """(token ids, class value index per class field, BIO tag per token) for every labelled row."""
    from kolm_ray.models.extractor import class_targets, tag_targets

    rows = [r for r in rows if not r.get("negative")]
    texts = [r["input"] for r in rows]
    enc = tokenizer(texts, truncation=True, max_length=max_len, return_offsets_mapping=True)
    out = []
    for k, (ids, offsets, r) in enumerate(zip(enc["input_ids"], enc["offset_mapping"], rows, strict=True)):
        tags = tag_targets(r["input"], offsets, r["output"], layout, enc.word_ids(k))
        out.append((list(ids), class_targets(r["output"], layout), tags))
    return out


def collate_extractor(
    batch: Sequence[tuple[list[int], list[int], list[int]]], pad_id: int = 0
) -> dict[str, torch.Tensor]:
    from kolm_ray.models.extractor import IGNORE

    n = max(len(b[0]) for b in batch)
    ids = torch.full((len(batch), n), pad_id, dtype=torch.long)
    mask = torch.zeros((len(batch), n), dtype=torch.long)
    tags = torch.full((len(batch), n), IGNORE, dtype=torch.long)
    for i, (seq, _, tg) in enumerate(batch):
        ids[i, : len(seq)] = torch.tensor(seq)
        mask[i, : len(seq)] = 1
        tags[i, : len(tg)] = torch.tensor(tg)
    return {
        "input_ids": ids,
        "attention_mask": mask,
        "class_targets": torch.tensor([b[1] for b in batch], dtype=torch.long).reshape(len(batch), -1),
        "tag_targets": tags,
    }


# ---- causal LMs ---------------------------------------------------------------------------------------------


def encode_sft_rows(rows: Sequence[dict], tokenizer, max_len: int = 512) -> list[tuple[list[int], list[int]]]:
    """(input_ids, labels) per row, loss on the answer tokens only; negative rows are skipped."""
    from kolm_ray.models.modeling import sft_example

    return [sft_example(tokenizer, r["input"], r["output"], max_len) for r in rows if not r.get("negative")]


def collate_sft(batch: Sequence[tuple[list[int], list[int]]], pad_id: int = 0) -> dict[str, torch.Tensor]:
    from kolm_ray.models.modeling import pad_batch

    ids, mask, labels = pad_batch([b[0] for b in batch], [b[1] for b in batch], pad_id)
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def pack_sft(
    batch: Sequence[tuple[list[int], list[int]]], pack_len: int, pad_id: int = 0
) -> dict[str, torch.Tensor]:
    """Pack a batch of (input_ids, labels) pairs into as few rows of at most `pack_len` tokens as first-fit
    allows (longest first), position ids restarting at 0 for every pair.

    No attention mask: transformers reads a position id that does not follow its predecessor as the start
    of a new sequence and gives SDPA a block-diagonal causal mask (masking_utils.find_packed_sequence_indices),
    so each pair attends to itself only, as it would alone. Padding at a row's end is one more "sequence"
    (positions from 0, labels IGNORE). A pair's prompt tokens are IGNORE, so no loss is ever taken on a
    prediction across a pair boundary. Also returns "examples" (pairs) and "tokens" (real tokens), counts.
    """
    from kolm_ray.models.modeling import IGNORE

    rows: list[list[int]] = []  # indices into batch
    used: list[int] = []
    for i in sorted(range(len(batch)), key=lambda j: -len(batch[j][0])):
        n = len(batch[i][0])
        slot = next((r for r, u in enumerate(used) if u + n <= pack_len), None)
        if slot is None:
            rows.append([i])
            used.append(n)
        else:
            rows[slot].append(i)
            used[slot] += n
    width = max(used)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    labels = torch.full((len(rows), width), IGNORE, dtype=torch.long)
    pos = torch.zeros((len(rows), width), dtype=torch.long)
    for r, members in enumerate(rows):
        col = 0
        for i in members:
            seq, lab = batch[i]
            ids[r, col : col + len(seq)] = torch.tensor(seq)
            labels[r, col : col + len(seq)] = torch.tensor(lab)
            pos[r, col : col + len(seq)] = torch.arange(len(seq))
            col += len(seq)
        pos[r, col:] = torch.arange(width - col)
    return {
        "input_ids": ids,
        "position_ids": pos,
        "labels": labels,
        "examples": torch.tensor(len(batch)),
        "tokens": torch.tensor(sum(used)),
    }
