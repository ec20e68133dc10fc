"""Start a Ray node as one of the kinds in node-kinds.yaml (the shared back end of the join scripts).

    python cluster/kolm_node.py gpu --address 10.0.0.1:6379          # join as an RTX 5090 worker
    python cluster/kolm_node.py auto --address 10.0.0.1:6379         # gpu if nvidia-smi sees one, mac on macOS, else cpu
    python cluster/kolm_node.py head --print -- --port 6379          # print the `ray start` line, run nothing

Everything after `--` goes to `ray start` unchanged. Needs only the Python that Ray is installed in
(PyYAML comes with Ray), so it runs on a fresh node before kolm-ray is installed there.
"""

from __future__ import annotations

import json
import os
import platform
import shlex
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import yaml

KINDS_FILE = Path(__file__).resolve().with_name("node-kinds.yaml")
NODE_KIND_LABEL = "kolm.io/node-kind"  # same constant as kolm_ray.placement.NODE_KIND_LABEL
WORKER_KINDS = ("gpu", "cpu", "mac")


def load_kinds(path: Path = KINDS_FILE) -> dict[str, dict[str, Any]]:
    """Read and check node-kinds.yaml; every problem is reported in one ValueError."""
    doc = yaml.safe_load(Path(path).read_text())
    kinds = (doc or {}).get("kinds")
    problems: list[str] = []
    if not isinstance(kinds, dict) or not kinds:
        raise ValueError(f"{path}: expected a non-empty `kinds:` mapping")
    for name, kind in kinds.items():
        if not isinstance(kind, dict):
            problems.append(f"{name}: expected a mapping")
            continue
        for key in ("resources", "labels"):
            if not isinstance(kind.get(key), dict):
                problems.append(f"{name}: `{key}` must be a mapping")
        labels = kind.get("labels") or {}
        if labels.get(NODE_KIND_LABEL) != name:
            problems.append(f"{name}: labels must hold {NODE_KIND_LABEL}: {name}")
        for key, value in labels.items():
            if str(key).startswith("ray.io/"):
                problems.append(f"{name}: label {key} is in Ray's reserved ray.io/ namespace")
            if not isinstance(value, str):
                problems.append(f"{name}: label {key} must be a string (quote it), got {value!r}")
        for key, value in (kind.get("resources") or {}).items():
            if key in ("CPU", "GPU", "memory"):
                problems.append(f"{name}: resource {key} is Ray's own; use num_cpus/num_gpus")
            if value != "auto" and not (isinstance(value, (int, float)) and value >= 0):
                problems.append(f"{name}: resource {key} must be a number >= 0 or `auto`, got {value!r}")
    if problems:
        raise ValueError(f"{path}: " + "; ".join(problems))
    return kinds


def gpu_count() -> int:
    """NVIDIA GPUs on this machine (`nvidia-smi -L`), 0 when there is no driver."""
    if not shutil.which("nvidia-smi"):
        return 0
    try:
        out = subprocess.run(
            ["nvidia-smi", "-L"], capture_output=True, text=True, timeout=20, check=True
        ).stdout
    except (subprocess.SubprocessError, OSError):
        return 0
    return sum(1 for line in out.splitlines() if line.startswith("GPU "))


def detect_kind() -> str:
    """mac on macOS, gpu where nvidia-smi lists a card, else cpu."""
    if platform.system() == "Darwin":
        return "mac"
    return "gpu" if gpu_count() > 0 else "cpu"


def ray_start_args(kind: str, kinds: dict[str, dict[str, Any]], gpus: int | None = None) -> list[str]:
    """The `ray start` flags that make this node advertise `kind`'s resources and labels."""
    if kind not in kinds:
        raise ValueError(f"{kind!r} is not a node kind; known: {', '.join(kinds)}")
    spec = kinds[kind]
    resources: dict[str, float] = {}
    for name, value in spec["resources"].items():
        if value == "auto":
            value = gpu_count() if gpus is None else gpus
        resources[name] = float(value)
    args = ["--resources", json.dumps(resources, sort_keys=True)]
    args += ["--labels", ",".join(f"{k}={v}" for k, v in spec["labels"].items())]
    if spec.get("num_cpus") is not None:
        args += ["--num-cpus", str(spec["num_cpus"])]
    if spec.get("num_gpus") is not None:
        args += ["--num-gpus", str(spec["num_gpus"])]
    return args


def main(argv: list[str] | None = None) -> int:
    """Parse `KIND [--print] [-- ray start args]` and exec `ray start` (or print it)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    passthrough: list[str] = []
    if "--" in argv:
        cut = argv.index("--")
        argv, passthrough = argv[:cut], argv[cut + 1 :]
    dry = (
        "--print" in argv or os.environ.get("KOLM_NODE_PRINT") == "1"
    )  # the env form reaches through join-*.sh
    argv = [a for a in argv if a != "--print"]
    # `--address X` before `--` is accepted too, since it is what every join line has
    if "--address" in argv:
        i = argv.index("--address")
        passthrough = ["--address", argv[i + 1], *passthrough]
        del argv[i : i + 2]
    if len(argv) != 1:
        print(__doc__, file=sys.stderr)
        return 2
    kinds = load_kinds()
    kind = detect_kind() if argv[0] == "auto" else argv[0]
    if kind not in kinds:
        print(f"error: {kind!r} is not a node kind; known: auto, {', '.join(kinds)}", file=sys.stderr)
        return 2
    if kind == "gpu" and gpu_count() == 0:
        print("warning: nvidia-smi sees no GPU here; this gpu node would advertise none", file=sys.stderr)
        if not dry:
            return 2
    if kind == "head":
        passthrough = ["--head", *passthrough]
    elif not any(a.startswith("--address") for a in passthrough):
        print(f"error: a {kind} node needs --address HEAD_IP:6379", file=sys.stderr)
        return 2
    cmd = [_ray_cli(), "start", *ray_start_args(kind, kinds), *passthrough]
    if os.environ.get("RAY_AUTH_MODE", "").lower() == "token" and not _token_available():
        print(
            "error: RAY_AUTH_MODE=token but no token here; copy the head's token "
            "(`ray get-auth-token` on the head) into ~/.ray/auth_token or RAY_AUTH_TOKEN",
            file=sys.stderr,
        )
        return 2
    print(shlex.join(cmd), flush=True)
    if dry:
        return 0
    if kind == "mac":
        # Ray refuses multi-node clusters on macOS unless told to go ahead (see cluster/README.md)
        os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "1")
    os.execvp(cmd[0], cmd)
    return 0  # not reached


def _ray_cli() -> str:
    """The `ray` next to this Python (a venv's), else the one on PATH."""
    beside = Path(sys.executable).with_name("ray")
    return str(beside) if beside.exists() else "ray"


def _token_available() -> bool:
    if os.environ.get("RAY_AUTH_TOKEN"):
        return True
    path = os.environ.get("RAY_AUTH_TOKEN_PATH") or str(Path.home() / ".ray" / "auth_token")
    return Path(path).is_file() and Path(path).stat().st_size > 0


if __name__ == "__main__":
    sys.exit(main())
