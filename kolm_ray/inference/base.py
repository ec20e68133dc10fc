"""The Predictor every model kind's predictor extends: spec, manifest, calibration, predict(), close. Its own
module so that a kind's predictor (inference/extractor.py) and the dispatcher (predictors.predictor_from_dir)
both import it without importing each other.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from kolm_ray.artifact.spec import CONFIDENCE_FIELD, FALLBACK_FIELD, Spec, validate_spec
from kolm_ray.artifact.verifiers import DEFAULT_THRESHOLD

CALIBRATION_FILE = "calibration.json"  # {"temperature": {field or "__joint__": T}, "outlier": {field: {...}}}


def _threads() -> None:
    from kolm_ray.placement import quiet_deepspeed_on_cpu, torch_threads

    quiet_deepspeed_on_cpu()
    if not torch.cuda.is_available():
        torch.set_num_threads(torch_threads())


class Predictor:
    """Common surface: spec, manifest, temperature, predict(), calibration hooks."""

    kind: str = ""

    def __init__(self, directory: Path, manifest: dict[str, Any], device: str | None = None):
        from kolm_ray.placement import pick_device

        self.dir = Path(directory)
        self.manifest = manifest
        self.spec: Spec = validate_spec(manifest["spec"], "artifact spec")
        self.device = pick_device(device)
        cal = self.dir / CALIBRATION_FILE
        calibration = json.loads(cal.read_text()) if cal.exists() else {}
        self.temperature: dict[str, float] = calibration.get("temperature", {})
        # Routers with ClassGaussians: {field: {"weight": b, "offset": c}} of the "none of these" logit.
        self.outlier: dict[str, dict[str, float]] = calibration.get("outlier", {})
        fb = self.spec.get("low-confidence-fallback-broad")
        self.fallback_threshold: float | None = None
        if fb is not None:
            self.fallback_threshold = fb.threshold if fb.threshold is not None else DEFAULT_THRESHOLD
        self._opened = None  # the OpenedArtifact whose directory this predictor reads

    # -- to implement ---------------------------------------------------------------------------------------
    def calibration_logits(self, inputs: Sequence[str]) -> dict[str, torch.Tensor]:
        """Un-tempered logits per calibration key (field, or JOINT), shape (len(inputs), n_values)."""
        raise NotImplementedError

    def calibration_scores(
        self, inputs: Sequence[str]
    ) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        """Logits and, for keys with class distances (models.ClassGaussians), those distances."""
        return self.calibration_logits(inputs), {}

    def calibration(self) -> dict[str, Any]:
        """What calibration.json holds: the fitted temperatures (and outlier logits, if any)."""
        return {"temperature": self.temperature} | ({"outlier": self.outlier} if self.outlier else {})

    def calibration_targets(self, outputs: Sequence[Any]) -> dict[str, torch.Tensor]:
        """Gold index per calibration key (-1 when the gold value is not among the values)."""
        raise NotImplementedError

    def predict(self, inputs: Sequence[str], allowed: Sequence[str] | None = None) -> list[dict[str, Any]]:
        raise NotImplementedError

    def answers_from_scores(
        self, scores: tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]
    ) -> list[dict[str, Any]] | None:
        """What predict(inputs) answers, from calibration_scores(inputs) under the current calibration, so an
        evaluation that calibrates on those scores need not run the model again; None where the answers do
        not come from those scores (generation)."""
        return None

    # -- shared ---------------------------------------------------------------------------------------------
    def _finish(self, fields: dict[str, Any], confidence: float) -> dict[str, Any]:
        out = dict(fields)
        out[CONFIDENCE_FIELD] = round(float(confidence), 6)
        if self.fallback_threshold is not None:
            out[FALLBACK_FIELD] = "broad" if confidence < self.fallback_threshold else "narrow"
        return out

    def close(self) -> None:
        if self._opened is not None:
            self._opened.close()
            self._opened = None

    def __enter__(self) -> Predictor:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:
            pass
