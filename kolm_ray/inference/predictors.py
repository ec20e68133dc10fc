"""The one inference path: artifact -> Predictor.predict(inputs, allowed=None). `kolm run`, the K-score
evaluation in compile and the Serve router all call this, so the number the gate checks is the number
users get.

    p = open_predictor("namespace-tagger.kolm")          # verifies signature + hashes first
    p.predict(["how do I restart the ingest worker?"], allowed=["runbooks", "incidents"])
    # [{"namespace": "runbooks", "confidence": 0.94, "fallback": "narrow"}]

A tagger's answer holds its fields, "confidence" (the product of each field's top probability after
temperature scaling, and for a router trained with "none of these" inputs after its distance-based "none"
logit, models.outlier_probs; for causal LMs the softmax over the allowed answers' log-likelihoods) and, when the
spec has low-confidence-fallback-broad, "fallback": "broad" below the threshold, else "narrow".
Non-object outputs come back as {"output": value, "confidence": c}.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from kolm_ray.errors import ArtifactError, KolmError
from kolm_ray.inference.base import CALIBRATION_FILE, Predictor, _threads  # noqa: F401 (re-exported)

TAGGER_FILE = "tagger.json"  # encoder taggers: {"labels": {field: [values]}, "max_len": n}
JOINT = "__joint__"  # causal LMs calibrate one softmax over joint closed-vocab answers
OUTPUT_KEY = "output"  # non-object outputs are wrapped as {"output": value}
ALLOWED_FIELD = "namespace"  # the field `allowed` restricts
MAX_SCORERS = 16  # causal LMs on a GPU: candidate sets (allowed subsets) with captured graphs kept at once
REQUIRED_FILES = {  # what each kind loads (besides tokenizer files, which transformers checks itself)
    "encoder-tagger": ("model.safetensors", TAGGER_FILE, "config.json"),
    "encoder-extractor": ("model.safetensors", "extractor.json", "config.json"),
    "causal-lm-lora": ("adapter_config.json", "adapter_model.safetensors"),
    "causal-lm": ("config.json",),
}


class EncoderPredictor(Predictor):
    """Encoder tagger: tokenizer + EncoderTagger (per-field logits) + per-field temperature."""

    kind = "encoder-tagger"

    def __init__(self, directory: Path, manifest: dict[str, Any], device: str | None = None):
        super().__init__(directory, manifest, device)
        from safetensors.torch import load_file
        from transformers import AutoConfig, AutoModel, AutoTokenizer

        from kolm_ray.models.modeling import EncoderTagger

        meta = json.loads((self.dir / TAGGER_FILE).read_text())
        self.labels: dict[str, list[Any]] = meta["labels"]
        self.max_len: int = meta.get("max_len", 64)
        self.tokenizer = AutoTokenizer.from_pretrained(str(self.dir))
        encoder = AutoModel.from_config(AutoConfig.from_pretrained(str(self.dir)))
        self.model = EncoderTagger(encoder, self.labels)
        state = load_file(str(self.dir / "model.safetensors"))
        if any(k.startswith("gaussians.") for k in state):
            self.model.add_gaussians()
        self.model.load_state_dict(state, strict=True)
        self.model.to(self.device).eval()
        # The static-embedding student (kolm_ray.inference.student), when compile found one that holds the bar:
        # "cascade" answers from it when it is sure and escalates the rest to this encoder; "teacher" and
        # "student" (one stage alone) are for compile's own scoring.
        from kolm_ray.inference.student import META_FILE, STUDENT_DIR, Student

        self.student: Student | None = None
        if (self.dir / STUDENT_DIR / META_FILE).is_file():
            self.student = Student.load(self.dir / STUDENT_DIR)
        self.cascade = "cascade"

    @torch.no_grad()
    def calibration_scores(self, inputs, masks=None, batch_size: int = 128):
        logits: dict[str, list[torch.Tensor]] = {f: [] for f in self.labels}
        dists: dict[str, list[torch.Tensor]] = {}
        for i in range(0, len(inputs), batch_size):
            enc = self.tokenizer(
                list(inputs[i : i + batch_size]),
                padding=True,
                truncation=True,
                max_length=self.max_len,
                return_tensors="pt",
            ).to(self.device)
            lg, d = self.model.scores(enc["input_ids"], enc["attention_mask"], masks=masks)
            for f in self.labels:
                logits[f].append(lg[f].float().cpu())
                if f in d:
                    dists.setdefault(f, []).append(d[f].float().cpu())
        empty = {f: torch.empty(0, len(self.labels[f])) for f in self.labels}
        return (
            {f: torch.cat(v) if v else empty[f] for f, v in logits.items()},
            {f: torch.cat(v) for f, v in dists.items()},
        )

    def calibration_logits(self, inputs, masks=None, batch_size: int = 128):
        return self.calibration_scores(inputs, masks, batch_size)[0]

    def calibration_targets(self, outputs):
        idx = {f: {json.dumps(v): i for i, v in enumerate(vals)} for f, vals in self.labels.items()}
        targets = {f: [] for f in self.labels}
        for o in outputs:
            o = o if isinstance(o, dict) else {}
            for f in self.labels:
                targets[f].append(idx[f].get(json.dumps(o.get(f)), -1))
        return {f: torch.tensor(v, dtype=torch.long) for f, v in targets.items()}

    def allowed_masks(self, allowed: Sequence[str] | None) -> dict[str, torch.Tensor] | None:
        if allowed is None or ALLOWED_FIELD not in self.labels:
            return None
        ok = set(allowed)
        return {ALLOWED_FIELD: torch.tensor([v in ok for v in self.labels[ALLOWED_FIELD]], dtype=torch.bool)}

    def predict(self, inputs, allowed=None):
        inputs = list(inputs)
        if not inputs:
            return []
        masks = self.allowed_masks(allowed)
        if masks is not None and not masks[ALLOWED_FIELD].any():
            # nothing this caller may see: no narrow answer is possible
            return [self._finish({f: None for f in self.labels}, 0.0) for _ in inputs]
        if self.student is None or self.cascade == "teacher":
            return self._teacher_answers(self.calibration_scores(inputs, masks=masks))
        # The student first, under the same mask; the inputs it is not sure of go to the encoder.
        mask = None if masks is None else masks[ALLOWED_FIELD].numpy()
        best, conf = self.student.answer(inputs, mask)
        answers: list[dict[str, Any] | None] = [
            self._finish({self.student.field: self.student.labels[int(b)]}, float(c))
            if self.cascade == "student" or c >= self.student.threshold
            else None
            for b, c in zip(best, conf, strict=True)
        ]
        unsure = [i for i, a in enumerate(answers) if a is None]
        if unsure:
            escalated = self._teacher_answers(
                self.calibration_scores([inputs[i] for i in unsure], masks=masks)
            )
            for i, a in zip(unsure, escalated, strict=True):
                answers[i] = a
        return answers  # type: ignore[return-value]

    def answers_from_scores(self, scores):
        if self.student is not None and self.cascade != "teacher":
            return None  # the answers are the cascade's, not these scores' alone: evaluate calls predict()
        return self._teacher_answers(scores)

    def _teacher_answers(self, scores):
        from kolm_ray.models.modeling import outlier_probs

        logits, dists = scores
        probs = {
            f: outlier_probs(lg, self.temperature.get(f, 1.0), dists.get(f), self.outlier.get(f))
            for f, lg in logits.items()
        }
        answers = []
        for i in range(next((len(lg) for lg in logits.values()), 0)):
            fields, conf = {}, 1.0
            for f, p in probs.items():
                j = int(logits[f][i].argmax())  # the top logit: far off, every probability can be 0.0
                fields[f] = self.labels[f][j]
                conf *= float(p[i, j])
            answers.append(self._finish(fields, conf))
        return answers


class CausalPredictor(Predictor):
    """Causal LM (LoRA adapter on a pinned base, or merged weights): scores allowed answers, else generates."""

    def __init__(self, directory: Path, manifest: dict[str, Any], device: str | None = None):
        super().__init__(directory, manifest, device)
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.kind = manifest["kind"]
        self.tokenizer = AutoTokenizer.from_pretrained(str(self.dir))
        if self.tokenizer.pad_token is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        dtype = torch.bfloat16 if self.device == "cuda" else torch.float32
        if self.kind == "causal-lm-lora":
            from peft import PeftModel

            base = _pinned_base(manifest["base"])
            lm = AutoModelForCausalLM.from_pretrained(base, dtype=dtype, use_safetensors=True)
            self.model = PeftModel.from_pretrained(lm, str(self.dir), use_safetensors=True).merge_and_unload()
        else:
            self.model = AutoModelForCausalLM.from_pretrained(
                str(self.dir), dtype=dtype, use_safetensors=True
            )
        self.model.to(self.device).eval()
        self.vocab = self.spec.vocab() if self._object_output() else {}
        self.max_new_tokens = int(manifest.get("max_new_tokens", 128))

    def _object_output(self) -> bool:
        return self.spec.output_kind == "json" and self.spec.output_schema.get("type") == "object"

    def _scorable(self) -> bool:
        """Every output field has a closed vocabulary: answer by scoring candidates."""
        props = set(self.spec.output_schema.get("properties", {}))
        return bool(self.vocab) and props <= set(self.vocab)

    def _candidates(self, allowed=None):
        from kolm_ray.models.modeling import candidate_answers

        return candidate_answers(self.vocab, {ALLOWED_FIELD: list(allowed)} if allowed is not None else None)

    def calibration_logits(self, inputs, allowed=None):
        from kolm_ray.models.modeling import answer_text, score_candidates

        cands = self._candidates(allowed)
        if not self._scorable() or not cands:
            return {}
        texts = [answer_text(c) for c in cands]
        if self.device == "cuda":  # the served form: one CUDA graph per candidate set and length bucket
            return {JOINT: self._static_scorer(texts)(list(inputs))}
        return {JOINT: score_candidates(self.model, self.tokenizer, list(inputs), texts)}

    def _static_scorer(self, texts: list[str]):
        from kolm_ray.inference.static_scorer import StaticScorer

        cache = self.__dict__.setdefault("_scorers", {})
        key = tuple(texts)
        if key in cache:
            cache[key] = cache.pop(key)  # most recently used last
        else:
            if len(cache) >= MAX_SCORERS:  # tenants' allowed sets vary: drop the least recently used
                cache.pop(next(iter(cache)))
            cache[key] = StaticScorer(self.model, self.tokenizer, texts)
        return cache[key]

    def calibration_targets(self, outputs):
        if not self._scorable():
            return {}
        keys = [json.dumps(c, sort_keys=True) for c in self._candidates()]
        pos = {k: i for i, k in enumerate(keys)}
        gold = [
            pos.get(json.dumps({f: o.get(f) for f in self.vocab}, sort_keys=True), -1)
            if isinstance(o, dict)
            else -1
            for o in outputs
        ]
        return {JOINT: torch.tensor(gold, dtype=torch.long)}

    def predict(self, inputs, allowed=None):
        from kolm_ray.models.modeling import generate

        inputs = list(inputs)
        if not inputs:
            return []
        if self._scorable():
            cands = self._candidates(allowed)
            if not cands:
                return [self._finish({f: None for f in self.vocab}, 0.0) for _ in inputs]
            return self._pick(self.calibration_logits(inputs, allowed)[JOINT], cands)
        answers = []
        for text, conf in generate(self.model, self.tokenizer, inputs, self.max_new_tokens):
            value: Any = text
            if self.spec.output_kind == "json":
                try:
                    value = json.loads(text)
                except ValueError:
                    value = text  # not JSON: the json-schema verifier will say so
            answers.append(
                self._finish(value, conf)
                if isinstance(value, dict)
                else self._finish({OUTPUT_KEY: value}, conf)
            )
        return answers

    def _pick(self, scores: torch.Tensor, cands: list[dict[str, Any]]) -> list[dict[str, Any]]:
        probs = torch.softmax(scores / self.temperature.get(JOINT, 1.0), dim=-1)
        best = probs.argmax(-1)
        return [self._finish(dict(cands[int(b)]), float(probs[i, b])) for i, b in enumerate(best)]

    def answers_from_scores(self, scores):
        logits = scores[0]
        if JOINT not in logits:
            return None
        return self._pick(logits[JOINT], self._candidates())


def _pinned_base(base: dict[str, Any]) -> str:
    """Where to load a LoRA artifact's base from, refusing a local base whose weights changed."""
    from kolm_ray.models.bases import resolve_base, weights_digest

    source = base.get("source", "")
    revision = base.get("revision")
    if source and Path(source).is_dir():
        if revision and revision.startswith("sha256:") and weights_digest(source) != revision:
            raise ArtifactError(
                f"base {source} changed since this adapter was compiled (weights hash differs)"
            )
        return source
    try:
        resolved = resolve_base(base.get("name", source))
    except KolmError as e:
        raise ArtifactError(f"cannot find this adapter's base {base.get('name')!r}: {e}") from None
    if revision and revision.startswith("sha256:") and resolved.revision != revision:
        raise ArtifactError(f"base {base.get('name')!r} differs from the one this adapter was compiled on")
    return resolved.source


def predictor_from_dir(
    directory: str | Path, manifest: dict[str, Any], device: str | None = None
) -> Predictor:
    """Build a Predictor from an artifact's (already verified or freshly staged) files."""
    _threads()
    kind = manifest.get("kind")
    missing = [f for f in REQUIRED_FILES.get(kind, ()) if not (Path(directory) / f).is_file()]
    if kind == "causal-lm" and not any(Path(directory).glob("*.safetensors")):
        missing.append("*.safetensors")
    if missing:
        raise ArtifactError(f"{kind} artifact lacks {', '.join(missing)}")
    if kind == "encoder-tagger":
        return EncoderPredictor(Path(directory), manifest, device)
    if kind == "encoder-extractor":
        from kolm_ray.inference.extractor import ExtractorPredictor

        return ExtractorPredictor(Path(directory), manifest, device)
    if kind in ("causal-lm-lora", "causal-lm"):
        return CausalPredictor(Path(directory), manifest, device)
    raise ArtifactError(f"unknown artifact kind {kind!r}")


def open_predictor(path: str | Path, device: str | None = None) -> Predictor:
    """Verify a .kolm (signature and every hash) and load it for inference."""
    from kolm_ray.artifact import open_artifact

    opened = open_artifact(path)
    try:
        p = predictor_from_dir(opened.dir, opened.manifest, device)
    except BaseException:
        opened.close()
        raise
    p._opened = opened
    return p
