"""The encoder extractor's predictor: text -> the spec's JSON (span fields cut out of the input by character
offsets, class fields from their heads) + a calibrated `confidence`, through the one Predictor.predict path.

    p = open_predictor("order-extractor.kolm")
    p.predict(["URGENT!! status for ORD-52445?"])
    # [{"order_id": "ORD-52445", "priority": "high", "confidence": 0.97}]

confidence: the probability that the whole answer is right. The chosen tags' and classes' probabilities
(per-head temperature scaling) multiply into the answer's model probability; a logistic map fitted on
calibration rows (Platt scaling of its logit) turns that into the chance the answer is exactly right, which is
what the proxy's threshold (`threshold`, chosen on calibration rows too) compares against:
logit(confidence) = a * logit(p_model) + b.

The network runs in the fastest form that holds equal to the eager model (`backend`): ONNX Runtime when it
agrees with torch on probe inputs (same tags and classes, log-probabilities within 1e-3), else torch under inference_mode.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from kolm_ray.inference.base import Predictor
from kolm_ray.models.extract_layout import EXTRACTOR_FILE, classes, span_value, spans

TAGS = "__tags__"  # the tag head's temperature key in calibration.json
BACKEND_ENV = "KOLM_EXTRACTOR_BACKEND"  # "torch" forces the eager model; default: ONNX Runtime when it agrees
PROBES = (
    "URGENT!! status for ORD-52445?",
    "book a table for two at an italian place in Paris tonight",
    "what is the weather tomorrow in new york city",
    "add this song to my workout playlist",
    "rate this book four out of six stars",
    "x",
)
AGREE_TOL = 1e-3  # logits / log-probabilities may differ by this much between forms (summation order)


@dataclass
class Raw:
    """One input's network outputs: its real tokens' offsets and tag log-probs, its class logits."""

    text: str
    offsets: list[tuple[int, int]]
    words: list[int | None]  # the tokenizer's word id per token (decoding snaps spans to whole words)
    tags: torch.Tensor  # (tokens, 1 + 2 * spans) logits
    classes: torch.Tensor  # (sum of class sizes,) logits


class ExtractorPredictor(Predictor):
    """Encoder extractor: tokenizer + EncoderExtractor (tags + classes) + temperatures and Platt scaling."""

    kind = "encoder-extractor"

    def __init__(self, directory: Path, manifest: dict[str, Any], device: str | None = None):
        super().__init__(directory, manifest, device)
        from safetensors.torch import load_file
        from transformers import AutoConfig, AutoModel, AutoTokenizer

        from kolm_ray.models.extractor import EncoderExtractor

        meta = json.loads((self.dir / EXTRACTOR_FILE).read_text())
        self.layout: dict[str, Any] = meta["layout"]
        self.max_len: int = int(meta.get("max_len", 128))
        self.tokenizer = AutoTokenizer.from_pretrained(str(self.dir))
        encoder = AutoModel.from_config(AutoConfig.from_pretrained(str(self.dir)))
        self.model = EncoderExtractor(encoder, self.layout)
        self.model.load_state_dict(load_file(str(self.dir / "model.safetensors")), strict=True)
        self.model.to(self.device).eval()
        cal_path = self.dir / "calibration.json"
        cal = json.loads(cal_path.read_text()) if cal_path.exists() else {}
        self.platt: dict[str, float] | None = cal.get("platt")
        self.threshold: float | None = cal.get("threshold")
        self.backend = "torch"
        self._onnx = None
        if os.environ.get(BACKEND_ENV, "onnx") != "torch" and self.device == "cpu":
            self._try_onnx()

    # -- the network -----------------------------------------------------------------------------------------
    def _torch_run(self, ids: np.ndarray, mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        with torch.inference_mode():
            tags, cls = self.model(
                torch.from_numpy(ids).to(self.device), torch.from_numpy(mask).to(self.device)
            )
        return tags.float().cpu().numpy(), cls.float().cpu().numpy()

    def _run(self, ids: np.ndarray, mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        if self._onnx is not None:
            tags, cls = self._onnx.run(["tags", "classes"], {"input_ids": ids, "attention_mask": mask})
            return tags, cls
        return self._torch_run(ids, mask)

    def _try_onnx(self) -> None:
        """Export to ONNX Runtime and keep it only if it answers the probes as torch does."""
        try:
            from kolm_ray.inference.fastpath import _ort_session, default_threads

            enc = self._encode(list(PROBES))
            with tempfile.TemporaryDirectory(prefix="kolm-extractor-") as tmp:
                path = os.path.join(tmp, "extractor.onnx")
                export_extractor_onnx(self.model, enc["input_ids"], enc["attention_mask"], path)
                session = _ort_session(path, default_threads())  # KOLM_SERVE_THREADS, else 2
            t_tags, t_cls = self._torch_run(enc["input_ids"], enc["attention_mask"])
            o_tags, o_cls = session.run(["tags", "classes"], dict(enc))
            m = enc["attention_mask"].astype(bool)
            lt = torch.log_softmax(torch.from_numpy(t_tags), -1)[torch.from_numpy(m)]
            lo = torch.log_softmax(torch.from_numpy(o_tags), -1)[torch.from_numpy(m)]
            same = bool((lt.argmax(-1) == lo.argmax(-1)).all()) and float((lt - lo).abs().max()) <= AGREE_TOL
            if t_cls.size:
                same = same and bool((t_cls.argmax(-1) == o_cls.argmax(-1)).all())
                same = same and float(np.abs(t_cls - o_cls).max()) <= AGREE_TOL
            if same:
                self._onnx, self.backend = session, "onnx-fp32"
        except Exception:  # no onnxruntime, an export the graph refuses: the eager model answers
            self._onnx, self.backend = None, "torch"

    def _encode(self, texts: list[str]) -> dict[str, np.ndarray]:
        enc = self.tokenizer(
            texts, padding=True, truncation=True, max_length=self.max_len, return_tensors="np"
        )
        return {
            "input_ids": enc["input_ids"].astype(np.int64),
            "attention_mask": enc["attention_mask"].astype(np.int64),
        }

    def raw(self, inputs: Sequence[str], batch_size: int = 64) -> list[Raw]:
        out: list[Raw] = []
        for i in range(0, len(inputs), batch_size):
            texts = list(inputs[i : i + batch_size])
            enc = self.tokenizer(
                texts,
                padding=True,
                truncation=True,
                max_length=self.max_len,
                return_offsets_mapping=True,
                return_tensors="np",
            )
            ids = enc["input_ids"].astype(np.int64)
            mask = enc["attention_mask"].astype(np.int64)
            tags, cls = self._run(ids, mask)
            for r, text in enumerate(texts):
                n = int(mask[r].sum())
                offsets = [(int(a), int(b)) for a, b in enc["offset_mapping"][r][:n]]
                words = list(enc.word_ids(r)[:n])
                tag_logits = torch.from_numpy(np.ascontiguousarray(tags[r, :n]))
                out.append(Raw(text, offsets, words, tag_logits, torch.from_numpy(cls[r])))
        return out

    # -- answers ---------------------------------------------------------------------------------------------
    def answer(self, raw: Raw) -> tuple[dict[str, Any], float]:
        """(the answer's fields in schema order, its log model-probability) under the current temperatures."""
        from kolm_ray.models.extract_layout import build_output
        from kolm_ray.models.extractor import class_answers, decode_spans

        sp, cl = spans(self.layout), classes(self.layout)
        tag_lp = torch.log_softmax(raw.tags.float() / self.temperature.get(TAGS, 1.0), dim=-1)
        texts, logp = decode_spans(raw.text, raw.offsets, tag_lp, len(sp), raw.words)
        parts, start = [], 0
        for f in cl:
            n = len(f["values"]) + int(f["absent"])
            t = self.temperature.get(".".join(f["path"]), 1.0)
            parts.append(torch.log_softmax(raw.classes[start : start + n].float() / t, dim=-1))
            start += n
        values = {}
        if cl:
            chosen, lp = class_answers(torch.cat(parts), self.layout)
            logp += lp
            values.update({tuple(f["path"]): v for f, v in zip(cl, chosen, strict=True)})
        for f, text in zip(sp, texts, strict=True):
            values[tuple(f["path"])] = span_value(f, text)
        return build_output(self.layout, values), logp

    def confidence_of(self, logp: float) -> float:
        if not self.platt:
            return math.exp(logp)
        lp = min(logp, math.log1p(-1e-9))
        z = self.platt["a"] * (lp - math.log(-math.expm1(lp))) + self.platt["b"]  # a * logit(p) + b
        return 1.0 / (1.0 + math.exp(-z)) if z > -700 else 0.0

    def answers(self, raws: Sequence[Raw]) -> list[dict[str, Any]]:
        out = []
        for r in raws:
            fields, logp = self.answer(r)
            out.append(self._finish(fields, self.confidence_of(logp)))
        return out

    def predict(self, inputs, allowed=None):
        inputs = list(inputs)
        if not inputs:
            return []
        return self.answers(self.raw(inputs))

    def calibration(self) -> dict[str, Any]:
        return {"temperature": self.temperature, "platt": self.platt, "threshold": self.threshold}


def export_extractor_onnx(model: torch.nn.Module, ids: np.ndarray, mask: np.ndarray, path: str) -> str:
    """ONNX export with dynamic batch and length (the TorchScript exporter, as fastpath.export_onnx)."""
    import warnings

    dyn = {
        "input_ids": {0: "batch", 1: "seq"},
        "attention_mask": {0: "batch", 1: "seq"},
        "tags": {0: "batch", 1: "seq"},
        "classes": {0: "batch"},
    }
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            model,
            (torch.from_numpy(ids), torch.from_numpy(mask)),
            path,
            dynamo=False,
            input_names=["input_ids", "attention_mask"],
            output_names=["tags", "classes"],
            dynamic_axes=dyn,
            opset_version=17,
        )
    return path
