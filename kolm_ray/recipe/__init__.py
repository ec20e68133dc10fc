"""Recipes: from a cluster of observations to pairs, a spec (schema + verifiers) and a K-floor.

    kolm recipe --namespace support --out ./recipe-out            # the largest cluster
    kolm recipe --namespace support --cluster 2 --verified-only

    from kolm_ray.recipe import recipe_from_observations, validate_recipe_dir
    info = recipe_from_observations(observations, out_dir="./recipe-out")
    spec, settings, pairs = validate_recipe_dir(info["recipe_dir"])   # what compile --dry-run runs

Modules: split.py (grouped, stratified train/eval), files.py (write atomically, validate), synth.py (the
phases in order). The output's shape (genson schema, verifier choice: kolm_ray/clustering/shape.py) and purity
(confident learning, near-duplicates, K-floor: kolm_ray/clustering/purity.py) sit below this package, since
clustering's summary uses them too.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

from kolm_ray.recipe.files import validate_recipe_dir
from kolm_ray.recipe.synth import recipe_from_observations

__all__ = ["recipe_from_observations", "validate_recipe_dir", "recipe_command"]


def _count_left_out(url: str, namespace: str, diagnostics: str, include_untrusted: bool) -> None:
    """Add to diagnostics.json how many of the namespace's rows were not trained on, and why (untrusted:
    a --no-train key's, an open proxy's); `--include-untrusted` counts them but keeps them in."""
    from kolm_ray.observations.keys import untrusted_counts
    from kolm_ray.observations.store import open_store

    with open_store(url) as store:
        counts = untrusted_counts(store, namespace)
    path = Path(diagnostics)
    doc = json.loads(path.read_text())
    doc["untrusted"] = {"left_out": not include_untrusted, "rows": sum(counts.values()), "by_reason": counts}
    if counts and not include_untrusted:
        doc.setdefault("warnings", []).append(
            f"{sum(counts.values())} untrusted observations left out ("
            + ", ".join(f"{n} {why}" for why, n in sorted(counts.items()))
            + "); --include-untrusted trains on them"
        )
    tmp = path.with_suffix(".json.partial")
    tmp.write_text(json.dumps(doc, indent=2, ensure_ascii=False))
    tmp.replace(path)


def _what(url: str, namespace: str, include_untrusted: bool) -> str:
    """What an empty namespace lacks, for the error: observations, or trusted ones (and how many are not)."""
    from kolm_ray.observations.keys import untrusted_counts
    from kolm_ray.observations.store import open_store
    from kolm_ray.settings import redact_url

    with open_store(url) as store:
        left = 0 if include_untrusted else sum(untrusted_counts(store, namespace).values())
    if left:
        return (
            f"trusted observations in {redact_url(url)} ({left} untrusted left out; see --include-untrusted)"
        )
    return f"observations in {redact_url(url)}"


def recipe_command(args: Any) -> int:
    """kolm recipe: cluster the namespace (Ray Data), then write a recipe for one cluster; print its paths."""
    from kolm_ray.clustering import cluster_members, cluster_namespace
    from kolm_ray.errors import KolmError
    from kolm_ray.observations.dataset import check_readable
    from kolm_ray.placement import ray_session
    from kolm_ray.settings import store_url

    url = store_url(args.store)
    include = getattr(args, "include_untrusted", False)
    check_readable(url, [args.namespace], include)  # an empty or unknown namespace: exit 2 before Ray starts
    with ray_session(worker_logs=False):
        result = cluster_namespace(
            url, args.namespace, num_workers=args.num_workers, summarize=False, include_untrusted=include
        )
        if not result.clusters:
            raise KolmError(f"namespace {args.namespace!r} has no {_what(url, args.namespace, include)}")
        ids = [c["id"] for c in result.clusters]
        cluster = args.cluster if args.cluster is not None else result.clusters[0]["id"]  # largest first
        if cluster not in ids:
            raise KolmError(
                f"cluster {cluster} does not exist in namespace {args.namespace!r}; clusters: {ids}"
            )
        observations, embeddings = cluster_members(result, cluster)
    info = recipe_from_observations(
        observations,
        out_dir=args.out,
        verified_only=args.verified_only,
        base=args.base,
        embeddings=embeddings,
        namespace=args.namespace,
        cluster=cluster,
        store=url,
    )
    _count_left_out(url, args.namespace, info["diagnostics"], include)
    for warning in json.loads(Path(info["diagnostics"]).read_text()).get("warnings", []):
        print(f"warning: {warning}", file=sys.stderr)
    print(json.dumps(info, indent=2))
    return 0
