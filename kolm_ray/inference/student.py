"""The static-embedding student in front of an encoder router: how the cascade answers from it.

A query's answer costs a MiniLM forward (~9 ms of CPU) in the teacher; the student answers from a table of
token vectors (model2vec: the mean of the query's token vectors) through one ReLU layer (~0.2-0.4 ms in all,
numpy). The cascade answers from the student when its calibrated confidence is at or above `threshold` and
escalates the rest to the teacher; tenant masking applies to both (a masked namespace gets -inf before
either softmax). How compile fits it: kolm_ray/compile/student_fit.py.

Files, under student/ in the artifact (safetensors and JSON only): model2vec's model.safetensors (the
trained table), tokenizer.json, config.json and modules.json; head.safetensors (hidden.weight,
hidden.bias, weight, bias); student.json (field, labels, temperature, threshold, dims, hidden).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

STUDENT_DIR = "student"
HEAD_FILE = "head.safetensors"
META_FILE = "student.json"


class Student:
    """Static token vectors (their mean, model2vec's encode) -> an optional ReLU layer -> logits for one field,
    with its own temperature and threshold."""

    def __init__(
        self,
        static,
        weight: np.ndarray,
        bias: np.ndarray,
        field: str,
        labels: list[Any],
        temperature: float = 1.0,
        threshold: float = 1.0,
        hidden: tuple[np.ndarray, np.ndarray] | None = None,
    ):
        self.static = static  # model2vec.StaticModel
        self.weight = np.ascontiguousarray(weight, dtype=np.float32)  # (n_labels, width)
        self.bias = np.ascontiguousarray(bias, dtype=np.float32)  # (n_labels,)
        # (width, dims) and (width,): the hidden layer, or None for softmax regression on the vectors
        self.hidden = (
            None if hidden is None else tuple(np.ascontiguousarray(a, dtype=np.float32) for a in hidden)
        )
        self.field = field
        self.labels = list(labels)
        self.temperature = float(temperature)
        self.threshold = float(threshold)

    @classmethod
    def load(cls, directory: str | Path) -> Student:
        from model2vec import StaticModel
        from safetensors.numpy import load_file

        directory = Path(directory)
        meta = json.loads((directory / META_FILE).read_text())
        head = load_file(str(directory / HEAD_FILE))
        hidden = (head["hidden.weight"], head["hidden.bias"]) if "hidden.weight" in head else None
        return cls(
            StaticModel.from_pretrained(str(directory)),
            head["weight"],
            head["bias"],
            meta["field"],
            meta["labels"],
            meta["temperature"],
            meta["threshold"],
            hidden,
        )

    def save(self, directory: str | Path) -> None:
        from safetensors.numpy import save_file

        directory = Path(directory)
        self.static.save_pretrained(str(directory))
        (directory / "README.md").unlink(missing_ok=True)  # model2vec's model card: not part of the model
        tensors = {"weight": self.weight, "bias": self.bias}
        if self.hidden is not None:
            tensors |= {"hidden.weight": self.hidden[0], "hidden.bias": self.hidden[1]}
        save_file(tensors, str(directory / HEAD_FILE))
        meta = {
            "field": self.field,
            "labels": self.labels,
            "temperature": self.temperature,
            "threshold": self.threshold,
            "dims": int(self.static.dim),
            "hidden": 0 if self.hidden is None else int(self.hidden[0].shape[0]),
        }
        (directory / META_FILE).write_text(json.dumps(meta, indent=2))

    def embed(self, inputs: Sequence[str]) -> np.ndarray:
        # One process: a router's batches are small, and a worker pool per call costs more than it saves.
        return self.static.encode(list(inputs), use_multiprocessing=False)

    def logits(self, inputs: Sequence[str]) -> np.ndarray:
        """Un-tempered logits (len(inputs), n_labels)."""
        if not inputs:
            return np.zeros((0, len(self.labels)), dtype=np.float32)
        x = self.embed(inputs)
        if self.hidden is not None:
            x = np.maximum(x @ self.hidden[0].T + self.hidden[1], 0.0)
        return x @ self.weight.T + self.bias

    def probs(self, logits: np.ndarray, mask: np.ndarray | None = None) -> np.ndarray:
        """Calibrated probabilities; masked labels (mask False) get exactly 0."""
        z = logits.astype(np.float64) / self.temperature
        if mask is not None:
            z = np.where(mask[None, :], z, -np.inf)
        z = z - z.max(axis=-1, keepdims=True)
        e = np.exp(z)
        return e / e.sum(axis=-1, keepdims=True)

    def answer(self, inputs: Sequence[str], mask: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        """(label index, confidence) per input."""
        p = self.probs(self.logits(inputs), mask)
        best = p.argmax(axis=-1)
        return best, p[np.arange(len(best)), best]

    def mask_for(self, allowed: Sequence[str]) -> np.ndarray:
        """Which labels a caller may be answered with (the tenant's namespaces)."""
        ok = set(allowed)
        return np.array([v in ok for v in self.labels], dtype=bool)

    def sure(self, query: str, allowed: Sequence[str]) -> dict[str, Any] | None:
        """The cascade's first stage for one query: {field: value, "confidence": c} when the student is
        sure (c >= threshold) under the caller's mask, else None (escalate to the teacher)."""
        mask = self.mask_for(allowed)
        if not mask.any():
            return None
        best, conf = self.answer([query], mask)
        if conf[0] < self.threshold:
            return None
        return {self.field: self.labels[int(best[0])], "confidence": float(conf[0])}
