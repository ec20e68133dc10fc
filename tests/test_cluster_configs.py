"""cluster/ without a cluster: launcher configs, node kinds, join scripts, placement.py's scaling config and
GPU choice, and an unreachable RAY_ADDRESS. All fast; the simulated cluster is tests/test_cluster.py."""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from cluster_helpers import CLUSTER_DIR, RTX5090, kolm_node

from kolm_ray import placement
from kolm_ray.errors import KolmError

# ---------------------------------------------------------------- configs (fast)


@pytest.mark.parametrize("path", sorted(CLUSTER_DIR.glob("*.yaml")), ids=lambda p: p.name)
def test_every_cluster_yaml_loads_and_validates(path: Path) -> None:
    """Launcher configs pass Ray's own preparation and schema; node-kinds.yaml passes ours."""
    text = path.read_text()
    first = text.splitlines()[0]
    assert first.startswith(("# ray ", "# python cluster/")), (
        "the first line is the command that uses the file"
    )
    doc = yaml.safe_load(text)
    if "provider" in doc:
        from ray.autoscaler._private.util import prepare_config, validate_config

        assert first.startswith(f"# ray up cluster/{path.name}")
        prepared = prepare_config(copy.deepcopy(doc))
        validate_config(prepared)
    else:
        assert first.startswith("# python cluster/kolm_node.py")
        assert set(kolm_node.load_kinds(path)) == set(placement.NODE_KINDS)


def test_onprem_launcher_starts_each_machine_as_its_kind() -> None:
    doc = yaml.safe_load((CLUSTER_DIR / "kolm-cluster.yaml").read_text())
    assert doc["provider"]["type"] == "local"
    assert doc["provider"]["head_ip"] and len(doc["provider"]["worker_ips"]) == doc["max_workers"]
    head = " ".join(doc["head_start_ray_commands"])
    worker = " ".join(doc["worker_start_ray_commands"])
    assert "kolm_node.py head" in head and "--autoscaling-config" in head
    assert "kolm_node.py auto" in worker and "$RAY_HEAD_IP:6379" in worker
    for cmd in (head, worker):
        assert "RAY_AUTH_MODE=token" in cmd
    assert "~/.ray/auth_token" in doc["file_mounts"]


def test_cloud_launcher_declares_the_same_kinds_as_node_types() -> None:
    doc = yaml.safe_load((CLUSTER_DIR / "kolm-cluster.aws.yaml").read_text())
    kinds = kolm_node.load_kinds()
    types = doc["available_node_types"]
    assert set(types) == {"head", "gpu", "cpu"} and doc["head_node_type"] == "head"
    for name, node_type in types.items():
        assert node_type["labels"][placement.NODE_KIND_LABEL] == name
        assert node_type["resources"], f"{name}: declare resources so the autoscaler can plan"
        custom = set(kinds[name]["resources"]) - {"rtx5090"}  # the cloud GPU is an L4, not a 5090
        assert custom <= set(node_type["resources"])
    assert types["gpu"]["resources"]["GPU"] >= 1
    assert types["gpu"]["min_workers"] >= 1  # kolm picks GPU vs CPU training from the nodes up now


def test_ray_start_args_carry_the_kind() -> None:
    kinds = kolm_node.load_kinds()
    args = kolm_node.ray_start_args("gpu", kinds, gpus=2)
    resources = json.loads(args[args.index("--resources") + 1])
    labels = dict(kv.split("=") for kv in args[args.index("--labels") + 1].split(","))
    assert resources == {"rtx5090": 2.0}
    assert labels[placement.NODE_KIND_LABEL] == "gpu" and labels["kolm.io/gpu"] == "rtx5090"
    mac = kolm_node.ray_start_args("mac", kinds)
    assert json.loads(mac[mac.index("--resources") + 1]) == {"mps": 1.0}
    assert mac[mac.index("--num-gpus") + 1] == "0"
    with pytest.raises(ValueError, match="not a node kind"):
        kolm_node.ray_start_args("tpu", kinds)


def test_node_kinds_file_rejects_bad_kinds(tmp_path: Path) -> None:
    bad = tmp_path / "kinds.yaml"
    bad.write_text(
        "kinds:\n  gpu:\n    resources: {GPU: 1, x: -1}\n    labels: {kolm.io/node-kind: cpu, ray.io/y: z, n: 3}\n"
    )
    with pytest.raises(ValueError) as err:
        kolm_node.load_kinds(bad)
    for problem in ("Ray's own", "x must be a number", "node-kind: gpu", "reserved", "must be a string"):
        assert problem in str(err.value)


def _run_script(cmd: list[str], env: dict[str, str], home: Path) -> subprocess.CompletedProcess:
    full_env = {**os.environ, "HOME": str(home), "PYTHON": sys.executable, **env}
    full_env.pop("RAY_AUTH_TOKEN", None)
    full_env.pop("RAY_AUTH_TOKEN_PATH", None)
    return subprocess.run(cmd, capture_output=True, text=True, env=full_env, timeout=60)


def test_join_cpu_script_prints_its_ray_start_line(tmp_path: Path) -> None:
    (tmp_path / ".ray").mkdir()
    (tmp_path / ".ray" / "auth_token").write_text("t" * 32)
    out = _run_script([str(CLUSTER_DIR / "join-cpu.sh"), "10.0.0.10"], {"KOLM_NODE_PRINT": "1"}, tmp_path)
    assert out.returncode == 0, out.stderr
    line = out.stdout.strip().splitlines()[-1]
    assert " start " in line and "--address 10.0.0.10:6379" in line
    assert "kolm.io/node-kind=cpu" in line and "kolm_cpu_node" in line


def test_join_refuses_without_the_token_and_mac_script_needs_macos(tmp_path: Path) -> None:
    out = _run_script([str(CLUSTER_DIR / "join-cpu.sh"), "10.0.0.10"], {"KOLM_NODE_PRINT": "1"}, tmp_path)
    assert out.returncode == 2 and "no token" in out.stderr
    if sys.platform != "darwin":
        mac = _run_script([str(CLUSTER_DIR / "join-mac.sh"), "10.0.0.10"], {"KOLM_NODE_PRINT": "1"}, tmp_path)
        assert mac.returncode == 2 and "for macOS" in mac.stderr
    for script in ("join-cpu.sh", "join-mac.sh"):
        assert subprocess.run(["bash", "-n", str(CLUSTER_DIR / script)]).returncode == 0


# ---------------------------------------------------------------- placement.py (fast, no Ray cluster)


def test_scaling_config_for_gpu_workers_pins_the_accelerator(monkeypatch) -> None:
    monkeypatch.setenv("KOLM_ACCELERATOR_TYPE", RTX5090)
    monkeypatch.delenv("KOLM_TRAIN_LABEL_SELECTOR", raising=False)
    sc = placement.scaling_config(2, True, cpus_per_worker=4)
    assert sc.num_workers == 2 and sc.use_gpu
    assert sc.resources_per_worker == {"CPU": 4.0, "GPU": 1.0}
    assert sc.accelerator_type == RTX5090
    assert sc.label_selector == {placement.NODE_KIND_LABEL: "!mac"}


def test_scaling_config_for_cpu_workers_and_selectors(monkeypatch) -> None:
    monkeypatch.setenv("KOLM_ACCELERATOR_TYPE", RTX5090)
    monkeypatch.setenv("KOLM_TRAIN_LABEL_SELECTOR", "kolm.io/node-kind=cpu,kolm.io/gpu-memory-gb=in(32, 48)")
    sc = placement.scaling_config(1, False, extra_resources={"kolm_cpu_node": 0.1})
    assert sc.accelerator_type is None  # nothing to pin on CPU
    assert sc.resources_per_worker == {"CPU": 1.0, "kolm_cpu_node": 0.1}
    assert sc.label_selector == {"kolm.io/node-kind": "cpu", "kolm.io/gpu-memory-gb": "in(32, 48)"}
    monkeypatch.setenv("KOLM_TRAIN_LABEL_SELECTOR", "")
    assert placement.scaling_config(1, False).label_selector is None
    with pytest.raises(KolmError, match="expected key=value"):
        placement.parse_label_selector("kolm.io/node-kind")
    with pytest.raises(KolmError, match="at least 1"):
        placement.scaling_config(0, False)


def test_resolve_use_gpu_without_gpus(monkeypatch) -> None:
    """No Ray cluster here, so no GPU: CPU unless the user insists on GPUs or forbids CPU."""
    import ray

    assert not ray.is_initialized()
    monkeypatch.delenv("KOLM_ALLOW_CPU", raising=False)
    assert placement.resolve_use_gpu(None) is False
    assert placement.resolve_use_gpu(False) is False
    with pytest.raises(KolmError, match="no GPU"):
        placement.resolve_use_gpu(True)
    monkeypatch.setenv("KOLM_ALLOW_CPU", "0")
    with pytest.raises(KolmError, match="KOLM_ALLOW_CPU=0"):
        placement.resolve_use_gpu(None)


def test_an_unreachable_ray_address_is_one_clear_error_not_minutes_of_retries():
    import socket

    from kolm_ray.errors import KolmError
    from kolm_ray.placement import _check_reachable

    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()  # nothing listens there now
    with pytest.raises(KolmError, match=f"cannot reach the Ray cluster at RAY_ADDRESS=127.0.0.1:{port}"):
        _check_reachable(f"127.0.0.1:{port}")
    for address in ("auto", "ray://head:10001", "local"):
        _check_reachable(address)  # left to ray.init
