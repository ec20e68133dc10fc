"""The dated, user-editable `$ per CPU-hour / GPU-hour` table `kolm report` prices owning a model with.

    table = load_compute_prices()        # --compute-prices FILE, else $KOLM_COMPUTE_PRICES,
                                         # $KOLM_HOME/compute_prices.yaml, else configs/compute_prices.yaml
    table.cost(cpu_s=120.0, gpu_s=0.0)   # Decimal dollars

Read and checked like prices.yaml (loop/prices.py): a missing or malformed file is a KolmError (exit 2)
naming the problem; Decimals from the file's text.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from decimal import Decimal, InvalidOperation
from pathlib import Path
from typing import Any

from kolm_ray.errors import KolmError
from kolm_ray.settings import kolm_home

DEFAULT_COMPUTE_PRICES = Path(__file__).resolve().parents[2] / "configs" / "compute_prices.yaml"
HOUR = Decimal(3600)


@dataclass(frozen=True)
class ComputePrices:
    path: str
    taken: str | None
    cpu_hour: Decimal
    gpu_hour: Decimal

    def cost(self, cpu_s: float = 0.0, gpu_s: float = 0.0) -> Decimal:
        """Dollars for this many CPU-core seconds and GPU seconds."""
        return (Decimal(str(cpu_s)) * self.cpu_hour + Decimal(str(gpu_s)) * self.gpu_hour) / HOUR

    def public(self) -> dict[str, Any]:
        return {"file": self.path, "taken": self.taken, "currency": "USD",
                "cpu_hour_usd": float(self.cpu_hour), "gpu_hour_usd": float(self.gpu_hour)}  # fmt: skip


def compute_prices_path(override: str | None = None) -> Path:
    chosen = override or os.environ.get("KOLM_COMPUTE_PRICES")
    if chosen:
        return Path(chosen).expanduser()
    user = kolm_home() / "compute_prices.yaml"
    return user if user.is_file() else DEFAULT_COMPUTE_PRICES


def _rate(value: Any, where: str) -> Decimal:
    bad = KolmError(f"{where} must be a non-negative number of dollars per hour, got {value!r}")
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise bad
    try:
        d = Decimal(str(value))
    except InvalidOperation:
        raise bad from None
    if not d.is_finite() or d < 0:
        raise bad
    return d


def load_compute_prices(override: str | None = None) -> ComputePrices:
    """Read and check the table (KolmError, exit 2, naming the problem)."""
    import yaml

    path = compute_prices_path(override)
    try:
        data = yaml.safe_load(path.read_text())
    except FileNotFoundError:
        raise KolmError(f"compute price table {path} does not exist") from None
    except (OSError, yaml.YAMLError) as e:
        raise KolmError(f"compute price table {path} cannot be read: {e}") from None
    if not isinstance(data, dict) or "cpu_hour" not in data or "gpu_hour" not in data:
        raise KolmError(
            f"compute price table {path}: expected a mapping with `cpu_hour` and `gpu_hour` ($/hour)"
        )
    where = f"compute price table {path}:"
    taken = data.get("taken")
    return ComputePrices(
        path=str(path), taken=None if taken is None else str(taken),
        cpu_hour=_rate(data["cpu_hour"], f"{where} cpu_hour"), gpu_hour=_rate(data["gpu_hour"], f"{where} gpu_hour"),
    )  # fmt: skip
