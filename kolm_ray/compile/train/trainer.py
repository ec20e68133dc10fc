"""Ray Train wiring: a TorchTrainer around the plain per-worker function in train/loop.py.

Connects to the cluster in RAY_ADDRESS when set (so `ray job submit -- kolm compile ...` trains on the
cluster), else starts a local Ray. Workers take a GPU each when the cluster has GPUs (DeepSpeed ZeRO from
configs/deepspeed/ when asked), else train on CPU with DDP over gloo. FailureConfig restarts a worker
group that lost a worker, and the restarted workers resume from the last reported checkpoint.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kolm_ray.compile.train.config import TrainConfig
from kolm_ray.compile.train.loop import train_loop_per_worker
from kolm_ray.errors import KolmError


@dataclass
class TrainResult:
    checkpoint_dir: Path
    """A local copy of the last reported checkpoint (trainable weights + state.json)."""
    metrics: dict[str, Any]
    seconds: float


def fit(
    config: TrainConfig,
    *,
    num_workers: int = 1,
    use_gpu: bool | None = None,
    max_failures: int = 1,
    storage_path: str | None = None,
    name: str | None = None,
    workdir: str | Path | None = None,
) -> TrainResult:
    """Run train_loop_per_worker on `num_workers` Ray Train workers and fetch the final checkpoint.

    Must run inside placement.ray_session() (or an initialised Ray). use_gpu=None: GPUs when the cluster has them.
    """
    import ray
    from ray.train import CheckpointConfig, FailureConfig, LoggingConfig, RunConfig
    from ray.train.torch import TorchTrainer

    from kolm_ray.placement import progress_bars, resolve_use_gpu, scaling_config, torch_threads, verbose

    gpu = resolve_use_gpu(use_gpu)
    cpus = float(ray.cluster_resources().get("CPU", 1))
    per_worker = max(1.0, (cpus // max(num_workers, 1)) if not gpu else 1.0)
    if not gpu:
        config.threads = config.threads or torch_threads(int(per_worker))
    config.in_ray = True
    config.progress = config.progress and progress_bars()  # a bar on a terminal, else a line per epoch
    config.verbose = verbose()
    storage = storage_path or os.environ.get("KOLM_TRAIN_STORAGE") or _default_storage()
    run_name = name or f"compile-{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:6]}"
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config=config.to_dict(),
        # GPUs (pinned to KOLM_ACCELERATOR_TYPE when set) and never a Mac node: see cluster/README.md.
        scaling_config=scaling_config(num_workers, gpu, cpus_per_worker=per_worker),
        run_config=RunConfig(
            name=run_name,
            storage_path=storage,
            failure_config=FailureConfig(max_failures=max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=2),
            logging_config=LoggingConfig(log_level="INFO" if config.verbose else "WARNING"),
        ),
    )
    t0 = time.perf_counter()
    try:
        result = trainer.fit()
    except Exception as e:  # a worker error: surface its message, not Ray's wrapper
        raise KolmError(f"training failed: {_root_message(e)}") from e
    seconds = time.perf_counter() - t0
    if result.checkpoint is None:
        raise KolmError("training reported no checkpoint (no training rows?)")
    local = Path(workdir or tempfile.mkdtemp(prefix="kolm-ckpt-")) / "checkpoint"
    with result.checkpoint.as_directory() as d:
        shutil.copytree(d, local, dirs_exist_ok=True)
    shutil.rmtree(Path(storage) / run_name, ignore_errors=True)  # the run's copies; ours is in `local`
    return TrainResult(local, dict(result.metrics or {}), seconds)


def _default_storage() -> str:
    from kolm_ray.settings import kolm_home

    path = kolm_home() / "runs"
    path.mkdir(parents=True, exist_ok=True)
    return str(path)


def _root_message(e: BaseException) -> str:
    seen = e
    while seen.__cause__ is not None:
        seen = seen.__cause__
    text = str(seen).strip().splitlines()
    return text[-1] if text else type(seen).__name__
