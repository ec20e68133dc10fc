"""What a compile costs in compute, measured: CPU seconds of the driver and the Ray Train workers, wall
seconds, GPUs. Written to the manifest's `metrics.compute` and priced by `kolm report`'s net savings
(loop/compute_prices.py, configs/compute_prices.yaml).

    meter = Meter()                 # before training
    ...train, evaluate...
    metrics["compute"] = meter.usage(training)   # training: the run's {"worker_cpu_s", "gpus"}

- driver_cpu_s: this process's CPU time (user + system, all its threads) since the Meter began: staging,
  calibration, evaluation, the student fit, and for `kolm loop` the clustering and recipe driver work.
- worker_cpu_s: each Ray Train worker process's CPU time over its life (loading the base and training),
  summed over the workers (train/loop.py reports it with the last epoch).
- wall_s: wall seconds since the Meter began; gpus: Ray Train workers with a GPU; gpu_s = gpus x wall_s
  (a GPU is held, and billed, for the whole run, not only while it computes).

Not counted: Ray's own daemons (GCS, raylet, dashboard) and Ray Data's clustering workers; on the small
runs measured here they are a few CPU seconds next to the training's minutes.
"""

from __future__ import annotations

import time
from typing import Any


class Meter:
    def __init__(self) -> None:
        self.cpu0 = time.process_time()
        self.wall0 = time.perf_counter()

    def usage(self, training: dict[str, Any] | None = None) -> dict[str, Any]:
        training = training or {}
        driver = time.process_time() - self.cpu0
        wall = time.perf_counter() - self.wall0
        worker = float(training.get("worker_cpu_s") or 0.0)
        gpus = int(training.get("gpus") or 0)
        return {
            "driver_cpu_s": round(driver, 3),
            "worker_cpu_s": round(worker, 3),
            "cpu_s": round(driver + worker, 3),
            "wall_s": round(wall, 3),
            "gpus": gpus,
            "gpu_s": round(gpus * wall, 3),
        }
