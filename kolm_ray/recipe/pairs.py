"""Pairs files: the one reader that recipe, compile and training share (every malformed line named).

A pairs line is `{"input": str, "output": value[, "split": "train"|"eval"|"negative"]}`. `negative`
marks an input that belongs to none of the closed vocabulary ("none of these"): an encoder tagger is
trained to spread its confidence evenly over the values for it, and it is never scored in the K-score.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from kolm_ray.errors import KolmError

SPLITS = ("train", "eval", "negative")
MAX_REPORTED = 5  # problems listed in one error message before "and N more"


def _summarise(problems: list[str], source: str) -> str:
    head = "; ".join(problems[:MAX_REPORTED])
    more = f"; and {len(problems) - MAX_REPORTED} more" if len(problems) > MAX_REPORTED else ""
    return f"{source}: {head}{more}"


def load_pairs(path: str | Path) -> list[dict[str, Any]]:
    """Read a pairs JSON-lines file; every malformed line is named by its number in one KolmError."""
    path = Path(path)
    if not path.is_file():
        raise KolmError(f"{path}: no such file")
    pairs, problems = [], []
    with path.open(encoding="utf-8") as f:
        for n, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                problems.append(f"line {n}: not JSON ({e.msg})")
                continue
            if not isinstance(row, dict):
                problems.append(f"line {n}: expected an object with 'input' and 'output'")
                continue
            if not isinstance(row.get("input"), str) or not row["input"].strip():
                problems.append(f"line {n}: 'input' must be a non-empty string")
                continue
            split = row.get("split")
            if split is not None and split not in SPLITS:
                problems.append(f"line {n}: split {split!r} is not one of {', '.join(SPLITS)}")
                continue
            if "output" not in row and split != "negative":
                problems.append(f"line {n}: missing 'output'")
                continue
            pairs.append({"input": row["input"], "output": row.get("output"), "split": split, "line": n})
    if problems:
        raise KolmError(_summarise(problems, str(path)))
    return pairs
