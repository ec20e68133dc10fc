"""From a cluster's observations to a recipe directory. `recipe_from_observations` reads top to bottom:

select usable pairs -> infer the shape (schema) -> choose verifiers, drop gold outputs they reject
-> estimate purity -> K-floor -> split -> spec.json, pairs.jsonl, diagnostics.json, recipe.yaml
-> validate the directory and rename it into place
"""

from __future__ import annotations

import json
from collections import Counter
from datetime import datetime, timezone
from typing import Any

import numpy as np

from kolm_ray.artifact.spec import CONFIDENCE_FIELD, validate_spec
from kolm_ray.clustering.purity import (
    PurityReport,
    estimate_purity,
    k_floor_from_purity,
    near_duplicate_groups,
)
from kolm_ray.clustering.shape import (
    EXTRACT_SHARE,
    choose_verifiers,
    infer_shape,
    labels_for,
    strip_confidence,
)
from kolm_ray.errors import KolmError
from kolm_ray.recipe.files import (
    DIAGNOSTICS_JSON,
    ENCODER_BASES,
    MIN_PAIRS,
    PAIRS_JSONL,
    RECIPE_YAML,
    SPEC_JSON,
    TRAINING,
    render_recipe_yaml,
    write_recipe_dir,
)
from kolm_ray.recipe.split import split_pairs

K_MARGIN = 0.025  # k_floor = purity - margin: a model as good as the data passes; |floor - purity| <= 0.05
# (0.025, not 0.03: the estimate erred -0.022..+0.016 on the benchmark clusters, and int8 activation scales
# make it move ~0.006 with how embeddings are batched; -0.022 fell outside the window at 0.03)
DEFAULT_CAUSAL_BASE = "qwen2.5-coder-0.5b"  # the smallest causal base for outputs a tagger cannot produce
MAX_LISTED = 200  # dropped/flagged pairs listed one by one in diagnostics.json (all are counted)


def _field(obs: Any, key: str) -> Any:
    return obs.get(key) if isinstance(obs, dict) else getattr(obs, key, None)


def _short(text: str, n: int = 160) -> str:
    return text if len(text) <= n else text[: n - 1] + "…"


def recipe_from_observations(
    observations: list[Any],
    out_dir: str = "./recipe-out",
    *,
    verified_only: bool = False,
    base: str | None = None,
    description: str | None = None,
    embeddings: np.ndarray | None = None,
    namespace: str | None = None,
    cluster: int | None = None,
    seed: int = 0,
    store: Any = None,
) -> dict[str, Any]:
    """Write a recipe directory from one cluster's observations (Observation objects or dicts).

    Rejected observations (verified=false) are never used; unverified ones only without `verified_only`.
    `embeddings` (MiniLM, aligned with `observations`) skips re-embedding when the clustering already did.
    `store` (the Store or URL they were read from) goes into recipe.yaml's `lineage` as its scheme only, and is asked
    for the pairs' first/last created_at when the observations do not carry it (cluster members do not).
    Returns {"recipe_dir", "pairs_jsonl", "spec_json", "k_floor", "diagnostics"}; raises KolmError with
    nothing written when the observations cannot make a recipe.
    """
    observations = list(observations)
    where = f"namespace {namespace!r}" if namespace else "the observations"
    if not observations:
        raise KolmError(f"{where}: no observations (is the namespace empty or misspelled?)")

    # 1. usable pairs
    keep, dropped = _select(observations, verified_only)
    if len(keep) < MIN_PAIRS:
        reasons = ", ".join(f"{r}: {c}" for r, c in Counter(d["reason"] for d in dropped).most_common())
        raise KolmError(
            f"{where}: {len(keep)} usable pairs of {len(observations)} observations"
            + (f" (dropped {reasons})" if reasons else "")
            + f"; a recipe needs at least {MIN_PAIRS}"
        )
    inputs = [_field(observations[i], "input") for i in keep]
    outputs = [_field(observations[i], "output") for i in keep]
    # What the capture proxy may answer with the compiled model: this cluster's system prompt and format.
    from kolm_ray.observations.request_shape import shape_of_cluster

    request_shape = shape_of_cluster([_field(observations[i], "request") for i in keep], inputs)

    # 2. shape and schema; 3. verifiers, and gold outputs they reject
    shape = infer_shape(outputs, inputs)
    base, base_why = _choose_base(base, shape)
    stripped = None
    if base in ENCODER_BASES:
        stripped, outputs = strip_confidence(shape, outputs)
    specs, why = choose_verifiers(shape, model_confidence=stripped)
    spec = validate_spec(_spec_dict(shape, specs), SPEC_JSON)
    from kolm_ray.artifact.verifiers import build, hard_failures

    verifiers = build(spec)
    good = []
    for j, (inp, out) in enumerate(zip(inputs, outputs, strict=True)):
        reason = shape.conforms(out) or next(iter(hard_failures(verifiers, out, inp)), None)
        if reason:
            dropped.append({"id": _field(observations[keep[j]], "id"), "reason": reason})
        else:
            good.append(j)
    conform_share = len(good) / len(keep)
    if len(good) < MIN_PAIRS:
        raise KolmError(
            f"{where}: only {len(good)} of {len(keep)} outputs fit their common shape; "
            f"a recipe needs at least {MIN_PAIRS} (see the dropped reasons: {dropped[-1]['reason']})"
        )
    idx = [keep[j] for j in good]
    inputs = [inputs[j] for j in good]
    outputs = [outputs[j] for j in good]

    # 4. purity and K-floor
    emb = _embeddings(embeddings, idx, inputs, len(observations))
    labels = labels_for(shape, outputs)
    report = estimate_purity(emb, labels, inputs, outputs, conform_share=conform_share, seed=seed)
    k_floor = k_floor_from_purity(report.purity, K_MARGIN)
    specs, why = choose_verifiers(shape, report.purity, stripped)  # calibrated-brier's threshold needs purity
    spec = validate_spec(_spec_dict(shape, specs), SPEC_JSON)

    # 5. split: near-duplicates together, stratified by label, flagged pairs never in eval
    groups = near_duplicate_groups(emb, inputs)
    strata = (
        [json.dumps([vals[i] for vals in labels.values()], sort_keys=True) for i in range(len(outputs))]
        if labels
        else None
    )
    split = split_pairs(groups, strata, set(report.flagged), seed=seed)

    # 6. files
    kind = ("extractor" if not shape.closed else "encoder") if base in ENCODER_BASES else "causal-lm"
    description = description or _describe(shape, namespace)
    counts = Counter(split)
    pairs_text = "".join(
        json.dumps({"input": i, "output": o, "split": s}, ensure_ascii=False) + "\n"
        for i, o, s in zip(inputs, outputs, split, strict=True)
    )
    flagged = [
        {
            "id": _field(observations[idx[i]], "id"),
            "input": _short(inputs[i]),
            "output": outputs[i],
            "reason": r,
        }
        for i, r in sorted(report.flagged.items())
    ]
    floor_why = (
        f"purity {report.purity:.4f} - {K_MARGIN} margin, clamped to [0.5, 0.95] (within 0.05 of purity)"
    )
    warnings = reach_warnings(report, k_floor, counts["train"])
    diagnostics = {
        "namespace": namespace,
        "cluster": cluster,
        "created_at": datetime.now(timezone.utc).isoformat(),
        "cluster_size": len(observations),
        "pairs": len(inputs),
        "splits": {"train": counts["train"], "eval": counts["eval"]},
        "purity": {"estimate": report.purity, "method": report.method, **report.details},
        "k_floor": {"value": k_floor, "rule": floor_why},
        "warnings": warnings,
        "output_kind": shape.output_kind,
        "output_types": shape.type_shares,
        "confidence_field_removed": (
            f"{stripped!r}: the tagger answers its own confidence, judged by calibrated-brier"
            if stripped
            else None
        ),
        "fields": {n: f.to_json() for n, f in shape.fields.items()},
        "verifiers": [{"name": v.name, "why": why.get(v.name, "")} for v in spec.verifier],
        "base": {"name": base, "why": base_why},
        "dropped": {
            "count": len(dropped),
            "by_reason": dict(Counter(d["reason"].split(":")[0] for d in dropped).most_common()),
            "observations": dropped[:MAX_LISTED],
        },
        "flagged_inconsistent": {
            "count": len(flagged),
            "note": "kept out of the eval split (they stay in train)",
            "pairs": flagged[:MAX_LISTED],
        },
    }
    verifier_lines = [
        (v.name + (f"={v.threshold}" if v.name == "calibrated-brier" else ""), why.get(v.name, ""))
        for v in spec.verifier
    ]
    lineage = recipe_lineage([observations[i] for i in idx], namespace, store)
    yaml_text = render_recipe_yaml(
        str(out_dir), description, base, base_why, k_floor, floor_why, verifier_lines,
        TRAINING[kind], dict(counts), namespace, cluster, request_shape, lineage,
    )  # fmt: skip
    files = {
        SPEC_JSON: json.dumps(spec.to_json(), indent=2, ensure_ascii=False) + "\n",
        PAIRS_JSONL: pairs_text,
        DIAGNOSTICS_JSON: json.dumps(diagnostics, indent=2, ensure_ascii=False, default=str) + "\n",
        RECIPE_YAML: yaml_text,
    }
    out = write_recipe_dir(out_dir, files)
    return {
        "recipe_dir": str(out),
        "pairs_jsonl": str(out / PAIRS_JSONL),
        "spec_json": str(out / SPEC_JSON),
        "k_floor": k_floor,
        "diagnostics": str(out / DIAGNOSTICS_JSON),
    }


def _utc_iso(value: Any) -> str | None:
    if value is None:
        return None
    try:
        when = value if isinstance(value, datetime) else datetime.fromisoformat(str(value))
    except ValueError:
        return None
    if when.tzinfo is None:  # the store writes UTC
        when = when.replace(tzinfo=timezone.utc)
    return when.astimezone(timezone.utc).isoformat()


def recipe_lineage(used: list[Any], namespace: str | None, store: Any) -> dict[str, Any]:
    """What the pairs came from, for the artifact's manifest: namespace, the store's scheme (never its path,
    host or password), how many observations became pairs, and the first and last of their created_at."""
    from kolm_ray.observations.store.base import store_scheme

    times = [_utc_iso(_field(o, "created_at")) for o in used]
    if (None in times or not times) and store is not None:
        times = _created_at_in_store(store, [str(_field(o, "id")) for o in used])
    known = sorted(t for t in times if t is not None)
    scheme = store_scheme(store) if store is not None else None
    return {
        "namespace": namespace,
        "store": "postgresql" if scheme == "postgres" else scheme,
        "observations": len(used),
        "first_seen": known[0] if known else None,
        "last_seen": known[-1] if known else None,
    }


def _created_at_in_store(store: Any, ids: list[str]) -> list[str | None]:
    from kolm_ray.observations.store import open_store
    from kolm_ray.observations.store.base import portable_sql

    opened = open_store(store) if isinstance(store, str) else None
    s = opened or store
    out: list[str | None] = []
    try:
        for start in range(0, len(ids), 500):  # bounded IN lists
            chunk = ids[start : start + 500]
            q = portable_sql(
                s, f"SELECT created_at FROM observations WHERE id IN ({','.join('?' * len(chunk))})"
            )
            out += [_utc_iso(t) for (t,) in s._read().execute(q, tuple(chunk)).fetchall()]
    finally:
        if opened is not None:
            opened.close()
    return out


# On the recipe benchmark's 7 clusters the compiled K beat this probe by 0.01-0.11; the one recipe whose
# probe was more than PROBE_GAP below its floor (0.07) is the one whose compile missed it.
PROBE_GAP = 0.05


def reach_warnings(report: PurityReport, k_floor: float, train_pairs: int) -> list[str]:
    """The floor follows the data's cleanliness, not how learnable the task is from this many pairs. When a
    linear probe on the inputs' embeddings (confident learning's out-of-fold model) is far below the floor,
    say so before anyone spends a compile on it."""
    fields = (report.details.get("confident_learning") or {}).values()
    accs = [f["out_of_fold_accuracy"] for f in fields if "out_of_fold_accuracy" in f]
    if not accs:
        return []
    probe = float(np.prod(accs))
    if probe >= k_floor - PROBE_GAP:
        return []
    return [
        f"a linear probe on the inputs reaches {probe:.2f} out of fold, {k_floor - probe:.2f} below the "
        f"K-floor {k_floor:.2f}: with {train_pairs} train pairs the compiled model may miss the floor; "
        "more observations of this task raise what it can learn"
    ]


def _select(observations: list[Any], verified_only: bool) -> tuple[list[int], list[dict[str, Any]]]:
    keep, dropped = [], []
    for i, obs in enumerate(observations):
        verified, inp, out = _field(obs, "verified"), _field(obs, "input"), _field(obs, "output")
        reason = None
        if _field(obs, "provider") == "local":  # the live model's own answers never train its successor
            reason = "local answer (a promoted model's output)"
        elif verified is False:
            reason = "rejected (verified=false)"
        elif _field(obs, "omitted"):  # privacy, apart from the other rules: text not stored (X-Kolm-Omit)
            reason = "text omitted (X-Kolm-Omit)"
        elif verified is None and verified_only:
            reason = "unverified (--verified-only)"
        elif not isinstance(inp, str) or not inp.strip():
            reason = "empty input"
        elif out is None or (isinstance(out, str) and not out.strip()):
            reason = "empty output"
        if reason:
            dropped.append({"id": _field(obs, "id"), "reason": reason})
        else:
            keep.append(i)
    return keep, dropped


def _spec_dict(shape, specs) -> dict[str, Any]:
    return {
        "output_kind": shape.output_kind,
        "schema": shape.schema,
        "verifier": [s.model_dump(exclude_none=True) for s in specs],
        "tolerance": 1e-6,
    }


def _embeddings(given: np.ndarray | None, idx: list[int], inputs: list[str], n_obs: int) -> np.ndarray:
    if given is not None:
        given = np.asarray(given, dtype=np.float32)
        if given.shape[0] != n_obs:
            raise KolmError(f"embeddings has {given.shape[0]} rows for {n_obs} observations")
        return given[idx]
    from kolm_ray.clustering import embed_texts

    return embed_texts(inputs)


def _choose_base(base: str | None, shape) -> tuple[str, str]:
    if base:
        if base in ENCODER_BASES and not (shape.closed or shape.extractable):
            bad = shape.extraction()[2]
            raise KolmError(
                f"base {base!r} is an encoder: it needs outputs whose fields are all categorical, boolean, null "
                f"or grounded in the input; these outputs are {shape.output_kind} ({shape.top_type})"
                + (f" with fields {bad} neither" if bad else "")
                + f"; use {DEFAULT_CAUSAL_BASE}"
            )
        return base, "chosen with --base"
    if shape.closed:
        fields = ", ".join(shape.categorical)
        return (
            "minilm-l6",
            f"every output field is categorical ({fields}): an encoder tagger, one head per field",
        )
    span, cls, bad = shape.extraction()
    if shape.extractable:
        return "minilm-l6", extractor_why(shape, span, cls)
    why = "outputs need generation (free text, extracted spans or numbers): a causal LM with LoRA"
    if bad and shape.output_kind == "json":
        why = (
            f"fields {', '.join(bad[:5])} are neither categorical nor found verbatim in the input "
            f"(>= {EXTRACT_SHARE:.0%} of their values): a causal LM with LoRA generates them"
        )
    return DEFAULT_CAUSAL_BASE, why


def extractor_why(shape, span: list[str], cls: list[str]) -> str:
    """One line for diagnostics and recipe.yaml: why an encoder extractor, and what it predicts."""

    def grounded(name: str) -> str:
        parent, _, child = name.partition(".")
        f = shape.fields[parent].subfields[child] if child else shape.fields[parent]
        return f"{name} {f.grounded or 0.0:.0%}"

    listed = ", ".join(grounded(n) for n in span[:6]) + (
        f" and {len(span) - 6} more" if len(span) > 6 else ""
    )
    return (
        f"every output field is categorical, boolean, null or found verbatim in the input (>= {EXTRACT_SHARE:.0%} "
        f"of its values: {listed}): an encoder extractor, a span head for {len(span)} grounded field(s)"
        + (f" and a class head for {', '.join(cls)}" if cls else "")
    )


def _describe(shape, namespace: str | None) -> str:
    src = f" for namespace {namespace}" if namespace else ""
    if shape.output_kind == "text":
        return f"Answer in text{src}, as the observed frontier model did"
    fields = (
        ", ".join(f"{n} ({f.kind})" for n, f in shape.fields.items() if n != CONFIDENCE_FIELD)
        or shape.top_type
    )
    return f"Produce JSON{src}: {fields}"
