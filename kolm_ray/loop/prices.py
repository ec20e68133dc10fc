"""The dated per-model price table `kolm report` prices captured token usage with.

    table = load_prices()                      # --prices FILE, else $KOLM_PRICES, $KOLM_HOME/prices.yaml,
                                               # else configs/prices.yaml
    table.price("gpt-4o-2024-08-06")           # Price(input=Decimal('2.5'), output=Decimal('10')) or None
    table.cost("gpt-4o", 1200, 300)            # Decimal dollars (None for an unpriced model)

Dollars are Decimals built from the file's text, so a sum of calls equals the hand computation exactly
(floats would drift in the last digits over a million calls).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from decimal import Decimal, InvalidOperation
from pathlib import Path
from typing import Any

from kolm_ray.errors import KolmError
from kolm_ray.settings import kolm_home

DEFAULT_PRICES = Path(__file__).resolve().parents[2] / "configs" / "prices.yaml"
MILLION = Decimal(1_000_000)


@dataclass(frozen=True)
class Price:
    """Dollars per 1M input and output tokens."""

    input: Decimal
    output: Decimal


@dataclass(frozen=True)
class PriceTable:
    path: str
    taken: str | None
    models: dict[str, Price]

    def key_for(self, model: str | None) -> str | None:
        """The table key pricing `model`: itself, else the longest key that is a prefix followed by "-"."""
        if not model:
            return None
        name = model.strip().lower()
        if name in self.models:
            return name
        hits = [k for k in self.models if name.startswith(k + "-")]
        return max(hits, key=len) if hits else None

    def price(self, model: str | None) -> Price | None:
        key = self.key_for(model)
        return None if key is None else self.models[key]

    def cost(
        self, model: str | None, input_tokens: int | float, output_tokens: int | float
    ) -> Decimal | None:
        """Dollars for this many tokens of `model` (None when the model has no price)."""
        p = self.price(model)
        if p is None:
            return None
        return (Decimal(str(input_tokens)) * p.input + Decimal(str(output_tokens)) * p.output) / MILLION


def prices_path(override: str | None = None) -> Path:
    """Which file: the flag, else $KOLM_PRICES, else $KOLM_HOME/prices.yaml, else the shipped table."""
    chosen = override or os.environ.get("KOLM_PRICES")
    if chosen:
        return Path(chosen).expanduser()
    user = kolm_home() / "prices.yaml"
    return user if user.is_file() else DEFAULT_PRICES


def _dollars(value: Any, where: str) -> Decimal:
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise KolmError(f"{where} must be a number of dollars per 1M tokens, got {value!r}")
    try:
        d = Decimal(str(value))
    except InvalidOperation:
        raise KolmError(f"{where} must be a number of dollars per 1M tokens, got {value!r}") from None
    if not d.is_finite() or d < 0:
        raise KolmError(f"{where} must be a non-negative number, got {value!r}")
    return d


def load_prices(override: str | None = None) -> PriceTable:
    """Read and check the price table (KolmError, exit 2, naming the problem)."""
    import yaml

    path = prices_path(override)
    try:
        data = yaml.safe_load(path.read_text())
    except FileNotFoundError:
        raise KolmError(f"price table {path} does not exist") from None
    except (OSError, yaml.YAMLError) as e:
        raise KolmError(f"price table {path} cannot be read: {e}") from None
    if not isinstance(data, dict) or not isinstance(data.get("models"), dict):
        raise KolmError(f"price table {path}: expected a mapping with `models: {{NAME: {{input, output}}}}`")
    models: dict[str, Price] = {}
    for name, row in data["models"].items():
        if not isinstance(row, dict) or set(row) - {"input", "output"} or not {"input", "output"} <= set(row):
            raise KolmError(f"price table {path}: models.{name} must be {{input: $/1M, output: $/1M}}")
        where = f"price table {path}: models.{name}"
        models[str(name).strip().lower()] = Price(
            _dollars(row["input"], f"{where}.input"), _dollars(row["output"], f"{where}.output")
        )
    taken = data.get("taken")
    return PriceTable(path=str(path), taken=None if taken is None else str(taken), models=models)
