"""The per-worker loop without Ray (plain, DeepSpeed ZeRO-2 on CPU), and under Ray Train with 2 workers where
one is SIGKILLed and the group resumes from the last reported checkpoint."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
from compile_helpers import WORDS

from kolm_ray.compile.train.checkpoint import STATE, WEIGHTS
from kolm_ray.compile.train.config import TrainConfig
from kolm_ray.compile.train.loop import batch_size_for, train_loop_per_worker

REPO = Path(__file__).resolve().parent.parent
LABELS = {"namespace": list(WORDS)}


def _rows(n_per_label: int = 20, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    rows = [
        {"input": " ".join(rng.choices(WORDS[lab], k=3)), "output": {"namespace": lab}} for lab in WORDS
    ] * n_per_label
    rng.shuffle(rows)
    return rows


def _config(tmp: Path, **kw) -> dict:
    base = {
        "base": "tiny-encoder", "kind": "encoder", "rows": _rows(), "labels": LABELS, "epochs": 3, "lr": 3e-3,
        "head_lr": 3e-3, "freeze_embeddings": False, "warmup": 0.0, "output_dir": str(tmp / "run"),
        "progress": False, "threads": 1,
    }  # fmt: skip
    return TrainConfig(**{**base, **kw}).to_dict()


def test_plain_loop_loss_falls_and_resumes(tmp_path: Path) -> None:
    m = train_loop_per_worker(_config(tmp_path))
    assert m["world_size"] == 1 and m["start_epoch"] == 0 and len(m["losses"]) == 3
    assert m["batch_size"] == batch_size_for(len(_rows()), TrainConfig(**_config(tmp_path)), world=1)
    assert m["losses"][-1] < m["losses"][0] * 0.7
    ckpt = Path(m["checkpoint"])
    assert (ckpt / WEIGHTS).exists() and json.loads((ckpt / STATE).read_text())["epoch"] == 2
    # resume from epoch 1's checkpoint: only epoch 2 runs, history kept
    again = train_loop_per_worker(_config(tmp_path, resume_from=str(tmp_path / "run" / "epoch-1")))
    assert again["start_epoch"] == 2 and len(again["losses"]) == 3
    assert again["losses"][:2] == m["losses"][:2]


def test_probe_init_starts_heads_fitted(tmp_path: Path) -> None:
    """Heads start from a linear probe on the base's vectors: the first epoch's loss is far below a random
    head's (same seed, same rows), and the probe alone already separates the labels."""
    import torch

    from kolm_ray.compile.train.data import collate_tagger, encode_tagger_rows
    from kolm_ray.compile.train.encoder import init_heads
    from kolm_ray.compile.train.loop import build_model

    cfg = TrainConfig(**_config(tmp_path))
    model, tok = build_model(cfg)
    examples = encode_tagger_rows(cfg.rows, tok, cfg.labels, cfg.max_len)
    init_heads(model, examples, tok.pad_token_id)
    batch = collate_tagger(examples, tok.pad_token_id)
    model.eval()
    with torch.no_grad():
        pred = model(batch["input_ids"], batch["attention_mask"])["namespace"].argmax(-1)
    assert (pred == batch["targets"][:, 0]).float().mean() > 0.95
    probe = train_loop_per_worker(_config(tmp_path, epochs=1, lr=1e-5))
    random_head = train_loop_per_worker(_config(tmp_path, epochs=1, lr=1e-5, probe_init=False))
    assert probe["losses"][0] < 0.5 * random_head["losses"][0]


def test_plain_loop_causal_lm_lora_loss_falls(tmp_path: Path) -> None:
    rows = [{"input": r["input"], "output": r["output"]} for r in _rows(4)]
    m = train_loop_per_worker(
        _config(
            tmp_path,
            base="tiny-causal-lm",
            kind="causal-lm",
            rows=rows,
            labels={},
            epochs=4,
            batch_size=4,
            lora_r=8,
            lr=1e-2,
        )
    )
    assert m["losses"][-1] < m["losses"][0] * 0.5
    from safetensors.torch import load_file

    names = list(load_file(str(Path(m["checkpoint"]) / WEIGHTS)))
    assert names and all("lora_" in n for n in names)  # only the adapter is trained and saved


def test_deepspeed_zero2_on_cpu(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(REPO / ".venv" / "torch_extensions"))
    ds = json.loads((REPO / "configs" / "deepspeed" / "zero2.json").read_text())
    m = train_loop_per_worker(_config(tmp_path, deepspeed=ds, epochs=2))
    assert m["losses"][-1] < m["losses"][0]
    ckpt = Path(m["checkpoint"])
    assert (ckpt / WEIGHTS).exists() and (ckpt / "deepspeed").is_dir()
    again = train_loop_per_worker(_config(tmp_path, deepspeed=ds, epochs=3, resume_from=str(ckpt)))
    assert again["start_epoch"] == 2 and len(again["losses"]) == 3


@pytest.mark.parametrize("name", ["zero2.json", "zero3.json"])
def test_deepspeed_configs_resolve(name: str) -> None:
    from kolm_ray.compile.train.loop import deepspeed_config

    raw = json.loads((REPO / "configs" / "deepspeed" / name).read_text())
    cfg = deepspeed_config(
        raw, TrainConfig(base="x", kind="encoder", rows=[], batch_size=8, lr=1e-4), 4, on_gpu=False
    )
    assert not any(k.startswith("_") for k in cfg)
    assert cfg["train_batch_size"] == 32 and cfg["bf16"]["enabled"] is False
    assert cfg["optimizer"]["params"]["lr"] == 1e-4 and cfg["optimizer"]["params"]["torch_adam"] is True
    assert cfg["zero_optimization"]["stage"] == int(name[4])
    assert "auto" not in json.dumps(cfg)


@pytest.mark.slow
def test_ray_train_two_workers_killed_worker_resumes(tmp_path: Path) -> None:
    import ray

    from kolm_ray.compile.train.trainer import fit
    from kolm_ray.models.bases import resolve_base

    marker = tmp_path / "killed"
    base = resolve_base(
        "tiny-encoder"
    ).source  # built here once; workers load the directory (as compile does)
    cfg = TrainConfig(
        **_config(
            tmp_path,
            base=base,
            epochs=3,
            kill_once={
                "rank": 1,
                "after_epoch": 1,
                "marker": str(marker),
                "wait_for": str(tmp_path / "storage" / "*" / "checkpoint_manager_snapshot.json"),
            },
        )
    )
    ray.init(address="local", num_cpus=2, include_dashboard=False)
    try:
        result = fit(
            cfg,
            num_workers=2,
            use_gpu=False,
            max_failures=1,
            storage_path=str(tmp_path / "storage"),
            workdir=tmp_path,
        )
    finally:
        ray.shutdown()
    assert marker.exists()  # rank 1 really was SIGKILLed after epoch 1
    m = result.metrics
    # The restarted group resumed from a reported checkpoint (epoch 0's, or epoch 1's when the controller had
    # registered it before the kill), not from scratch.
    assert m["world_size"] == 2 and m["start_epoch"] in (1, 2)
    assert len(m["losses"]) == 3 and m["losses"][-1] < m["losses"][0]
    assert json.loads((result.checkpoint_dir / STATE).read_text())["epoch"] == 2


def test_small_train_splits_use_smaller_batches_for_enough_steps():
    from kolm_ray.compile.train.loop import batch_size_for, steps_for

    def cfg(**kw):
        return TrainConfig(base="tiny-encoder", kind="encoder", rows=[], **kw)

    # compile's flags defaults on a 610-pair router, 2 workers: 30 steps of 32 per worker become 117 of 8
    assert batch_size_for(610, cfg(batch_size=32, epochs=3), world=2) == 8
    assert steps_for(610, 8, 2) * 3 >= 100
    assert batch_size_for(611, cfg(batch_size=32, epochs=4), world=1) == 24  # a recipe's settings
    assert batch_size_for(15_000, cfg(batch_size=32, epochs=3), world=2) == 32  # enough data: unchanged
    assert batch_size_for(90, cfg(batch_size=32, epochs=3), world=1) == 8  # never below 8
    assert batch_size_for(610, cfg(batch_size=32, epochs=3, min_steps=0), world=2) == 32  # off
    assert batch_size_for(610, cfg(batch_size=4, epochs=3), world=2) == 4  # already small
