"""A small signed namespace-tagger artifact for the serve tests, built once per session with `kolm compile`.

tiny-encoder (2-layer BERT from config) on generated pairs for four namespaces: it trains in seconds and
is real end to end (Ray Train, calibration, K-score, HMAC signature), which is what the router needs.
"""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from pathlib import Path

SIGNING_KEY = "kolm-serve-tests-signing-key"  # tests only; set via monkeypatch where an artifact is opened
NAMESPACES = ["banking", "travel", "kitchen", "music"]
_TOPICS = {
    "banking": ["balance", "transfer", "savings account", "checking account", "bank fee", "wire", "deposit"],
    "travel": ["flight", "hotel", "passport", "boarding pass", "luggage", "train ticket", "visa"],
    "kitchen": ["recipe", "oven", "bake", "ingredients", "boil", "dinner", "grill"],
    "music": ["song", "playlist", "album", "guitar", "concert", "lyrics", "band"],
}
_FRAMES = [
    "how do i check my {}",
    "help me with the {} please",
    "what is the best {} for this weekend",
    "i have a question about a {}",
    "tell me about the {}",
    "can you find a {} for me",
    "my {} is not working",
    "where is my {}",
]


# Not among the training phrases: other frames around the same topics (the tagger never saw these inputs).
HELD_OUT = [
    ("is there a fee on my checking account", "banking"),
    ("i lost my passport before the flight", "travel"),
    ("how long do i bake it in the oven", "kitchen"),
    ("who sings this song on the album", "music"),
]


def pairs(seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    rows = []
    for ns, topics in _TOPICS.items():
        for frame in _FRAMES:
            for topic in topics:
                rows.append({"input": frame.format(topic), "output": {"namespace": ns}})
    rng.shuffle(rows)
    return rows


def build(out_dir: Path) -> Path:
    """Compile (once) and return the artifact path; KOLM_HOME and the signing key are the test ones.

    KOLM_TEST_RECALL_ARTIFACT names one built earlier by this function (signed with SIGNING_KEY), to skip
    the compile when iterating locally.
    """
    prebuilt = os.environ.get("KOLM_TEST_RECALL_ARTIFACT")
    if prebuilt and Path(prebuilt).is_file():
        return Path(prebuilt)
    out_dir.mkdir(parents=True, exist_ok=True)
    artifact = out_dir / "tagger.kolm"
    if artifact.exists():
        return artifact
    (out_dir / "pairs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in pairs()))
    (out_dir / "namespaces.json").write_text(json.dumps(NAMESPACES))
    env = {
        **os.environ,
        "KOLM_HOME": str(out_dir / "home"),
        "KOLM_SIGNING_KEY": SIGNING_KEY,
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "RAY_USAGE_STATS_ENABLED": "0",
        "TOKENIZERS_PARALLELISM": "false",
    }
    env.pop("RAY_ADDRESS", None)
    cmd = [
        sys.executable, "-m", "kolm_ray.cli", "compile", "recall namespace router (tests)",
        "--base", "tiny-encoder", "--pairs", str(out_dir / "pairs.jsonl"),
        "--namespaces", str(out_dir / "namespaces.json"),
        "--verifier", "closed-vocab,low-confidence-fallback-broad",
        "--k-floor", "0.95", "--epochs", "8", "--output", str(artifact),
    ]  # fmt: skip
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
    if proc.returncode != 0 or not artifact.exists():
        raise RuntimeError(
            f"kolm compile failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
        )
    return artifact
