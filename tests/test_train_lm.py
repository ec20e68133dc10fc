"""The causal-LM training step's pieces: packed rows (position ids restart per pair) and the loss over answer
tokens only (chunked through the output head) give what Hugging Face's padded, full-logits loss gives."""

from __future__ import annotations

import random

import pytest
import torch

from kolm_ray.compile.train.data import collate_sft, pack_sft
from kolm_ray.compile.train.lm_loss import output_token_loss
from kolm_ray.models.bases import resolve_base
from kolm_ray.models.modeling import add_lora, sft_example


@pytest.fixture(scope="module")
def lm_and_examples():
    base = resolve_base("tiny-causal-lm")
    tok = base.load_tokenizer()
    torch.manual_seed(0)
    model = add_lora(base.load_model(dtype=torch.float32, attn="sdpa"), r=4, alpha=8, dropout=0.0)
    # LoRA's B starts at zero: give the adapter a value, so a wrong mask or position would show in the loss
    for n, p in model.named_parameters():
        if "lora_B" in n:
            p.data.normal_(0, 0.05)
    rng = random.Random(0)
    words = "restart ingest worker deploy billing invoice refund runbook incident page alert".split()
    examples = [
        sft_example(
            tok, " ".join(rng.choices(words, k=rng.randint(2, 12))), {"namespace": rng.choice(words)}, 64
        )
        for _ in range(9)
    ]
    return model.eval(), examples, tok.pad_token_id


def test_pack_sft_rows_positions_and_counts(lm_and_examples) -> None:
    _, examples, pad = lm_and_examples
    b = pack_sft(examples, pack_len=120, pad_id=pad)
    lengths = sorted(len(e[0]) for e in examples)
    assert int(b["examples"]) == 9 and int(b["tokens"]) == sum(lengths)
    assert b["input_ids"].shape[1] <= 120 and len(b["input_ids"]) < 9
    # every pair appears whole, once, starting at position 0 with its own labels; the rest is padding
    segments = []
    for ids, pos, lab in zip(
        b["input_ids"].tolist(), b["position_ids"].tolist(), b["labels"].tolist(), strict=True
    ):
        for j, p in enumerate(pos):
            if p == 0:
                segments.append(([], []))
            segments[-1][0].append(ids[j])
            segments[-1][1].append(lab[j])
    pairs = [s for s in segments if s in [(e[0], e[1]) for e in examples]]
    assert sorted(map(str, pairs)) == sorted(str((e[0], e[1])) for e in examples)
    for s in segments:
        if s not in pairs:
            assert set(s[0]) == {pad} and set(s[1]) == {-100}


def test_answer_token_loss_equals_hugging_face_padded_loss(lm_and_examples) -> None:
    model, examples, pad = lm_and_examples
    padded = collate_sft(examples, pad)
    assert len(pack_sft(examples, 128, pad)["input_ids"]) < len(examples)  # rows do hold several pairs
    with torch.no_grad():
        want = model(**padded).loss
        ours_padded = output_token_loss(model, padded)
        packed = output_token_loss(model, pack_sft(examples, pack_len=128, pad_id=pad))
        chunked = output_token_loss(model, pack_sft(examples, pack_len=128, pad_id=pad), chunk=7)
    assert torch.allclose(ours_padded, want, atol=1e-5), (ours_padded, want)
    assert torch.allclose(packed, want, atol=1e-4), (packed, want)  # packed rows see only their own pair
    assert torch.allclose(chunked, want, atol=1e-4)


def test_answer_token_loss_gradients_match(lm_and_examples) -> None:
    model, examples, pad = lm_and_examples
    params = [p for p in model.parameters() if p.requires_grad]
    grads = []
    for loss_fn in (lambda: model(**collate_sft(examples, pad)).loss,
                    lambda: output_token_loss(model, pack_sft(examples, 128, pad), chunk=5)):  # fmt: skip
        model.zero_grad()
        loss_fn().backward()
        grads.append(torch.cat([p.grad.flatten() for p in params]))
    model.zero_grad()
    rel = (grads[0] - grads[1]).norm() / grads[0].norm()
    assert rel < 1e-4, rel
