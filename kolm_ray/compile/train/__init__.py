"""Training: its config (config.py), data preparation (data.py), the encoder heads' fitted starts (encoder.py),
the per-worker loop (loop.py), checkpoints (checkpoint.py), the Ray Train wiring (trainer.py)."""

from kolm_ray.compile.train.config import TrainConfig
from kolm_ray.compile.train.loop import train_loop_per_worker

__all__ = ["TrainConfig", "train_loop_per_worker"]
