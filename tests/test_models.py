"""EncoderTagger (heads, masks, the "none of these" loss) and the causal-LM pieces (SFT labels, candidate
scoring, LoRA), on tiny config-built models."""

from __future__ import annotations

import torch

from kolm_ray.models.bases import resolve_base
from kolm_ray.models.modeling import (
    IGNORE,
    ClassGaussians,
    EncoderTagger,
    add_lora,
    answer_text,
    candidate_answers,
    encoder_loss,
    outlier_probs,
    score_candidates,
    sft_example,
)

LABELS = {"namespace": ["billing", "runbooks", "incidents"], "urgent": [True, False]}


def _tagger() -> tuple[EncoderTagger, object]:
    base = resolve_base("tiny-encoder")
    torch.manual_seed(0)
    return EncoderTagger(base.load_model(), LABELS), base.load_tokenizer()


def test_tagger_forward_shapes_and_mask() -> None:
    model, tok = _tagger()
    model.eval()
    enc = tok(["restart the worker", "refund"], padding=True, return_tensors="pt")
    out = model(enc["input_ids"], enc["attention_mask"])
    assert out["namespace"].shape == (2, 3) and out["urgent"].shape == (2, 2)
    mask = {"namespace": torch.tensor([False, True, True])}
    probs = torch.softmax(model(enc["input_ids"], enc["attention_mask"], masks=mask)["namespace"], -1)
    assert torch.all(probs[:, 0] == 0) and torch.allclose(probs.sum(-1), torch.ones(2))


def test_padding_does_not_change_pooled_output() -> None:
    model, tok = _tagger()
    model.eval()
    one = tok(["restart"], return_tensors="pt")
    two = tok(["restart", "restart the ingest worker please now"], padding=True, return_tensors="pt")
    a = model.pooled(one["input_ids"], one["attention_mask"])[0]
    b = model.pooled(two["input_ids"], two["attention_mask"])[0]
    assert torch.allclose(a, b, atol=1e-5)


def test_negative_rows_push_toward_uniform() -> None:
    logits = {"namespace": torch.tensor([[5.0, 0.0, 0.0]], requires_grad=True)}
    loss = encoder_loss(logits, torch.tensor([[-1]]), torch.tensor([True]))
    loss.backward()
    g = logits["namespace"].grad[0]
    assert g[0] > 0 and g[1] < 0 and g[2] < 0  # descent lowers the dominant logit, raises the others
    uniform = {"namespace": torch.zeros(1, 3)}
    assert encoder_loss(uniform, torch.tensor([[-1]]), torch.tensor([True])) < loss


def test_sft_labels_cover_answer_only() -> None:
    tok = resolve_base("tiny-causal-lm").load_tokenizer()
    ids, labels = sft_example(tok, "restart the worker", {"namespace": "runbooks"})
    answer = [t for t in labels if t != IGNORE]
    assert tok.decode(answer) == '{"namespace": "runbooks"}<|im_end|>'
    assert labels[: len(ids) - len(answer)] == [IGNORE] * (len(ids) - len(answer))
    assert answer_text("plain") == "plain"


def test_candidate_answers_respect_allowed() -> None:
    c = candidate_answers({"namespace": ["a", "b", "c"]}, {"namespace": ["b", "c", "zzz"]})
    assert c == [{"namespace": "b"}, {"namespace": "c"}]
    assert candidate_answers({"x": list(range(30)), "y": list(range(30))}) == []  # too many to score


def test_lora_sft_loss_falls_and_scoring_prefers_trained_answer() -> None:
    from kolm_ray.models.modeling import pad_batch

    base = resolve_base("tiny-causal-lm")
    tok = base.load_tokenizer()
    torch.manual_seed(0)
    model = add_lora(base.load_model(), r=8, alpha=16)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert 0 < trainable < sum(p.numel() for p in model.parameters()) / 2
    rows = [
        ("restart the ingest worker", {"namespace": "runbooks"}),
        ("refund my invoice", {"namespace": "billing"}),
    ]
    ex = [sft_example(tok, i, o) for i, o in rows]
    ids, mask, labels = pad_batch([e[0] for e in ex], [e[1] for e in ex], tok.pad_token_id)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    losses = []
    for _ in range(30):
        loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0] * 0.5
    model.eval()
    cands = [answer_text({"namespace": n}) for n in ("billing", "runbooks", "incidents")]
    scores = score_candidates(model, tok, ["restart the ingest worker", "refund my invoice"], cands)
    assert scores.shape == (2, 3) and torch.all(scores <= 0)
    assert scores[0].argmax() == 1 and scores[1].argmax() == 0


def test_generate_returns_text_and_confidence() -> None:
    from kolm_ray.models.modeling import generate

    base = resolve_base("tiny-causal-lm")
    tok = base.load_tokenizer()
    out = generate(base.load_model().eval(), tok, ["restart the worker"], max_new_tokens=5)
    assert len(out) == 1 and isinstance(out[0][0], str) and 0 < out[0][1] <= 1


def test_mixed_rows_count_only_between_different_labels() -> None:
    model, tok = _tagger()
    model.eval()
    enc = tok(["refund", "restart the worker", "page on-call"], padding=True, return_tensors="pt")
    partner, lam = torch.tensor([1, 0, 2]), torch.tensor([0.5, 0.5, 0.5])
    out = model(enc["input_ids"], enc["attention_mask"], mix_partner=partner, mix_lambda=lam)
    assert out["namespace"].shape == (6, 3)  # the real rows, then one mixed row per real row
    pooled = model.pooled(enc["input_ids"], enc["attention_mask"])
    mixed = model.heads[0](0.5 * pooled[0] + 0.5 * pooled[1])
    assert torch.allclose(out["namespace"][3], mixed, atol=1e-5)

    targets, negative = torch.tensor([[0, 0], [1, 0], [2, 1]]), torch.zeros(3, dtype=torch.bool)
    plain = encoder_loss({k: v[:3] for k, v in out.items()}, targets, negative)
    with_mix = encoder_loss(out, targets, negative, mix_partner=partner, mix_weight=1.0)
    # namespace: rows 0 and 1 mix different labels (counted), row 2 mixes with itself (not counted);
    # urgent: rows 0 and 1 share False, so no mixed row counts for that field
    kl = -torch.log_softmax(out["namespace"][3:5], -1).mean(-1) - torch.log(torch.tensor(3.0))
    assert torch.allclose(with_mix - plain, kl.mean(), atol=1e-5)


def test_class_gaussians_measure_distance_from_the_classes() -> None:
    g = torch.Generator().manual_seed(0)
    centers = torch.nn.functional.normalize(torch.randn(3, 16, generator=g), dim=-1) * 4
    targets = torch.arange(300) % 3
    x = centers[targets] + 0.3 * torch.randn(300, 16, generator=g)
    gauss = ClassGaussians.fit(x, targets, 3)
    own = gauss(x).gather(1, targets[:, None]).squeeze(1)
    assert abs(float(own.median()) - 1.0) < 1e-4  # scaled: a typical in-scope row sits at 1
    assert (gauss(x).argmin(1) == targets).float().mean() > 0.95
    far = torch.randn(50, 16, generator=g)  # directions no class points to
    assert float(gauss(far).amin(1).median()) > 5 * float(own.median())


def test_outlier_probs_lower_confidence_far_from_the_allowed_classes_only() -> None:
    logits = torch.tensor([[4.0, 0.0, 0.0], [4.0, 0.0, 0.0]])
    dist = torch.tensor([[1.0, 9.0, 9.0], [20.0, 20.0, 20.0]])  # row 0 near class 0, row 1 near none
    outlier = {"weight": 1.0, "offset": 2.0}
    plain = outlier_probs(logits, 1.0)
    assert torch.allclose(plain, torch.softmax(logits, -1))
    assert torch.allclose(outlier_probs(logits, 1.0, dist, {"weight": 0.0, "offset": 2.0}), plain)
    p = outlier_probs(logits, 1.0, dist, outlier)
    assert (p.argmax(-1) == plain.argmax(-1)).all()  # the answer never changes, only its confidence
    assert torch.allclose(p[0], plain[0], atol=0.01)  # near its class: about the softmax
    assert p[1].sum() < 0.01  # far from every class
    # a caller who may not see class 0: row 0's nearest ALLOWED class is far, so its confidence drops
    hidden = torch.tensor([True, False, False])
    p0 = outlier_probs(
        logits[:1].masked_fill(hidden, float("-inf")),
        1.0,
        dist[:1].masked_fill(hidden, float("inf")),
        outlier,
    )
    assert p0[0, 0] == 0 and float(p0.sum()) < 0.01


def _one_row_per_candidate(model, tok, inputs, cands) -> torch.Tensor:
    """Reference: each prompt + candidate run alone, log-likelihood of the candidate's tokens."""
    from kolm_ray.models.modeling import _end_ids, prompt_text

    out = torch.empty(len(inputs), len(cands))
    with torch.no_grad():
        for i, text in enumerate(inputs):
            prompt = tok(prompt_text(tok, text), add_special_tokens=False)["input_ids"]
            for j, c in enumerate(cands):
                ids = prompt + tok(c, add_special_tokens=False)["input_ids"] + _end_ids(tok)
                logp = torch.log_softmax(model(input_ids=torch.tensor([ids])).logits[0, :-1].float(), -1)
                out[i, j] = sum(logp[t - 1, ids[t]] for t in range(len(prompt), len(ids)))
    return out


def test_packed_scoring_equals_scoring_each_candidate_alone() -> None:
    base = resolve_base("tiny-causal-lm")
    tok = base.load_tokenizer()
    torch.manual_seed(0)
    inputs = ["restart the ingest worker", "refund my invoice please, it was charged twice"]
    cands = [answer_text({"namespace": n}) for n in ("billing", "runbooks", "a-much-longer-namespace-name")]
    from transformers import AutoModelForCausalLM

    for attn in (
        "sdpa",
        "eager",
    ):  # the 4D mask is additive: both attention implementations read it the same way
        model = AutoModelForCausalLM.from_pretrained(base.source, attn_implementation=attn).eval()
        want = _one_row_per_candidate(model, tok, inputs, cands)
        assert torch.allclose(score_candidates(model, tok, inputs, cands), want, atol=1e-4)
        # one input per pass, and candidates split over several passes (the cap on kept logits): same scores
        for cap in (30, 4):
            assert torch.allclose(
                score_candidates(model, tok, inputs, cands, max_tokens=cap), want, atol=1e-4
            )
