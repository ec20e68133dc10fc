"""Running a .kolm artifact offline: kolm_ray.run(path, text) for one input and `kolm run` for a text or a
JSON-lines file, both through the one inference path (predictors.open_predictor)."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

from kolm_ray.errors import KolmError
from kolm_ray.inference.predictors import Predictor, open_predictor

_CACHE: dict[tuple, Predictor] = {}


def run(path: str | Path, text: str) -> dict[str, Any]:
    """Run an artifact on one input (the predictor is cached per file version)."""
    st = Path(path).stat() if Path(path).exists() else None
    key = (str(Path(path).resolve()), st.st_mtime_ns if st else 0, st.st_size if st else 0)
    if key not in _CACHE:
        _CACHE.clear()
        _CACHE[key] = open_predictor(path)
    return _CACHE[key].predict([text])[0]


def _read_inputs(path: str) -> list[str]:
    p = Path(path)
    if not p.is_file():
        raise KolmError(f"{path}: no such file")
    inputs, problems = [], []
    for n, line in enumerate(p.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except ValueError as e:
            problems.append(f"line {n}: not JSON ({e})")
            continue
        if isinstance(row, str):
            inputs.append(row)
        elif isinstance(row, dict) and isinstance(row.get("input"), str):
            inputs.append(row["input"])
        else:
            problems.append(f'line {n}: expected {{"input": str}}')
    if problems:
        raise KolmError(f"{path}: " + "; ".join(problems[:5]))
    return inputs


def run_command(args) -> int:
    """kolm run X.kolm "text" | --input-file in.jsonl: print one JSON answer per input."""
    if (args.text is None) == (args.input_file is None):
        raise KolmError('give either TEXT or --input-file (JSON lines {"input": ...}), not both')
    inputs = [args.text] if args.text is not None else _read_inputs(args.input_file)
    with open_predictor(args.artifact) as p:
        for i in range(0, len(inputs), 256):
            for answer in p.predict(inputs[i : i + 256]):
                sys.stdout.write(json.dumps(answer, ensure_ascii=False) + "\n")
    sys.stdout.flush()
    return 0
