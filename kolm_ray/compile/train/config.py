"""TrainConfig: everything one training worker needs, a typed dataclass with its fields documented.

compile builds it from the recipe and the flags (compile.train_config) and hands it to Ray Train as a
plain dict (to_dict); train_loop_per_worker reads it back.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any


@dataclass
class TrainConfig:
    """Everything one worker needs; passed to TorchTrainer as a plain dict (asdict)."""

    base: str
    """Base name or local directory (bases.resolve_base)."""
    kind: str
    """"encoder" (a tagger with one head per field), "extractor" (span + class heads) or "causal-lm" (LoRA SFT)."""
    rows: list[dict[str, Any]]
    """Training rows {input, output, negative?}."""
    labels: dict[str, list[Any]] = field(default_factory=dict)
    """Encoder taggers: field -> its values, in head order."""
    extract: dict[str, Any] | None = None
    """Encoder extractors: the layout (models.extract_layout.extraction_layout): span and class fields."""
    epochs: int = 3
    batch_size: int = 32
    """Per-worker micro-batch size (at most: see min_steps)."""
    min_steps: int = 100
    """Small train splits use smaller batches (down to 8 per worker) so that training takes at least this many
    optimizer steps; 0 keeps batch_size. Measured with minilm-l6 on CLINC150 samples disjoint from the recipe
    benchmark's (3 epochs, one process): a 10-namespace router from 610 pairs went from 0.906 / 0.907 / 0.917
    accuracy on 1,500 held-out queries (30 steps of 64 pairs) to 0.928 / 0.928 / 0.930 (114 steps of 16, the
    same 3 passes); a 15-intent banking task from 610 pairs with 10% of labels flipped stayed
    level, 0.975 / 0.980 -> 0.972 / 0.982 on 1,000 clean queries."""
    lr: float = 1e-4
    """Peak learning rate of the base (encoder body or LoRA adapter); linear warm-up then linear decay."""
    head_lr: float = 2e-3
    """Encoder taggers: learning rate of the freshly initialised heads."""
    warmup: float = 0.06
    """Fraction of the steps spent warming up."""
    weight_decay: float = 0.01
    max_len: int = 64
    """Tokens per input (encoder) or per prompt+answer (causal LM); longer ones are truncated."""
    freeze_embeddings: bool = True
    """Encoder taggers: keep the token embeddings fixed (most of MiniLM's weights; a dense gradient over
    a 30k-token table costs more than the rest of a CPU step)."""
    freeze_layers: int = 0
    """Encoder taggers: also freeze this many lowest encoder layers (faster CPU epochs)."""
    probe_init: bool = True
    """Encoder taggers: start each head from a linear probe on the base's pooled train vectors (init_heads)."""
    negative_weight: float = 1.0
    """Weight of the "none of these" loss on negative rows."""
    mix_weight: float = 0.0
    """Encoder taggers: weight of the "none of these" loss on pseudo-outliers, pooled vectors of two rows
    with different labels mixed (lambda in [0.3, 0.7]); compile turns it on for routers (fallback verifier)."""
    pack_len: int = 1024
    """Causal LMs: pairs of a batch are packed into rows of up to this many tokens (train.data.pack_sft;
    position ids restart per pair, so each attends to itself only) instead of one padded row each; 0 pads."""
    lora_r: int = 16
    lora_alpha: int = 32
    gradient_checkpointing: bool = False
    deepspeed: dict[str, Any] | None = None
    """A DeepSpeed config (configs/deepspeed/*.json, already read); None trains with plain DDP."""
    seed: int = 0
    threads: int | None = None
    """torch intra-op threads per worker (default: what Ray or the OS gives)."""
    progress: bool = True
    """A progress bar per epoch (rank 0); False prints one line per epoch instead (output not a terminal)."""
    verbose: bool = False
    """Under Ray: keep Ray Train's own INFO lines (`Reporting training result ...`) on the console."""
    in_ray: bool = False
    """Set by train/trainer.py: report through ray.train instead of writing output_dir."""
    output_dir: str | None = None
    resume_from: str | None = None
    kill_once: dict[str, Any] | None = None
    """Test hook: {"rank": r, "after_epoch": e, "marker": path, "wait_for": glob} SIGKILLs that worker once,
    after a file matching `wait_for` exists (e.g. Ray Train's checkpoint-manager snapshot), so the kill lands
    after the controller has registered a checkpoint rather than racing it."""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)
