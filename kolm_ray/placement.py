"""Where work lands: Ray resources for compile workers, and the device inside a worker or replica.

Training workers ask for GPUs (and an accelerator type when configured) and run on CPU only when the
cluster has none and the caller allows it; inside any worker or replica the device is cuda, then mps,
then cpu. Ray Data featurization and Serve replicas carry their own resource requests.
"""

from __future__ import annotations

import contextlib
import os
import socket
from collections.abc import Iterator

from kolm_ray.errors import KolmError

# Quiet Ray Train's progress tables and metrics exports; our workers print their own progress bar.
_QUIET_ENV = {"RAY_TRAIN_ENABLE_STATE_TRACKING": "0", "RAY_DEDUP_LOGS": "1"}


def verbose() -> bool:
    """KOLM_VERBOSE=1 (what `kolm --verbose` and `make demo VERBOSE=1` set): show Ray's own logs too."""
    return os.environ.get("KOLM_VERBOSE", "").strip().lower() not in ("", "0", "false", "no", "off")


def progress_bars() -> bool:
    """Progress bars only on a terminal: sent to a file they are hundreds of redrawn lines, so there each
    phase prints one line instead (a TQDM_DISABLE the user set wins either way)."""
    import sys

    if os.environ.get("TQDM_DISABLE", "").strip().lower() not in ("", "0", "false"):
        return False
    return verbose() or sys.stderr.isatty()


def quiet_output() -> None:
    """Progress bars only on a terminal, Ray's own chatter off unless verbose(); called first by `kolm` and
    `make demo`. It sets environment variables (never one the user set), so the child processes and the
    local Ray workers started afterwards follow it too: tqdm's bars (ours, model2vec's, Ray Train
    workers') and Ray Data's progress bars off when stderr is not a terminal."""
    if verbose() or progress_bars():
        return
    os.environ.setdefault("TQDM_DISABLE", "1")
    os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")


def train_log_level() -> str:
    """Ray Train's own console logs (`Requesting resources`, `Started training worker group`, ...)."""
    return "INFO" if verbose() else "WARNING"


def pick_device(prefer: str | None = None) -> str:
    """cuda, then mps, then cpu (KOLM_DEVICE or `prefer` overrides)."""
    import torch

    choice = prefer or os.environ.get("KOLM_DEVICE")
    if choice:
        return choice
    if torch.cuda.is_available():
        return "cuda"
    mps = getattr(torch.backends, "mps", None)
    if mps is not None and mps.is_available():
        return "mps"
    return "cpu"


def cluster_gpus() -> float:
    """GPUs the connected Ray cluster has in total (0 when Ray is not initialized)."""
    import ray

    if not ray.is_initialized():
        return 0.0
    return float(ray.cluster_resources().get("GPU", 0.0))


def resolve_use_gpu(use_gpu: bool | None, allow_cpu: bool | None = None) -> bool:
    """Decide whether compile workers take GPUs.

    use_gpu=True insists (a clear error if the cluster has none); None means "GPUs when the cluster has
    them, else CPU if allowed"; False means CPU. allow_cpu=None reads KOLM_ALLOW_CPU (default 1; 0 makes
    a cluster without GPUs an error instead of a CPU compile).
    """
    if allow_cpu is None:
        allow_cpu = os.environ.get("KOLM_ALLOW_CPU", "1").strip().lower() not in ("0", "false", "no")
    gpus = cluster_gpus()
    if use_gpu and gpus < 1:
        raise KolmError("--use-gpu was given but the Ray cluster has no GPU; drop the flag to train on CPU")
    if use_gpu is None:
        if gpus >= 1:
            return True
        if not allow_cpu:
            raise KolmError("the Ray cluster has no GPU and CPU training is not allowed (KOLM_ALLOW_CPU=0)")
        return False
    return bool(use_gpu)


def worker_resources(use_gpu: bool, cpus_per_worker: float = 1.0) -> dict[str, float]:
    """Per-worker resources for ScalingConfig(resources_per_worker=...)."""
    res = {"CPU": cpus_per_worker}
    if use_gpu:
        res["GPU"] = 1.0
    return res


def accelerator_type() -> str | None:
    """KOLM_ACCELERATOR_TYPE pins compile workers to one GPU kind (e.g. an RTX 5090 label in cluster/)."""
    return os.environ.get("KOLM_ACCELERATOR_TYPE") or None


# --- node kinds (cluster/node-kinds.yaml declares the same names; tests/test_cluster_configs.py checks) ---

NODE_KIND_LABEL = "kolm.io/node-kind"
"""Label every kolm node carries: head | gpu | cpu | mac (set by cluster/kolm_node.py)."""

NODE_KINDS = ("head", "gpu", "cpu", "mac")

TRAIN_LABEL_SELECTOR_DEFAULT = {NODE_KIND_LABEL: "!mac"}
"""Compile workers never land on a Mac: no CUDA there, so no DeepSpeed, and a Mac CPU is better spent
on Serve replicas and Data actors. `!mac` also matches nodes without the label (a plain `ray start`)."""


def parse_label_selector(text: str | None) -> dict[str, str]:
    """Parse `key=value,key2=!value2` (the `ray start --labels` form, plus Ray's selector operators).

    Values may use Ray's selector syntax: `!x`, `in(a,b)`, `!in(a,b)`. An empty string means "no selector".
    """
    if not text or not text.strip():
        return {}
    out: dict[str, str] = {}
    # commas also separate the members of in(...), so split on commas outside parentheses only
    depth, part, parts = 0, "", []
    for ch in text:
        depth += ch == "("
        depth -= ch == ")"
        if ch == "," and depth == 0:
            parts.append(part)
            part = ""
        else:
            part += ch
    parts.append(part)
    for item in parts:
        key, sep, value = item.partition("=")
        if not sep or not key.strip() or not value.strip():
            raise KolmError(f"bad label selector {item.strip()!r} in {text!r}: expected key=value")
        out[key.strip()] = value.strip()
    return out


def train_label_selector() -> dict[str, str]:
    """Where compile workers may run: KOLM_TRAIN_LABEL_SELECTOR (`key=value,...`), else not on a Mac."""
    env = os.environ.get("KOLM_TRAIN_LABEL_SELECTOR")
    if env is None:
        return dict(TRAIN_LABEL_SELECTOR_DEFAULT)
    return parse_label_selector(env)


def cluster_accelerator_types() -> list[str]:
    """Accelerator types the connected cluster reports (`accelerator_type:X` resources), sorted."""
    import ray

    if not ray.is_initialized():
        return []
    prefix = "accelerator_type:"
    return sorted(k[len(prefix) :] for k in ray.cluster_resources() if k.startswith(prefix))


def scaling_config(
    num_workers: int,
    use_gpu: bool,
    *,
    cpus_per_worker: float = 1.0,
    accelerator: str | None = None,
    label_selector: dict[str, str] | None = None,
    extra_resources: dict[str, float] | None = None,
):
    """The ray.train.ScalingConfig for compile workers; pass `use_gpu` from resolve_use_gpu().

    - GPU workers take one GPU each and, when an accelerator type is pinned (`accelerator`, else
      KOLM_ACCELERATOR_TYPE, e.g. `GeForce-RTX-5090`, the name Ray derives from the card), only nodes
      that report it. A pinned type that no node reports is an error now, not a job that waits forever.
    - `label_selector` (else KOLM_TRAIN_LABEL_SELECTOR, else `kolm.io/node-kind: !mac`) keeps the workers
      on nodes whose labels match; `extra_resources` (e.g. {"kolm_train": 1}) adds custom resources.
    - CPU workers ignore the accelerator pin (there is nothing to pin).
    """
    from ray.train import ScalingConfig

    if num_workers < 1:
        raise KolmError(f"--num-workers must be at least 1, got {num_workers}")
    resources = worker_resources(use_gpu, cpus_per_worker)
    for name, amount in (extra_resources or {}).items():
        resources[name] = float(amount)
    accel = (accelerator or accelerator_type()) if use_gpu else None
    if accel:
        known = cluster_accelerator_types()
        if cluster_gpus() >= 1 and accel not in known:
            raise KolmError(
                f"accelerator type {accel!r} (KOLM_ACCELERATOR_TYPE) is on no node of this Ray cluster; "
                f"it has: {', '.join(known) or 'none reported'}"
            )
    selector = train_label_selector() if label_selector is None else dict(label_selector)
    return ScalingConfig(
        num_workers=num_workers,
        use_gpu=use_gpu,
        resources_per_worker=resources,
        accelerator_type=accel,
        label_selector=selector or None,
    )


def torch_threads(cpus: int | None = None) -> int:
    """Intra-op threads for torch on CPU: KOLM_TORCH_THREADS, else `cpus` (default: all), else 1 when busy.

    On an oversubscribed machine (1-minute load average above the core count) OpenMP threads spin at
    barriers while descheduled; we measured small matmuls 100x slower with 2 threads than with 1 there.
    """
    env = os.environ.get("KOLM_TORCH_THREADS")
    if env:
        return max(1, int(env))
    try:
        busy = os.getloadavg()[0] > (os.cpu_count() or 1)
    except OSError:
        busy = False
    return 1 if busy else max(1, cpus or os.cpu_count() or 1)


def quiet_deepspeed_on_cpu() -> None:
    """Name DeepSpeed's accelerator on CUDA-less machines before anything imports it: transformers does, and
    DeepSpeed's "Setting accelerator to CPU" warning goes to stdout, where `kolm` prints its answers."""
    import torch

    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")


def _check_reachable(address: str, timeout: float = 5.0) -> None:
    """A RAY_ADDRESS of the form host:port must accept a connection: ray.init retries an unreachable GCS
    for minutes before it gives up."""
    host, sep, port = address.rpartition(":")
    if not sep or "://" in address or not port.isdigit():
        return  # "auto", "ray://..." (Ray Client) and the like: ray.init's own checks
    try:
        socket.create_connection((host or "127.0.0.1", int(port)), timeout=timeout).close()
    except OSError as e:
        raise KolmError(
            f"cannot reach the Ray cluster at RAY_ADDRESS={address} ({e.strerror or e})"
        ) from None


@contextlib.contextmanager
def ray_session(worker_logs: bool = True) -> Iterator[None]:
    """Connect to RAY_ADDRESS, else start a local Ray; shut down on exit only what this call started.

    Without RAY_ADDRESS it always starts a fresh local Ray (address="local"), never attaching to whichever
    cluster happens to run on the machine. worker_logs=False keeps the workers' output off the terminal.
    Ray Data's INFO lines stay off the console unless verbose() (they are a progress log, ~90 lines for a
    small `kolm recipe`, ahead of the one line that matters); its warnings and errors still show.
    """
    import logging

    import ray

    if not verbose():
        import ray.data  # noqa: F401  (its import sets up the "ray.data" logger: file DEBUG, console INFO)

        for handler in logging.getLogger("ray.data").handlers:
            if isinstance(handler, logging.StreamHandler):  # the console; ray-data.log still gets every line
                handler.setLevel(logging.WARNING)
    if ray.is_initialized():
        yield
        return
    for k, v in _QUIET_ENV.items():
        os.environ.setdefault(k, v)
    address = os.environ.get("RAY_ADDRESS")
    if address:
        _check_reachable(address)
        ray.init(log_to_driver=worker_logs)
    else:
        for attempt in range(3):
            try:
                ray.init(
                    address="local",
                    num_cpus=os.cpu_count() or 1,
                    include_dashboard=False,
                    log_to_driver=worker_logs,
                    # Without the dashboard, Ray Train's placement-group cleaner warns every few seconds
                    # that the state API is unavailable; keep Ray's own loggers to errors.
                    logging_config=ray.LoggingConfig(log_level="ERROR"),
                )
                break
            except Exception as e:  # an overloaded machine can miss Ray's fixed 30 s raylet start-up wait
                ray.shutdown()
                if "timed out during startup" not in str(e) or attempt == 2:
                    raise KolmError(f"could not start a local Ray: {e}") from e
    try:
        yield
    finally:
        ray.shutdown()
