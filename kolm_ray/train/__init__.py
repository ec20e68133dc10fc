"""Training: data preparation (data.py), the per-worker loop (loop.py), the Ray Train wiring (trainer.py)."""

from kolm_ray.train.loop import TrainConfig, train_loop_per_worker

__all__ = ["TrainConfig", "train_loop_per_worker"]
