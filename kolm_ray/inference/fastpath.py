"""The namespace tagger's hot path: the same computation as the artifact's torch model, in its fastest form.

    parts = EncoderParts.from_predictor(open_predictor("namespace-tagger.kolm"))
    tagger, report = build_fast_tagger(parts)          # measures the candidates, keeps the fastest that agrees
    tagger.score(["how do I freeze my card"], [["banking", "credit_cards"]])
    # -> [{"namespace": "credit_cards", "confidence": 0.93}]

Forms (`BACKENDS`), all fed by the same tokenizer and the same weights, read from the verified artifact:
- torch-eager:      the module as trained, under no_grad, torch's default threads
- torch-inference:  inference_mode plus explicit intra-op threads (one interop thread)
- onnx-fp32:        ONNX Runtime, the module exported at replica start into a temporary directory
- onnx-int8:        the same graph with weights dynamically quantized to int8 (onnxruntime.quantization)
- torch-compile:    torch.compile(dynamic=True) (inductor); compiling costs about a minute on 2 cores

A form is served only if it agrees with torch-eager on the probe queries (same top namespace for every
query, probabilities within `tolerance`), so a faster form can never change an answer beyond that.

Tenant safety lives in `masked_softmax`: logits of namespaces outside the caller's list are set to -inf
before the softmax, so they get probability exactly 0 and can never be the answer.
"""

from __future__ import annotations

import os
import statistics
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

NAMESPACE_FIELD = "namespace"
BACKENDS = ("torch-eager", "torch-inference", "onnx-fp32", "onnx-int8", "torch-compile")
# Tried at replica start; the fastest that agrees is served. Measured on the minilm-l6 CLINC150 tagger
# (benchmarks/recall.py, batch 1, 1 thread, 2-core AVX2 machine, two runs): onnx-fp32 6.3-7.6 ms vs torch-eager
# 16.7-19.1 ms. onnx-int8 is no faster there (6.2-6.3 ms; no VNNI) and moves probabilities by up to 0.52, flipping the top
# namespace on 1.3% of 316 queries (per-channel, reduce-range and fp32-FFN-output variants: 1.5-2.5%): not
# the same model, so not tried by default. torch-compile compiles for about a minute on 2 cores and was
# slower at batch 1; replicas skip it. Both stay in BACKENDS for the benchmark.
SERVED_CANDIDATES = ("onnx-fp32", "torch-inference")
MAX_LENGTH = 64  # routing queries are short; 64 word pieces keep a 2 KiB query's head and bound the cost

# Probe queries for the agreement check and the timing: varied lengths, in and out of any vocabulary.
PROBES = (
    "how do I freeze my account",
    "what's the interest rate on my savings",
    "book a table for two at an italian place tonight",
    "remind me to call mom at 5",
    "my car's check engine light is on, what should I do",
    "how long is the flight from boston to denver",
    "pay the electricity bill",
    "schedule a meeting with the design team next tuesday at 3pm",
    "tell me a joke",
    "what can you do",
    "i lost my credit card while traveling in spain, can you send me a replacement quickly?",
    "how many calories are in a banana",
    "set the thermostat to 70 degrees",
    "what is the weather tomorrow",
    "x",
    "restart the ingest worker after the deploy failed with exit code 137 on node 4 of the cluster",
)


@dataclass
class EncoderParts:
    """What a fast form needs from an encoder tagger: tokenizer, torch module, labels, temperature."""

    tokenizer: Any
    module: Any
    """torch.nn.Module: (input_ids, attention_mask) -> namespace logits [batch, len(labels)]."""
    labels: list[str]
    temperature: float = 1.0
    max_length: int = MAX_LENGTH
    outlier: dict[str, float] | None = None
    """The "none of these" logit {"weight", "offset"} when the module also returns class distances: its
    output is then [batch, 2 * len(labels)], logits then distances (models.ClassGaussians)."""

    @classmethod
    def from_predictor(cls, predictor: Any, field_name: str = NAMESPACE_FIELD) -> EncoderParts:
        """Take the encoder tagger's parts from a Predictor (kolm_ray.inference.predictors.open_predictor)."""
        labels = list(predictor.labels[field_name])
        temperature = getattr(predictor, "temperature", {}) or {}
        t = float(temperature.get(field_name, 1.0)) if isinstance(temperature, dict) else float(temperature)
        fields = list(predictor.labels)
        max_length = int(getattr(predictor, "max_len", MAX_LENGTH) or MAX_LENGTH)
        outlier = (getattr(predictor, "outlier", {}) or {}).get(field_name)
        if getattr(predictor.model, "gaussians", None) is None:
            outlier = None
        module = FieldLogits(predictor.model, field_name, fields, distances=outlier is not None)
        return cls(predictor.tokenizer, module, labels, t, max_length, outlier)

    def encode(self, texts: Sequence[str]) -> dict[str, np.ndarray]:
        """Tokenize a batch (padded to its longest query) into int64 numpy arrays."""
        enc = self.tokenizer(
            list(texts), padding=True, truncation=True, max_length=self.max_length, return_tensors="np"
        )
        return {
            "input_ids": enc["input_ids"].astype(np.int64),
            "attention_mask": enc["attention_mask"].astype(np.int64),
        }


def FieldLogits(model: Any, field_name: str, fields: Sequence[str], distances: bool = False) -> Any:  # noqa: N802 (a module factory)
    """Wrap a tagger module returning per-field logits (dict, tuple or tensor) into one returning `field`'s;
    with `distances` (an EncoderTagger with ClassGaussians), its logits and class distances side by side."""
    import torch

    class _FieldLogits(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.inner = model

        def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
            if distances:
                logits, dists = self.inner.scores(input_ids, attention_mask)
                return torch.cat([logits[field_name], dists[field_name]], dim=-1)
            out = self.inner(input_ids=input_ids, attention_mask=attention_mask)
            if isinstance(out, dict):
                return out[field_name]
            if isinstance(out, (tuple, list)):
                return out[list(fields).index(field_name)] if len(out) == len(fields) else out[0]
            return out

    return _FieldLogits().eval()


def masked_softmax(
    logits: np.ndarray,
    allowed: np.ndarray,
    temperature: float = 1.0,
    distances: np.ndarray | None = None,
    outlier: dict[str, float] | None = None,
) -> np.ndarray:
    """Softmax over each row's allowed labels only: disallowed logits become -inf BEFORE the softmax.

    logits [B, L] float, allowed [B, L] bool. A row with no allowed label comes back all zeros. With class
    `distances` [B, L] and `outlier`, the "none of these" logit weight * (nearest ALLOWED distance - offset)
    joins the softmax and is dropped (models.outlier_probs, the torch twin): rows far from every allowed
    class sum to less than 1.
    """
    z = np.where(allowed, logits.astype(np.float64) / temperature, -np.inf)
    none = np.full((len(z), 1), -np.inf)
    if distances is not None and outlier and outlier.get("weight"):
        nearest = np.where(allowed, distances.astype(np.float64), np.inf).min(axis=1, keepdims=True)
        none = np.where(np.isfinite(nearest), outlier["weight"] * (nearest - outlier["offset"]), -np.inf)
    zmax = np.maximum(np.max(z, axis=1, keepdims=True), none)
    zmax = np.where(np.isfinite(zmax), zmax, 0.0)
    e = np.where(allowed, np.exp(z - zmax), 0.0)
    total = e.sum(axis=1, keepdims=True) + np.exp(none - zmax)  # exp(-inf) = 0 without a none logit
    return np.divide(e, total, out=np.zeros_like(e), where=total > 0)


@dataclass
class FastTagger:
    """Scores queries against each caller's own namespaces with one logits function (any backend)."""

    parts: EncoderParts
    logits_fn: Callable[[dict[str, np.ndarray]], np.ndarray]
    backend: str
    _index: dict[str, int] = field(init=False)

    def __post_init__(self) -> None:
        self._index = {name: i for i, name in enumerate(self.parts.labels)}

    @property
    def labels(self) -> list[str]:
        return self.parts.labels

    def logits(self, texts: Sequence[str]) -> np.ndarray:
        return np.asarray(self.logits_fn(self.parts.encode(texts)), dtype=np.float32)

    def probabilities(
        self, texts: Sequence[str], allowed: Sequence[Sequence[str]] | None = None
    ) -> np.ndarray:
        """Calibrated probabilities [B, L]; with `allowed`, each row is masked to its own list first."""
        return self.ranked(texts, allowed)[1]

    def ranked(
        self, texts: Sequence[str], allowed: Sequence[Sequence[str]] | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        """(best allowed label per row, -1 where none is allowed; calibrated probabilities [B, L]).

        The best label is the top allowed logit, not the top probability: far from every class the
        "none of these" logit can leave every probability at 0.0, and the answer must not depend on that.
        """
        out = self.logits(texts)
        n = len(self.parts.labels)
        logits, distances = out[:, :n], (out[:, n:] if self.parts.outlier is not None else None)
        mask = np.ones_like(logits, dtype=bool)
        if allowed is not None:
            mask = np.zeros_like(logits, dtype=bool)
            for row, names in enumerate(allowed):
                idx = [self._index[n] for n in names if n in self._index]
                mask[row, idx] = True
        probs = masked_softmax(logits, mask, self.parts.temperature, distances, self.parts.outlier)
        best = np.where(mask.any(axis=1), np.where(mask, logits, -np.inf).argmax(axis=1), -1)
        return best, probs

    def score(self, texts: Sequence[str], allowed: Sequence[Sequence[str]]) -> list[dict[str, Any]]:
        """For each query, the most likely namespace among that caller's `allowed` ones and its probability.

        {"namespace": None, "confidence": 0.0} when none of the caller's namespaces is known to the tagger.
        """
        best, probs = self.ranked(texts, allowed)
        out = []
        for b, row in zip(best, probs, strict=True):
            if b < 0:
                out.append({NAMESPACE_FIELD: None, "confidence": 0.0})
                continue
            out.append({NAMESPACE_FIELD: self.parts.labels[b], "confidence": float(row[b])})
        return out


# --- the forms ---------------------------------------------------------------------------------------------


def _torch_runner(module: Callable, grad_off: Callable) -> Callable:
    """run(enc) for a torch module (plain or compiled) under a no-grad context."""
    import torch

    def run(enc: dict[str, np.ndarray]) -> np.ndarray:
        with grad_off():
            return module(torch.from_numpy(enc["input_ids"]), torch.from_numpy(enc["attention_mask"])).numpy()

    return run


def _torch_eager(parts: EncoderParts, threads: int, workdir: str) -> Callable:
    import torch

    return _torch_runner(parts.module, torch.no_grad)


def _torch_inference(parts: EncoderParts, threads: int, workdir: str) -> Callable:
    import torch

    torch.set_num_threads(threads)
    return _torch_runner(parts.module, torch.inference_mode)


def _torch_compile(parts: EncoderParts, threads: int, workdir: str) -> Callable:
    import torch

    torch.set_num_threads(threads)
    return _torch_runner(torch.compile(parts.module, dynamic=True), torch.inference_mode)


def export_onnx(parts: EncoderParts, path: str) -> str:
    """Export the module (weights as read from the verified artifact) to ONNX with dynamic batch and length."""
    import warnings

    import torch

    sample = parts.encode(["export sample query", "a second, somewhat longer sample query for the export"])
    args = (torch.from_numpy(sample["input_ids"]), torch.from_numpy(sample["attention_mask"]))
    dyn = {
        "input_ids": {0: "batch", 1: "seq"},
        "attention_mask": {0: "batch", 1: "seq"},
        "logits": {0: "batch"},
    }
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        # The TorchScript exporter: the dynamo exporter needs onnxscript, which this project does not ship.
        torch.onnx.export(
            parts.module,
            args,
            path,
            dynamo=False,
            input_names=["input_ids", "attention_mask"],
            output_names=["logits"],
            dynamic_axes=dyn,
            opset_version=17,
        )
    return path


def _ort_session(path: str, threads: int) -> Any:
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.log_severity_level = 3
    # Intra-op threads sleep when idle instead of spinning: a replica shares its cores with the ingress, other
    # replicas and Ray's own processes. Measured through Serve at 50 rps on 2 cores with 2 threads: spinning,
    # 24.5 ms of replica CPU per request and p50/p99 50/223 ms; sleeping, 15.0 ms and 31/116 ms. (1 thread: no pool.)
    so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    # Read the model into memory so the temporary directory can go as soon as the session exists.
    with open(path, "rb") as f:
        return ort.InferenceSession(f.read(), so, providers=["CPUExecutionProvider"])


def _onnx(parts: EncoderParts, threads: int, workdir: str, int8: bool) -> Callable:
    path = os.path.join(workdir, "tagger.onnx")
    if not os.path.exists(path):
        export_onnx(parts, path)
    if int8:
        import logging

        from onnxruntime.quantization import QuantType, quantize_dynamic

        qpath = os.path.join(workdir, "tagger.int8.onnx")
        # quantize_dynamic logs a pre-processing hint on the root logger; it is advice, not a problem here.
        root = logging.getLogger()
        level = root.level
        root.setLevel(logging.ERROR)
        try:
            quantize_dynamic(path, qpath, weight_type=QuantType.QInt8)
        finally:
            root.setLevel(level)
        path = qpath
    session = _ort_session(path, threads)

    def run(enc: dict[str, np.ndarray]) -> np.ndarray:
        return session.run(["logits"], enc)[0]

    return run


_BUILDERS: dict[str, Callable[[EncoderParts, int, str], Callable]] = {
    "torch-eager": _torch_eager,
    "torch-inference": _torch_inference,
    "onnx-fp32": lambda p, t, w: _onnx(p, t, w, int8=False),
    "onnx-int8": lambda p, t, w: _onnx(p, t, w, int8=True),
    "torch-compile": _torch_compile,
}


def _time_ms(fn: Callable[[], Any], repeat: int) -> list[float]:
    fn()  # warm-up (first call allocates, compiles or plans)
    fn()
    out = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        out.append((time.perf_counter() - t0) * 1e3)
    return out


def default_threads() -> int:
    """Intra-op threads: KOLM_SERVE_THREADS, else OMP_NUM_THREADS (Ray sets it to a replica's num_cpus),
    else 2 or the machine's cores if fewer."""
    for var in ("KOLM_SERVE_THREADS", "OMP_NUM_THREADS"):
        value = os.environ.get(var, "")
        if value.isdigit() and int(value) > 0:
            return int(value)
    return min(2, os.cpu_count() or 1)


def measure_backends(
    parts: EncoderParts,
    backends: Sequence[str] = BACKENDS,
    threads: int | None = None,
    probes: Sequence[str] = PROBES,
    batch_sizes: Sequence[int] = (1, 8),
    repeat: int = 30,
    tolerance: float = 0.03,
) -> list[dict[str, Any]]:
    """Build each form, check it against torch-eager on the probes, and time it (ms per batch, median/p90).

    Returns one row per backend: {backend, agrees, top1_agreement, max_prob_diff, build_s, ms: {batch: ...}}.
    A row whose form failed to build says why in "error".
    """
    return _measure(parts, backends, threads or default_threads(), probes, batch_sizes, repeat, tolerance)[0]


def _measure(
    parts: EncoderParts,
    backends: Sequence[str],
    threads: int,
    probes: Sequence[str],
    batch_sizes: Sequence[int],
    repeat: int,
    tolerance: float,
) -> tuple[list[dict[str, Any]], dict[str, FastTagger]]:
    probes = list(probes)
    everyone = [list(parts.labels)] * len(probes)
    rows: list[dict[str, Any]] = []
    taggers: dict[str, FastTagger] = {}
    with tempfile.TemporaryDirectory(prefix="kolm-fastpath-") as workdir:
        ref_best, reference = FastTagger(parts, _torch_eager(parts, threads, workdir), "torch-eager").ranked(
            probes, everyone
        )
        for name in backends:
            row: dict[str, Any] = {"backend": name, "threads": threads}
            try:
                t0 = time.perf_counter()
                tagger = FastTagger(parts, _BUILDERS[name](parts, threads, workdir), name)
                best, probs = tagger.ranked(probes, everyone)
                row["build_s"] = round(time.perf_counter() - t0, 2)
                taggers[name] = tagger
            except Exception as e:  # a form that cannot be built here is reported, not fatal
                rows.append({**row, "agrees": False, "error": f"{type(e).__name__}: {e}"})
                continue
            top1 = float((best == ref_best).mean())
            diff = float(np.abs(probs - reference).max())
            row.update(
                top1_agreement=top1, max_prob_diff=round(diff, 5), agrees=top1 == 1.0 and diff <= tolerance
            )
            row["ms"] = {}
            for bs in batch_sizes:
                batch = (probes * (bs // len(probes) + 1))[:bs]
                enc = parts.encode(batch)
                ts = _time_ms(lambda enc=enc, t=tagger: t.logits_fn(enc), repeat)
                row["ms"][str(bs)] = {
                    "p50": round(statistics.median(ts), 3),
                    "p90": round(float(np.percentile(ts, 90)), 3),
                }
            rows.append(row)
    return rows, taggers


def build_fast_tagger(
    parts: EncoderParts,
    candidates: Sequence[str] = SERVED_CANDIDATES,
    threads: int | None = None,
    tolerance: float = 0.03,
    repeat: int = 20,
) -> tuple[FastTagger, list[dict[str, Any]]]:
    """Build the candidate forms, keep those that agree with torch-eager, serve the fastest at batch 1.

    The ONNX files live only in a temporary directory while the sessions are created: nothing unsigned
    stays on disk. Falls back to torch-eager when no candidate agrees.
    """
    backends = ("torch-eager", *[c for c in candidates if c != "torch-eager"])
    rows, taggers = _measure(parts, backends, threads or default_threads(), PROBES, (1,), repeat, tolerance)
    ok = [r for r in rows if r.get("agrees") and r["backend"] != "torch-eager"]
    best = min(ok, key=lambda r: r["ms"]["1"]["p50"])["backend"] if ok else "torch-eager"
    for r in rows:
        r["served"] = r["backend"] == best
    return taggers[best], rows
