"""Encoder taggers, fitted on pooled vectors of encoded train rows (a seeded sample, pooled_sample): each
head's start, a linear probe before fine-tuning (init_heads), and a router's class Gaussians after it
(fit_gaussians, models.ClassGaussians), which give its "none of these" a distance to calibrate.
"""

from __future__ import annotations

import random
from collections.abc import Sequence

import torch
from torch import nn

from kolm_ray.compile.train.data import collate_tagger
from kolm_ray.models.modeling import ClassGaussians, EncoderTagger


@torch.no_grad()
def pooled_sample(
    model: EncoderTagger, examples: Sequence, pad: int, limit: int, batch_size: int = 64
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Pooled vectors (eval mode) of a seeded sample of at most `limit` encoded tagger rows
    (train.data.encode_tagger_rows), with their targets (rows, fields) and a labelled-row mask."""
    if len(examples) > limit:
        examples = random.Random(0).sample(list(examples), limit)
    was_training = model.training
    model.eval()
    batches = [collate_tagger(examples[i : i + batch_size], pad) for i in range(0, len(examples), batch_size)]
    x = torch.cat([model.pooled(b["input_ids"], b["attention_mask"]) for b in batches]).float()
    model.train(was_training)
    targets = torch.cat([b["targets"] for b in batches])
    return x, targets, ~torch.cat([b["negative"] for b in batches])


def fit_gaussians(model: EncoderTagger, examples: Sequence, pad: int, limit: int = 3000) -> None:
    """Fit and attach ClassGaussians per field from the labelled ones of `limit` sampled encoded rows."""
    x, targets, labelled = pooled_sample(model, examples, pad, limit)
    gaussians = []
    for i, values in enumerate(model.labels.values()):
        keep = labelled & (targets[:, i] >= 0)
        gaussians.append(ClassGaussians.fit(x[keep], targets[keep, i], len(values)))
    model.add_gaussians(gaussians)


def _probe(x: torch.Tensor, y: torch.Tensor, n_out: int, l2: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Multinomial logistic regression (L-BFGS, L2 on the weights): (weight, bias) for an nn.Linear."""
    w = torch.zeros(n_out, x.shape[1], requires_grad=True)
    b = torch.zeros(n_out, requires_grad=True)
    opt = torch.optim.LBFGS([w, b], max_iter=200, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = nn.functional.cross_entropy(x @ w.T + b, y) + l2 * w.pow(2).sum()
        loss.backward()
        return loss

    with torch.enable_grad():
        opt.step(closure)
    return w.detach(), b.detach()


PROBE_ROWS = 2048  # rows the probe is fitted on at most: a head's start needs no more, a forward pass costs


@torch.no_grad()
def init_heads(
    model: nn.Module, examples: list, pad: int, l2: float = 0.1, batch_size: int = 64, limit: int = PROBE_ROWS
) -> None:
    """Fit each head as a logistic regression on the pretrained encoder's pooled vectors of the labelled rows.

    Fine-tuning from a random head first spends its steps, and distorts the pretrained features, undoing
    the head's random start; from a linear probe it starts at the probe's accuracy (LP-FT, Kumar et al.,
    ICLR 2022). The L2 keeps the probe from memorising label noise: at 1e-3 it fit a 10%-noise intent
    recipe's train split exactly and fine-tuning then lost 4 points there. One forward pass over the
    train rows (a seeded sample of `limit` of them, the same on every rank), a fraction of one epoch's cost.
    """
    x, targets, labelled = pooled_sample(model, examples, pad, limit, batch_size)
    for i, head in enumerate(model.heads):
        keep = labelled & (targets[:, i] >= 0)
        if keep.any():
            w, b = _probe(x[keep], targets[keep, i], head.out_features, l2)
            head.weight.copy_(w)
            head.bias.copy_(b)
