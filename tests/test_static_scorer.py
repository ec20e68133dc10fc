"""StaticScorer (the served closed-vocab scorer: fixed length buckets, a CUDA graph per bucket on a GPU) gives
score_candidates' scores. On CPU the same static-shape path runs without the graph."""

from __future__ import annotations

import pytest
import torch

from kolm_ray.inference.static_scorer import StaticScorer
from kolm_ray.models.bases import resolve_base
from kolm_ray.models.modeling import answer_text, score_candidates


@pytest.fixture(scope="module")
def lm():
    from transformers import AutoModelForCausalLM

    base = resolve_base("tiny-causal-lm")
    return AutoModelForCausalLM.from_pretrained(
        base.source, attn_implementation="sdpa"
    ).eval(), base.load_tokenizer()


def test_static_scorer_equals_score_candidates_over_buckets(lm) -> None:
    model, tok = lm
    cands = [answer_text({"namespace": n}) for n in ("billing", "runbooks", "a-much-longer-namespace-name")]
    inputs = ["restart", "refund my invoice please, it was charged twice on my card and the page is down",
              "how do i deploy the ingest worker"]  # fmt: skip
    want = score_candidates(model, tok, inputs, cands)
    scorer = StaticScorer(model, tok, cands, buckets=(48, 64, 96, 128))
    got = scorer(inputs)
    assert torch.allclose(got, want, atol=1e-4), (got - want).abs().max()
    assert len(scorer._static) >= 2  # the inputs landed in different buckets, each with its own buffers
    again = scorer(list(reversed(inputs)))  # buffers reused across calls and lengths: no stale columns
    assert torch.allclose(again, want.flip(0), atol=1e-4)


def test_rows_longer_than_every_bucket_take_the_dynamic_path(lm) -> None:
    model, tok = lm
    cands = [answer_text({"namespace": n}) for n in ("billing", "runbooks")]
    inputs = ["restart the ingest worker now"]
    scorer = StaticScorer(model, tok, cands, buckets=(8,))
    assert torch.allclose(scorer(inputs), score_candidates(model, tok, inputs, cands), atol=1e-5)
    assert not scorer._static
