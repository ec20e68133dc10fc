"""The served form of closed-vocab scoring: one input at a time on fixed shapes, replayed as a CUDA graph.

models.score_candidates packs every candidate answer behind one read of the prompt; at batch 1 on a GPU
its time is mostly kernel launches (a 36-layer model is a few hundred small kernels per forward, each a
few microseconds of work). StaticScorer builds the same packed row, left-pads it to a fixed length bucket
(32, 64, ... tokens), and on a GPU captures the forward + log-softmax + gather once per bucket as a CUDA
graph (torch.cuda.CUDAGraph), so a query is a copy into static buffers and one graph replay. Padding
columns attend only to themselves and are never read, so the scores are score_candidates' (tests check
it on CPU, where the same static-shape path runs without a graph).

    scorer = StaticScorer(model, tokenizer, ['{"namespace": "billing"}', '{"namespace": "runbooks"}'])
    scorer(["refund my invoice"])  # (1, 2) summed log-likelihoods, as score_candidates
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from kolm_ray.models.modeling import _end_ids, _packed, prompt_text, score_candidates

BUCKETS = (32, 64, 128, 256, 512)  # row lengths with a graph each; longer rows take score_candidates


class StaticScorer:
    """Scores every candidate answer for each input, one input per forward at a fixed length bucket."""

    def __init__(
        self,
        model: nn.Module,
        tokenizer,
        candidates: Sequence[str],
        buckets: Sequence[int] = BUCKETS,
        graphs: bool | None = None,
    ):
        self.model, self.tokenizer, self.candidates = model, tokenizer, list(candidates)
        self.cand_ids = [
            tokenizer(c, add_special_tokens=False)["input_ids"] + _end_ids(tokenizer) for c in candidates
        ]
        if any(not c for c in self.cand_ids):
            raise ValueError("a candidate answer has no tokens")
        p = next(model.parameters())
        self.device, self.dtype = p.device, p.dtype
        self.graphs = (p.device.type == "cuda") if graphs is None else graphs
        self.buckets = sorted(buckets)
        self.pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        self._static: dict[int, dict[str, torch.Tensor]] = {}  # bucket -> input/output buffers
        self._graph: dict[int, torch.cuda.CUDAGraph] = {}

    @torch.no_grad()
    def __call__(self, inputs: Sequence[str]) -> torch.Tensor:
        out = torch.empty(len(inputs), len(self.candidates))
        for i, text in enumerate(inputs):
            prompt = self.tokenizer(prompt_text(self.tokenizer, text), add_special_tokens=False)["input_ids"]
            n = len(prompt) + sum(len(c) for c in self.cand_ids)
            bucket = next((b for b in self.buckets if b >= n), None)
            if bucket is None:  # too long for any graph: the dynamic-shape path
                out[i] = score_candidates(self.model, self.tokenizer, [text], self.candidates)[0]
                continue
            out[i] = self._score(prompt, bucket)
        return out

    def _row(self, prompt: list[int], bucket: int):
        """The packed row left-padded to `bucket` columns (padding sees only itself, position 0)."""
        ids, pos, mask, keep, source, targets, owner = _packed([prompt], self.cand_ids)
        n, off = ids.shape[1], bucket - ids.shape[1]
        full_ids = torch.full((1, bucket), self.pad, dtype=torch.long)
        full_ids[:, off:] = ids
        full_pos = torch.zeros((1, bucket), dtype=torch.long)
        full_pos[:, off:] = pos
        allowed = torch.eye(bucket, dtype=torch.bool)[None]
        allowed[:, off:, off:] = mask
        bias = torch.zeros((1, 1, bucket, bucket), dtype=self.dtype)
        bias.masked_fill_(~allowed[:, None], torch.finfo(self.dtype).min)
        assert n + off == bucket
        return full_ids, full_pos, bias, keep + off, source, targets, owner

    def _forward(self, s: dict[str, torch.Tensor]) -> None:
        logits = self.model(
            input_ids=s["ids"], attention_mask=s["bias"], position_ids=s["pos"], logits_to_keep=s["keep"],
            use_cache=False,
        ).logits  # fmt: skip
        logp = torch.log_softmax(logits.float(), dim=-1)
        s["out"] = logp[0, s["source"], s["targets"]]

    def _score(self, prompt: list[int], bucket: int) -> torch.Tensor:
        ids, pos, bias, keep, source, targets, owner = self._row(prompt, bucket)
        s = self._static.get(bucket)
        if s is None:
            s = {k: v.to(self.device) for k, v in
                 {"ids": ids, "pos": pos, "bias": bias, "keep": keep, "source": source, "targets": targets}.items()}  # fmt: skip
            self._static[bucket] = s
        else:
            for k, v in (("ids", ids), ("pos", pos), ("bias", bias), ("keep", keep)):
                s[k].copy_(v, non_blocking=True)
        if self.graphs:
            graph = self._graph.get(bucket)
            if graph is None:
                graph = self._capture(s)
                self._graph[bucket] = graph
            graph.replay()
        else:
            self._forward(s)
        tok = s["out"].float().cpu()
        return torch.zeros(len(self.candidates)).index_add_(0, owner, tok)

    def _capture(self, s: dict[str, torch.Tensor]) -> torch.cuda.CUDAGraph:
        """Warm up on a side stream (as torch.cuda.graphs requires), then record one forward."""
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(3):
                self._forward(s)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            self._forward(s)
        return graph
