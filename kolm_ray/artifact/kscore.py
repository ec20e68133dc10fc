"""The K-score's equality, field by field (../shared/CONTRACT.md "K-score"): exact for enums, booleans,
integers and strings after whitespace normalisation, numbers within the spec's tolerance; `confidence` and
`fallback` are not compared. Compile's evaluation, the loop and the proxy's shadow checks all judge with it.
"""

from __future__ import annotations

import math
from typing import Any

from kolm_ray.artifact.spec import CONFIDENCE_FIELD, FALLBACK_FIELD


def _norm(s: str) -> str:
    return " ".join(s.split())


def values_equal(pred: Any, gold: Any, tol: float) -> bool:
    """Equality per the K-score rules (recursive for objects and arrays)."""
    if isinstance(gold, bool) or isinstance(pred, bool):
        return pred is gold if isinstance(pred, bool) and isinstance(gold, bool) else False
    if isinstance(gold, int) and isinstance(pred, int):
        return pred == gold
    if isinstance(gold, (int, float)) and isinstance(pred, (int, float)):
        return math.isclose(float(pred), float(gold), rel_tol=0.0, abs_tol=tol)
    if isinstance(gold, str) and isinstance(pred, str):
        return _norm(pred) == _norm(gold)
    if isinstance(gold, dict) and isinstance(pred, dict):
        keys = (set(gold) | set(pred)) - {CONFIDENCE_FIELD, FALLBACK_FIELD}
        return all(k in pred and k in gold and values_equal(pred[k], gold[k], tol) for k in keys)
    if isinstance(gold, list) and isinstance(pred, list):
        return len(gold) == len(pred) and all(
            values_equal(p, g, tol) for p, g in zip(pred, gold, strict=True)
        )
    return pred == gold


def unwrap(answer: dict[str, Any]) -> Any:
    """A predictor answer -> the output value it claims ({"output": v} wraps non-object outputs)."""
    keys = set(answer) - {CONFIDENCE_FIELD, FALLBACK_FIELD}
    if keys == {"output"}:
        return answer["output"]
    return {k: v for k, v in answer.items() if k not in (CONFIDENCE_FIELD, FALLBACK_FIELD)}


def field_correct(answer: dict[str, Any], gold: Any, tol: float) -> dict[str, bool]:
    """Per-field equality (a single "output" entry for non-object outputs)."""
    pred = unwrap(answer)
    if isinstance(gold, dict):
        return {
            k: isinstance(pred, dict) and k in pred and values_equal(pred[k], v, tol) for k, v in gold.items()
        }
    return {"output": values_equal(pred, gold, tol)}
