"""Recipe directories: write one atomically, read and validate one (what `kolm compile --recipe DIR
--dry-run` calls).

    DIR/recipe.yaml        description, base, k_floor, verifiers, training settings (commented)
    DIR/spec.json          {"output_kind", "schema", "verifier"}: validated against the published schema
    DIR/pairs.jsonl        {"input", "output", "split": "train"|"eval"}
    DIR/diagnostics.json   purity and how it was estimated, dropped and flagged pairs, fields, verifiers
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import yaml

from kolm_ray.artifact.spec import Spec, validate_spec
from kolm_ray.clustering.purity import normalize_text
from kolm_ray.errors import KolmError

RECIPE_YAML, SPEC_JSON, PAIRS_JSONL, DIAGNOSTICS_JSON = (
    "recipe.yaml",
    "spec.json",
    "pairs.jsonl",
    "diagnostics.json",
)
MIN_PAIRS = 200  # fewer pairs cannot both train a model and measure it on >= 100 eval pairs
K_FLOOR_RANGE = (0.5, 0.95)
ENCODER_BASES = ("minilm-l6", "tiny-encoder")  # classifiers: need closed-vocab outputs
SETTINGS_KEYS = {
    "description", "base", "k_floor", "verifiers", "training", "files", "namespace", "cluster", "request_shape",
    "lineage",
}  # fmt: skip
LINEAGE_KEYS = ("namespace", "store", "observations", "first_seen", "last_seen")  # compile copies them

# Training settings that may be 0 (off); every other one must be positive.
ZERO_OK = frozenset(
    {"min_steps", "freeze_layers", "warmup", "weight_decay", "mix_weight", "negative_weight", "seed"}
)

# Training settings per base kind; names are compile's TrainConfig fields.
TRAINING = {
    "encoder": [
        ("epochs", 4, "passes over the train split; a tagger head converges in a few"),
        ("batch_size", 32, "pairs per worker per step, at most (a small split uses fewer: min_steps)"),
        ("lr", 1.0e-4, "peak learning rate of the encoder body (linear warm-up, then decay)"),
        ("head_lr", 2.0e-3, "learning rate of the fresh classification heads"),
        ("max_len", 64, "tokens per input; longer inputs are truncated"),
        ("num_workers", 1, "Ray Train workers (kolm compile --num-workers overrides)"),
    ],
    "extractor": [
        ("epochs", 6, "passes over the train split (chosen on SNIPS validation rows: benchmarks/results/extract_epochs.json)"),
        ("batch_size", 32, "pairs per worker per step, at most (a small split uses fewer: min_steps)"),
        ("lr", 1.0e-4, "peak learning rate of the encoder body (linear warm-up, then decay)"),
        ("head_lr", 3.0e-3, "learning rate of the fresh span (BIO tag) and class heads"),
        ("max_len", 128, "tokens per input; a span past this is lost, so longer than a tagger's"),
        ("num_workers", 1, "Ray Train workers (kolm compile --num-workers overrides)"),
    ],
    "causal-lm": [
        ("epochs", 2, "passes over the train split; LoRA overfits quickly"),
        ("batch_size", 8, "pairs per worker per step"),
        ("lr", 2.0e-4, "peak learning rate of the LoRA adapter"),
        ("lora_r", 16, "LoRA rank: higher fits more, costs memory"),
        ("lora_alpha", 32, "LoRA scaling (alpha / r multiplies the update)"),
        ("max_len", 256, "tokens per prompt + answer; longer ones are truncated"),
        ("num_workers", 1, "Ray Train workers (kolm compile --num-workers overrides)"),
    ],
}


def _comment(text: str) -> str:
    return " ".join(str(text).split())


def render_recipe_yaml(
    recipe_dir: str,
    description: str,
    base: str,
    base_why: str,
    k_floor: float,
    k_floor_why: str,
    verifiers: list[tuple[str, str]],
    training: list[tuple[str, Any, str]],
    counts: dict[str, int],
    namespace: str | None,
    cluster: int | None,
    request_shape: dict[str, Any] | None = None,
    lineage: dict[str, Any] | None = None,
) -> str:
    """recipe.yaml with a comment on every knob (YAML emitters drop comments, so it is written by hand)."""
    where = (
        f" for namespace {namespace!r}" + (f", cluster {cluster}" if cluster is not None else "")
        if namespace
        else ""
    )
    lines = [
        f"# Recipe{where}, written by `kolm recipe`.",
        f"#   kolm compile --recipe {recipe_dir} --output model.kolm            # train, gate on k_floor, sign",
        f"#   kolm compile --recipe {recipe_dir} --output model.kolm --dry-run  # validate only",
        f"description: {json.dumps(description)}  # what the model does; stored in the artifact manifest",
        f"base: {json.dumps(base)}  # {_comment(base_why)}",
        f"k_floor: {k_floor}  # {_comment(k_floor_why)}",
    ]
    if verifiers:
        lines.append("verifiers:  # spec.json holds the same verifiers with their parameters")
        lines += [f"  - {json.dumps(v)}  # {_comment(why)}" for v, why in verifiers]
    else:
        lines.append("verifiers: []  # text outputs: compared after whitespace normalisation")
    if namespace is not None:
        lines.append(f"namespace: {json.dumps(namespace)}  # where the observations came from")
    if cluster is not None:
        lines.append(f"cluster: {cluster}  # `kolm cluster` id within the namespace")
    if request_shape is not None:
        lines.append(
            f"request_shape: {json.dumps(request_shape, ensure_ascii=False)}"
            "  # the calls the capture proxy may answer with this model once promoted (kolm models promote)"
        )
    if lineage is not None:
        lines.append(
            f"lineage: {json.dumps(lineage, ensure_ascii=False)}"
            "  # the observations the pairs came from; compile signs it into the manifest"
        )
    lines += [
        "files:",
        f"  pairs: {PAIRS_JSONL}  # {counts['train']} train + {counts['eval']} eval pairs, no input in both",
        f"  spec: {SPEC_JSON}  # output_kind, schema, verifiers (`kolm spec-schema` prints its JSON Schema)",
        f"  diagnostics: {DIAGNOSTICS_JSON}  # purity estimate, dropped and flagged pairs, field statistics",
        "training:  # compile's TrainConfig fields; flags on `kolm compile` override them",
    ]
    lines += [f"  {k}: {json.dumps(v)}  # {_comment(why)}" for k, v, why in training]
    return "\n".join(lines) + "\n"


def write_recipe_dir(out_dir: str | Path, files: dict[str, str]) -> Path:
    """Write every file into a temporary sibling directory, validate it, then rename it into place.

    An existing recipe directory holding only recipe files is replaced whole; a directory holding anything
    else (another recipe's files are fine) is refused, so a mistyped --out never deletes a user's files.
    """
    out = Path(out_dir).expanduser().resolve()
    if out.exists():
        if not out.is_dir():
            raise KolmError(f"{out} exists and is not a directory; choose another --out")
        foreign = sorted(p.name for p in out.iterdir() if p.name not in files or not p.is_file())
        if foreign:
            shown = ", ".join(foreign[:5]) + (", ..." if len(foreign) > 5 else "")
            raise KolmError(f"{out} holds files a recipe does not write ({shown}); choose another --out")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o777 & ~umask)  # mkdtemp makes it 0700; a recipe directory is an ordinary one
    try:
        for name, text in files.items():
            with open(tmp / name, "w", encoding="utf-8") as f:
                f.write(text)
                f.flush()
                os.fsync(f.fileno())
        validate_recipe_dir(tmp)  # what compile --dry-run checks: never leave a recipe it would refuse
        old = None
        if out.exists():
            old = out.parent / f".{out.name}.old-{os.getpid()}"
            os.rename(out, old)
        os.rename(tmp, out)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def _known_base(base: str) -> str | None:
    try:
        from kolm_ray.models.bases import known_names

        known = [n for n in known_names() if not n.startswith("<")]
    except ImportError:  # compile's registry not installed: the names the contract lists
        known = [f"qwen2.5-coder-{s}" for s in ("0.5b", "1.5b", "3b", "7b")] + ["minilm-l6"]
    if base in known or Path(base).expanduser().is_dir():
        return None
    return f"base {base!r} is not a supported base; known: {', '.join(known)}, or a local model directory"


def validate_recipe_dir(recipe_dir: str | Path) -> tuple[Spec, dict[str, Any], list[dict[str, Any]]]:
    """Read and check a recipe directory; raise one KolmError listing every problem.

    Returns (spec, settings from recipe.yaml plus "dir", pairs [{"input", "output", "split"}]).
    """
    d = Path(recipe_dir).expanduser()
    if not d.is_dir():
        raise KolmError(f"recipe directory {d} does not exist")
    problems: list[str] = []
    settings: dict[str, Any] = {}
    try:
        loaded = yaml.safe_load((d / RECIPE_YAML).read_text(encoding="utf-8"))
        if not isinstance(loaded, dict):
            problems.append(f"{RECIPE_YAML}: expected a mapping, got {type(loaded).__name__}")
        else:
            settings = loaded
    except FileNotFoundError:
        problems.append(f"{RECIPE_YAML}: missing")
    except yaml.YAMLError as e:
        problems.append(f"{RECIPE_YAML}: not YAML ({_comment(e)})")
    if settings:
        problems += _check_settings(settings)
    spec: Spec | None = None
    try:
        spec = validate_spec(json.loads((d / SPEC_JSON).read_text(encoding="utf-8")), SPEC_JSON)
    except FileNotFoundError:
        problems.append(f"{SPEC_JSON}: missing")
    except json.JSONDecodeError as e:
        problems.append(f"{SPEC_JSON}: not JSON ({e.msg} at line {e.lineno})")
    except KolmError as e:
        problems.append(str(e))
    if spec is not None and isinstance(settings.get("verifiers"), list):
        written = {str(v).partition("=")[0] for v in settings["verifiers"]}
        in_spec = {v.name for v in spec.verifier}
        if written != in_spec:
            problems.append(
                f"{RECIPE_YAML} verifiers {sorted(written)} differ from {SPEC_JSON} verifiers {sorted(in_spec)}"
            )
    pairs = _read_pairs(d / PAIRS_JSONL, spec, problems)
    extractor = (
        spec is not None and settings.get("base") in ENCODER_BASES and spec.get("byte-grounded") is not None
    )
    if extractor:  # an encoder with span heads: every field closed or grounded (models.extract_layout)
        from kolm_ray.models.extract_layout import extraction_layout

        try:
            extraction_layout(spec, [p["output"] for p in pairs])
        except KolmError as e:
            problems.append(f"base {settings['base']!r}: {e}")
    if (
        not extractor
        and spec is not None
        and isinstance(settings.get("base"), str)
        and settings["base"] in ENCODER_BASES
    ):
        if spec.output_kind != "json" or not spec.vocab():
            problems.append(
                f"base {settings['base']!r} is a classifier and needs closed-vocab JSON outputs; "
                "use a qwen2.5-coder base for this spec"
            )
    if not extractor and spec is not None and settings.get("base") in ENCODER_BASES and spec.vocab():
        open_fields = sorted(
            {k for p in pairs if isinstance(p["output"], dict) for k in p["output"]} - set(spec.vocab())
        )
        if open_fields:
            problems.append(
                f"base {settings['base']!r} is a classifier but output fields {open_fields} have no closed vocabulary"
            )
    if problems:
        raise KolmError(f"recipe {d} is not valid: " + "; ".join(problems))
    settings = {**settings, "dir": str(d.resolve())}
    return spec, settings, pairs


def _check_settings(s: dict[str, Any]) -> list[str]:
    problems = []
    unknown = set(s) - SETTINGS_KEYS
    if unknown:
        problems.append(f"{RECIPE_YAML}: unknown keys {sorted(unknown)}; known: {sorted(SETTINGS_KEYS)}")
    if not isinstance(s.get("description"), str) or not s["description"].strip():
        problems.append(f"{RECIPE_YAML}: description must be a non-empty string")
    base = s.get("base")
    if not isinstance(base, str) or not base:
        problems.append(f"{RECIPE_YAML}: base must be a base name")
    elif (why := _known_base(base)) is not None:
        problems.append(f"{RECIPE_YAML}: {why}")
    lineage = s.get("lineage")
    if lineage is not None and (not isinstance(lineage, dict) or set(lineage) - set(LINEAGE_KEYS)):
        problems.append(f"{RECIPE_YAML}: lineage must be a mapping of {', '.join(LINEAGE_KEYS)}")
    elif lineage is not None and not (
        isinstance(lineage.get("observations"), int) and lineage["observations"] >= 0
    ):
        problems.append(
            f"{RECIPE_YAML}: lineage.observations must be a count, got {lineage.get('observations')!r}"
        )
    k = s.get("k_floor")
    lo, hi = K_FLOOR_RANGE
    if not isinstance(k, (int, float)) or isinstance(k, bool) or not lo <= k <= hi:
        problems.append(f"{RECIPE_YAML}: k_floor must be a number in [{lo}, {hi}], got {k!r}")
    v = s.get("verifiers")
    if not isinstance(v, list) or not all(isinstance(x, str) for x in v):
        problems.append(
            f"{RECIPE_YAML}: verifiers must be a list of names like closed-vocab or calibrated-brier=0.1"
        )
    elif v:  # a text recipe may have none
        from kolm_ray.artifact.verifiers import parse_verifier_list

        try:
            parse_verifier_list(",".join(v))
        except KolmError as e:
            problems.append(f"{RECIPE_YAML}: {e}")
    t = s.get("training", {})
    if not isinstance(t, dict):
        problems.append(f"{RECIPE_YAML}: training must be a mapping")
    else:
        for key, val in t.items():
            low = "a number >= 0" if key in ZERO_OK else "a positive number"
            if (
                not isinstance(val, (int, float))
                or isinstance(val, bool)
                or val < 0
                or (val == 0 and key not in ZERO_OK)
            ):
                problems.append(f"{RECIPE_YAML}: training.{key} must be {low}, got {val!r}")
    return problems


def _read_pairs(path: Path, spec: Spec | None, problems: list[str]) -> list[dict[str, Any]]:
    """Pairs as compile reads them (pairs.load_pairs), held to a recipe's stricter rules: every row in
    train or eval, and every gold output passing the spec's hard verifiers."""
    from kolm_ray.artifact.verifiers import build, hard_failures
    from kolm_ray.recipe.pairs import load_pairs

    if not path.is_file():
        problems.append(f"{PAIRS_JSONL}: missing")
        return []
    try:
        rows = load_pairs(path)
    except KolmError as e:
        problems.append(f"{PAIRS_JSONL}: {str(e).removeprefix(f'{path}: ')}")
        return []
    verifiers = build(spec) if spec is not None else []
    pairs, bad = [], []
    for row in rows:
        n = row["line"]
        if row["split"] not in ("train", "eval"):
            bad.append(f"line {n}: needs 'split' 'train' or 'eval' (a recipe holds no negative rows)")
            continue
        if spec is not None:
            if spec.output_kind == "text" and not isinstance(row["output"], str):
                bad.append(f"line {n}: output_kind is text but the output is not a string")
                continue
            reasons = hard_failures(verifiers, row["output"], row["input"])
            if reasons:
                bad.append(f"line {n}: gold output fails {reasons[0]}")
                continue
        pairs.append({"input": row["input"], "output": row["output"], "split": row["split"]})
    if bad:
        more = f" (and {len(bad) - 5} more)" if len(bad) > 5 else ""
        problems.append(f"{PAIRS_JSONL}: " + "; ".join(bad[:5]) + more)
    if pairs or not bad:
        n_eval = sum(p["split"] == "eval" for p in pairs)
        if len(pairs) < MIN_PAIRS:
            problems.append(f"{PAIRS_JSONL}: {len(pairs)} pairs; a recipe needs at least {MIN_PAIRS}")
        if n_eval == 0 or n_eval == len(pairs):
            problems.append(
                f"{PAIRS_JSONL}: needs both train and eval pairs (eval: {n_eval} of {len(pairs)})"
            )
        train_inputs = {normalize_text(p["input"]) for p in pairs if p["split"] == "train"}
        leaked = sum(1 for p in pairs if p["split"] == "eval" and normalize_text(p["input"]) in train_inputs)
        if leaked:
            problems.append(f"{PAIRS_JSONL}: {leaked} eval inputs also occur in train")
    return pairs
