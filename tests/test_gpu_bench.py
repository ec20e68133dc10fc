"""benchmarks/gpu.py end to end in its CPU-small mode (tiny shapes, the real vocabularies, the same code the
GPU run takes), so a lent GPU machine's one run cannot fail on an import, a typo or a key."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
SHAPES = ("qwen2.5-coder-3b", "qwen2.5-coder-7b")


def _positive(x) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x) and x > 0


@pytest.mark.slow  # a subprocess that trains four tiny models (a minute or two on 2 cores)
def test_gpu_benchmark_cpu_small_writes_the_issue_format(tmp_path: Path) -> None:
    out = tmp_path / "gpu.json"
    env = {
        **os.environ,
        "KOLM_HOME": os.environ.get("KOLM_HOME", str(tmp_path / "home")),
        "HF_HUB_OFFLINE": "1",
    }
    proc = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "gpu.py"), "--small", "--out", str(out)],
        capture_output=True, text=True, timeout=900, env=env, cwd=tmp_path,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    r = json.loads(out.read_text())
    assert r["device"] == "cpu-small" and r["mode"] == "small" and r["complete"] is True
    assert r["errors"] == {}, r["errors"]
    assert r["when"].endswith("Z") and r["ray_imported"] is False  # the GPU machine has no Ray
    for name in SHAPES:
        v = r["lora"][name]
        for key in ("hf_peft_tok_s", "kolm_tok_s", "seq_len", "batch"):
            assert _positive(v[key]), (name, key, v[key])
        assert v["kolm_peak_gib"] == 0.0  # no CUDA memory on CPU; a GPU run reports a positive number
        assert v["kolm_losses"][-1] < v["kolm_losses"][0]  # kolm's step trains
        assert v["seq_len"] == 128 and v["kolm_steps_per_epoch"] >= 2
    assert "deepspeed" not in r["skipped"], r["skipped"]  # DeepSpeed runs on CPU (its CPU accelerator)
    for stage in ("zero2", "zero3"):
        d = r["deepspeed"][stage]
        assert _positive(d["loss_first"]) and _positive(d["loss_last"]) and d["loss_last"] < d["loss_first"]
        assert d["reload_ok"] is True, d
        assert abs(d["reloaded_loss"] - d["reloaded_from_zero_shards_loss"]) < 1e-3
    s = r["scorer"]["qwen2.5-coder-3b"]
    assert _positive(s["p50_ms"]) and _positive(s["eager_p50_ms"])
    assert s["max_abs_score_difference"] < 1e-3 and s["same_top_answer"] == 1.0
    assert "served p50" in proc.stdout and f"wrote {out}" in proc.stdout
