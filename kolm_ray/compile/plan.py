"""compile's first phase: flags and a recipe (or pairs) -> a checked Plan; nothing trains, nothing is written.

    plan = validate(args)     # the parsed `kolm compile` flags (compile_args.py); KolmError is exit 2

Every problem a user can fix (flags, files, pairs that break the spec, too few pairs to split, an encoder
base for open outputs) is reported here, before Ray starts; `kolm compile --dry-run` runs only this.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kolm_ray.artifact.spec import Spec, VerifierSpec, load_spec, validate_spec
from kolm_ray.artifact.verifiers import build, hard_failures, parse_verifier_list
from kolm_ray.compile.train.data import stratified_split
from kolm_ray.errors import KolmError, read_json_file
from kolm_ray.models.bases import Base, resolve_base
from kolm_ray.recipe.pairs import load_pairs

MIN_PAIRS = 20  # fewer labelled pairs than this cannot both train and measure a K-score
MIN_EVAL = 4
EVAL_FRACTION = 0.2  # held out (stratified by label) when neither --eval-pairs nor a split is given
NAMESPACE = "namespace"
DEEPSPEED_DIR = Path(__file__).resolve().parents[2] / "configs" / "deepspeed"
# Defaults per base kind; recipe.yaml `training:` and flags override them.
DEFAULTS: dict[str, dict[str, Any]] = {
    "encoder": {"epochs": 3, "lr": 1e-4, "head_lr": 2e-3, "batch_size": 32, "max_len": 64},
    "causal-lm": {"epochs": 3, "lr": 2e-4, "batch_size": 8, "max_len": 256, "lora_r": 16, "lora_alpha": 32},
    # An encoder base on outputs with grounded strings: spans need every token of the input (max_len 128), and
    # the tag head is fresh, so it learns faster than the body (head_lr).
    "extractor": {"epochs": 4, "lr": 1e-4, "head_lr": 3e-3, "batch_size": 32, "max_len": 128},
}
TRAINING_KEYS = {
    "epochs", "lr", "head_lr", "batch_size", "min_steps", "max_len", "freeze_layers", "freeze_embeddings", "negative_weight",
    "mix_weight", "calibration_negative_weight",
    "lora_r", "lora_alpha", "warmup", "weight_decay", "gradient_checkpointing", "seed", "num_workers",
    "max_failures",
}  # fmt: skip
COMPILE_ONLY_KEYS = ("num_workers", "max_failures", "calibration_negative_weight")  # not TrainConfig fields


@dataclass
class Plan:
    """Everything compile needs, validated before any training starts."""

    description: str
    base: Base
    spec: Spec
    k_floor: float
    output: Path
    train_rows: list[dict[str, Any]]
    eval_rows: list[dict[str, Any]]
    eval_negatives: list[str] = field(default_factory=list)
    labels: dict[str, list[Any]] = field(default_factory=dict)
    training: dict[str, Any] = field(default_factory=dict)
    num_workers: int | None = None
    max_failures: int = 1
    use_gpu: bool | None = None
    deepspeed: dict[str, Any] | None = None
    deepspeed_path: str | None = None
    bundle_base: bool = False
    # The recipe's request shape: which proxied calls the model may answer once promoted (None: plain calls).
    request_shape: dict[str, Any] | None = None
    # What the pairs came from (the manifest's signed `lineage`): namespace, store scheme, observations,
    # first/last seen, and the sha256 of the pairs file and of the recipe directory.
    lineage: dict[str, Any] | None = None
    # Encoder extractors: span and class fields (models.extract_layout); None for taggers and causal LMs.
    extract: dict[str, Any] | None = None

    @property
    def kind(self) -> str:
        """What trains: "encoder" (tagger), "extractor" (encoder with span heads) or "causal-lm"."""
        return "extractor" if self.extract is not None else self.base.kind


# ---- validate ----------------------------------------------------------------------------------------------


def _read_namespaces(path: str) -> list[str]:
    data = read_json_file(path, f"--namespaces {path}")
    names = list(data) if isinstance(data, dict) else data
    if not isinstance(names, list) or not names or not all(isinstance(n, str) and n for n in names):
        raise KolmError(
            f"--namespaces {path}: expected a non-empty JSON array of names (or an object name -> description)"
        )
    if len(set(names)) != len(names):
        raise KolmError(f"--namespaces {path}: duplicate names")
    return names


def _read_recipe(directory: Path) -> tuple[dict[str, Any], Spec, list[dict]]:
    try:
        from kolm_ray.recipe import validate_recipe_dir  # the recipe helper's own checks, when present
    except ImportError:
        validate_recipe_dir = None
    if not directory.is_dir():
        raise KolmError(f"--recipe {directory}: no such directory")
    if validate_recipe_dir is not None:
        validate_recipe_dir(directory)
    missing = [n for n in ("recipe.yaml", "spec.json", "pairs.jsonl") if not (directory / n).is_file()]
    if missing:
        raise KolmError(f"--recipe {directory}: missing {', '.join(missing)}")
    import yaml

    try:
        recipe = yaml.safe_load((directory / "recipe.yaml").read_text()) or {}
    except yaml.YAMLError as e:
        raise KolmError(f"{directory / 'recipe.yaml'}: not YAML ({e})") from None
    if not isinstance(recipe, dict):
        raise KolmError(f"{directory / 'recipe.yaml'}: expected a mapping")
    return recipe, load_spec(directory / "spec.json"), load_pairs(directory / "pairs.jsonl")


def _infer_spec(outputs: list[Any], verifiers: list[VerifierSpec], namespaces: list[str] | None) -> Spec:
    """A spec for the pairs form: output kind and JSON schema from the outputs, --namespaces as the enum."""
    from genson import SchemaBuilder

    kind = "text" if outputs and all(isinstance(o, str) for o in outputs) else "json"
    schema: dict[str, Any] = {}
    if kind == "json":
        builder = SchemaBuilder(schema_uri=False)
        for o in outputs:
            builder.add_object(o)
        schema = builder.to_schema()
        schema.pop("$schema", None)
        if namespaces is not None and schema.get("type") == "object":
            schema.setdefault("properties", {})[NAMESPACE] = {"enum": namespaces}
    for v in verifiers:
        if v.name == "closed-vocab" and namespaces is not None and v.fields is None:
            v.fields = {NAMESPACE: namespaces}
    data = {
        "output_kind": kind,
        "schema": schema,
        "verifier": [v.model_dump(exclude_none=True) for v in verifiers],
    }
    return validate_spec(data, "the spec built from --pairs/--verifier")


def _check_pairs(rows: list[dict], spec: Spec, source: str) -> None:
    """Every labelled pair's gold output must pass the spec's hard verifiers; name offending lines."""
    verifiers = [
        v for v in build(spec) if v.name not in ("low-confidence-fallback-broad", "tenant-authorized")
    ]
    problems = []
    for r in rows:
        reasons = hard_failures(verifiers, r["output"], r["input"])
        if reasons:
            problems.append(f"line {r['line']}: {reasons[0]}")
    if problems:
        more = f"; and {len(problems) - 5} more" if len(problems) > 5 else ""
        raise KolmError(f"{source}: pairs break the spec: " + "; ".join(problems[:5]) + more)


def _labels_for_encoder(spec: Spec, rows: list[dict], base: Base) -> dict[str, list[Any]]:
    vocab = spec.vocab()
    if spec.output_kind != "json" or spec.output_schema.get("type") != "object" or not vocab:
        raise KolmError(
            f"base {base.name!r} is an encoder classifier: it needs JSON-object outputs whose fields have a closed "
            "vocabulary (--namespaces or schema enums); use a causal-LM base (qwen2.5-coder-*) for other outputs"
        )
    open_fields = sorted({k for r in rows if isinstance(r["output"], dict) for k in r["output"]} - set(vocab))
    if open_fields:
        raise KolmError(
            f"base {base.name!r} is an encoder classifier but fields {open_fields} have no closed vocabulary; "
            "close them (schema enums) or use a causal-LM base"
        )
    return vocab


def _extraction_for_encoder(spec: Spec, rows: list[dict], base: Base) -> dict[str, Any] | None:
    """None when every field is closed (a tagger); else the extractor's layout, or KolmError (exit 2) when
    some field is neither closed nor grounded in the input."""
    from kolm_ray.models.extract_layout import extraction_layout

    vocab = spec.vocab()
    props = spec.output_schema.get("properties") if spec.output_kind == "json" else None
    keys = {k for r in rows if isinstance(r["output"], dict) for k in r["output"]}
    if vocab and isinstance(props, dict) and keys <= set(vocab) and set(props) <= set(vocab):
        return None
    if spec.get("byte-grounded") is None:
        return None  # no grounded field: the tagger's own message says what is missing
    try:
        return extraction_layout(spec, [r["output"] for r in rows])
    except KolmError as e:
        raise KolmError(f"base {base.name!r} is an encoder: {e}") from None


def _read_deepspeed(path: str) -> dict[str, Any]:
    p = Path(path)
    if not p.is_file() and (DEEPSPEED_DIR / path).is_file():
        p = DEEPSPEED_DIR / path
    if not p.is_file():
        raise KolmError(f"--deepspeed {path}: no such file (see configs/deepspeed/)")
    cfg = read_json_file(p, f"--deepspeed {path}")
    stage = cfg.get("zero_optimization", {}).get("stage")
    if stage not in (0, 1, 2, 3):
        raise KolmError(f"--deepspeed {path}: zero_optimization.stage must be 0-3")
    return cfg


def validate(args) -> Plan:
    """Read flags or a recipe, check everything, and return the plan. Raises KolmError (exit 2)."""
    recipe: dict[str, Any] = {}
    problems: list[str] = []
    if args.recipe:
        recipe, spec0, pairs = _read_recipe(Path(args.recipe))
        source = str(Path(args.recipe) / "pairs.jsonl")
        if args.pairs:  # an override like the others: these pairs instead of the recipe's
            pairs, source = load_pairs(args.pairs), args.pairs
    else:
        if not args.description:
            problems.append('a DESCRIPTION is required ("what the model does")')
        for flag, val in (
            ("--base", args.base),
            ("--pairs", args.pairs),
            ("--verifier", args.verifier),
            ("--k-floor", args.k_floor),
        ):
            if val is None:
                problems.append(f"{flag} is required (or use --recipe DIR)")
        if problems:
            raise KolmError("; ".join(problems))
        spec0, pairs, source = None, load_pairs(args.pairs), args.pairs

    description = args.description or recipe.get("description") or ""
    base = resolve_base(args.base or recipe.get("base") or "")
    k_floor = args.k_floor if args.k_floor is not None else recipe.get("k_floor")
    if not isinstance(k_floor, (int, float)) or not 0.0 <= float(k_floor) <= 1.0:
        raise KolmError(f"--k-floor must be a number in [0, 1], got {k_floor!r}")
    namespaces = _read_namespaces(args.namespaces) if args.namespaces else None
    training = dict(recipe.get("training") or {})
    unknown = set(training) - TRAINING_KEYS - {"use_gpu", "deepspeed"}
    if unknown:
        raise KolmError(
            f"recipe.yaml training: unknown keys {sorted(unknown)}; known: {sorted(TRAINING_KEYS)}"
        )

    extra_eval = load_pairs(args.eval_pairs) if args.eval_pairs else []
    if namespaces is not None:  # a bare string output with --namespaces means {"namespace": s}
        for r in pairs + extra_eval:
            if isinstance(r["output"], str):
                r["output"] = {NAMESPACE: r["output"]}
    labelled = [r for r in pairs if r["split"] != "negative"]

    if spec0 is None:
        spec = _infer_spec([r["output"] for r in labelled], parse_verifier_list(args.verifier), namespaces)
    else:
        data = spec0.to_json()
        if args.verifier:
            old = {v["name"]: v for v in data.get("verifier", [])}
            data["verifier"] = [
                {**old.get(v.name, {}), **v.model_dump(exclude_none=True)}
                for v in parse_verifier_list(args.verifier)
            ]
        if namespaces is not None:
            for v in data.get("verifier", []):
                if v["name"] == "closed-vocab":
                    v["fields"] = {**(v.get("fields") or {}), NAMESPACE: namespaces}
            props = data.get("schema", {}).get("properties")
            if isinstance(props, dict):
                props[NAMESPACE] = {"enum": namespaces}
        spec = validate_spec(data, f"{args.recipe}/spec.json")

    _check_pairs(labelled, spec, source)
    eval_labelled = [r for r in extra_eval if r["split"] != "negative"]
    if eval_labelled:
        _check_pairs(eval_labelled, spec, args.eval_pairs)
    if len(labelled) < MIN_PAIRS:
        raise KolmError(f"{source}: too few pairs: {len(labelled)} labelled (need at least {MIN_PAIRS})")

    # split: --eval-pairs, else the pairs' own split, else a stratified hold-out
    vocab = spec.vocab()
    strata = (lambda r: {f: r["output"].get(f) for f in vocab}) if vocab else (lambda r: r["output"])
    if eval_labelled:
        train = [r for r in labelled if r["split"] != "eval"]
        held = eval_labelled + [r for r in labelled if r["split"] == "eval"]
    elif any(r["split"] == "eval" for r in labelled):
        train = [r for r in labelled if r["split"] != "eval"]
        held = [r for r in labelled if r["split"] == "eval"]
    else:
        train, held = stratified_split(
            labelled, lambda r: strata(r) if isinstance(r["output"], dict) else r["output"], EVAL_FRACTION
        )
    if len(held) < MIN_EVAL or len(train) < MIN_EVAL:
        raise KolmError(
            f"{source}: too few pairs to split: {len(train)} train / {len(held)} eval (need {MIN_EVAL}+ each)"
        )
    negatives = [r for r in pairs if r["split"] == "negative"]
    train_rows = [{"input": r["input"], "output": r["output"]} for r in train]
    train_rows += [{"input": r["input"], "output": None, "negative": True} for r in negatives]

    labels, extract = {}, None
    if base.kind == "encoder":
        extract = _extraction_for_encoder(spec, labelled + eval_labelled, base)
        labels = _labels_for_encoder(spec, labelled, base) if extract is None else {}
    for key in ("epochs", "lr"):
        if getattr(args, key, None) is not None:
            training[key] = getattr(args, key)
    if training.get("epochs") is not None and int(training["epochs"]) < 1:
        raise KolmError("--epochs must be at least 1")
    if training.get("lr") is not None and not 0 < float(training["lr"]) < 1:
        raise KolmError("--lr must be in (0, 1)")
    num_workers = args.num_workers if args.num_workers is not None else training.pop("num_workers", None)
    if num_workers is not None and num_workers < 1:
        raise KolmError("--num-workers must be at least 1")
    ds_path = args.deepspeed or training.pop("deepspeed", None)
    use_gpu = True if args.use_gpu else training.pop("use_gpu", None)
    return Plan(
        description=description,
        base=base,
        spec=spec,
        k_floor=float(k_floor),
        output=Path(args.output),
        train_rows=train_rows,
        eval_rows=[{"input": r["input"], "output": r["output"]} for r in held],
        eval_negatives=[r["input"] for r in extra_eval if r["split"] == "negative"],
        labels=labels,
        training={
            **DEFAULTS["extractor" if extract is not None else base.kind],
            **_router_defaults(spec, base),
            **(base.training or {}),
            **training,
        },
        num_workers=num_workers,
        max_failures=int(training.pop("max_failures", 1)),
        use_gpu=use_gpu,
        deepspeed=_read_deepspeed(ds_path) if ds_path else None,
        deepspeed_path=ds_path,
        bundle_base=bool(getattr(args, "bundle_base", False)),
        request_shape=recipe.get("request_shape") if isinstance(recipe.get("request_shape"), dict) else None,
        extract=extract,
        lineage=lineage_of(args.recipe, recipe, source, len(pairs)),
    )


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


RECIPE_FILES = ("pairs.jsonl", "recipe.yaml", "spec.json")


def lineage_of(recipe_dir: str | None, recipe: dict[str, Any], source: str, n_pairs: int) -> dict[str, Any]:
    """The manifest's `lineage`. pairs_sha256: the pairs file's own sha256 (`sha256sum pairs.jsonl`);
    recipe_sha256: `sha256sum pairs.jsonl recipe.yaml spec.json | sha256sum` in the recipe directory.
    From plain --pairs (or --pairs over a recipe's): no namespace, store or times, observations = pairs."""
    recipe_sha = None
    if recipe_dir:
        listing = "".join(f"{_sha256(Path(recipe_dir) / n)}  {n}\n" for n in RECIPE_FILES)
        recipe_sha = hashlib.sha256(listing.encode()).hexdigest()
    own_pairs = bool(recipe_dir) and Path(source) == Path(recipe_dir) / "pairs.jsonl"
    written = recipe.get("lineage") if own_pairs and isinstance(recipe.get("lineage"), dict) else {}
    return {
        "namespace": written.get("namespace", recipe.get("namespace") if own_pairs else None),
        "store": written.get("store"),
        "observations": written.get("observations", n_pairs),
        "first_seen": written.get("first_seen"),
        "last_seen": written.get("last_seen"),
        "pairs_sha256": _sha256(Path(source)),
        "recipe_sha256": recipe_sha,
    }


def _router_defaults(spec: Spec, base: Base) -> dict[str, Any]:
    """A tagger that falls back to broad below a confidence must not be confident off its classes: train
    it on mixed-representation pseudo-outliers too (models.encoder_loss)."""
    if base.kind == "encoder" and spec.get("low-confidence-fallback-broad") is not None:
        return {"mix_weight": 0.25}
    return {}
