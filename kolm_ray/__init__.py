"""kolm-ray: turn frontier-API traffic into small models you own.

import kolm_ray
kolm_ray.recipe_from_observations(observations, out_dir="./recipe-out")
kolm_ray.run("namespace-tagger.kolm", "how do I restart the ingest worker?")
"""

from __future__ import annotations

from typing import Any

__version__ = "0.1.0"
__all__ = ["recipe_from_observations", "run", "__version__"]


def recipe_from_observations(observations, out_dir: str = "./recipe-out", **kwargs: Any) -> dict:
    """Write a recipe directory from observations; returns {recipe_dir, pairs_jsonl, spec_json, k_floor, diagnostics}."""
    from kolm_ray.recipe import recipe_from_observations as _impl

    return _impl(observations, out_dir=out_dir, **kwargs)


def run(path: str, input: str) -> dict:
    """Run a signed .kolm artifact on one input, offline; returns the model's JSON answer."""
    from kolm_ray.inference.offline import run as _impl

    return _impl(path, input)
