"""cluster/ on a simulated cluster (slow): where work lands, a token-auth job, two node-loss drills.

The slow tests start one `ray.cluster_utils.Cluster` (several raylets on this machine) whose nodes
advertise exactly what cluster/node-kinds.yaml gives each kind, and check where Ray Train workers,
Ray Data actors and Serve replicas land, that a job submitted with a runtime_env runs there (with token
auth), and two drills: a node lost mid-training (resume from checkpoint) and a replica's node lost.
GPUs are logical in the simulation (Ray schedules on them; CUDA is absent), so the GPU kind's workers use
gloo and pick_device() answers cpu there. The configs and placement.py without a cluster:
tests/test_cluster_configs.py.
"""

from __future__ import annotations

import json
import os
import sys
import threading
import time
from pathlib import Path

import pytest
import yaml
from cluster_helpers import CLUSTER_DIR, RTX5090, kolm_node

from kolm_ray import placement
from kolm_ray.errors import KolmError

# ---------------------------------------------------------------- the simulated cluster (slow)


def _node_args(kind: str, kinds: dict, **extra) -> dict:
    """What `kolm_node.py KIND` would advertise, as Cluster.add_node arguments (one CPU each)."""
    spec = kinds[kind]
    resources = {k: (1.0 if v == "auto" else float(v)) for k, v in spec["resources"].items()}
    args = {"num_cpus": 1, "resources": resources, "labels": dict(spec["labels"])}
    # Ray's default agent port (52365) may be held by another Ray on this machine; the job server needs it
    args["dashboard_agent_listen_port"] = _free_port()
    if kind == "gpu":  # on a real RTX 5090 Ray detects these two itself
        args["num_gpus"] = 1
        args["resources"][f"accelerator_type:{RTX5090}"] = 1.0
    args.update(extra)
    return args


@pytest.fixture(scope="module")
def sim():
    """head + gpu + cpu + mac raylets on this machine, token auth on, dashboard (job server) on."""
    import ray
    from ray._private.authentication.authentication_token_generator import generate_new_authentication_token
    from ray._private.authentication_test_utils import reset_auth_token_state
    from ray.cluster_utils import Cluster

    saved = {k: os.environ.get(k) for k in ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "KOLM_ACCELERATOR_TYPE")}
    token = generate_new_authentication_token()
    os.environ.update({"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": token})
    reset_auth_token_state()  # this process read RAY_AUTH_MODE when ray was imported; read it again
    os.environ.pop("KOLM_ACCELERATOR_TYPE", None)
    kinds = kolm_node.load_kinds()
    # the train loop and deployments below live in this test module, which Ray workers cannot import
    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
    cluster = Cluster(
        initialize_head=True,
        head_node_args={
            **_node_args("head", kinds),
            "include_dashboard": True,
            "dashboard_port": _free_port(),
            # notice a lost node in ~2 s instead of ~30 s, so the drills stay short
            "_system_config": {"health_check_period_ms": 500, "health_check_failure_threshold": 4},
        },
    )
    nodes = {"head": cluster.head_node}
    for kind in ("gpu", "cpu", "mac"):
        nodes[kind] = cluster.add_node(**_node_args(kind, kinds))
    cluster.wait_for_nodes()
    ray.init(address=cluster.address, log_to_driver=False)
    try:
        yield {"cluster": cluster, "nodes": nodes, "kinds": kinds, "token": token}
    finally:
        try:
            from ray import serve

            serve.shutdown()
        except Exception:
            pass
        ray.shutdown()
        cluster.shutdown()
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        reset_auth_token_state()


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _kind_of(sim, node_id: str) -> str:
    for kind, node in sim["nodes"].items():
        if node.node_id == node_id:
            return kind
    return "?"


def _train_loop(config: dict) -> None:
    """A compile-shaped loop: resume from the last checkpoint, train, checkpoint every epoch."""
    import tempfile

    import ray.train
    import torch
    from safetensors.torch import load_file, save_file

    from kolm_ray.placement import pick_device

    torch.manual_seed(0)
    model = torch.nn.Linear(4, 1)
    start = 0
    ckpt = ray.train.get_checkpoint()
    if ckpt is not None:
        with ckpt.as_directory() as d:
            model.load_state_dict(load_file(os.path.join(d, "model.safetensors")))
            start = json.loads(Path(d, "state.json").read_text())["epoch"] + 1
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    x = torch.randn(64, 4, generator=torch.Generator().manual_seed(1))
    y = x @ torch.tensor([[1.0], [-2.0], [0.5], [3.0]])
    node = ray.get_runtime_context().get_node_id()
    for epoch in range(start, config["epochs"]):
        for _ in range(20):
            opt.zero_grad()
            loss = torch.nn.functional.mse_loss(model(x), y)
            loss.backward()
            opt.step()
        with tempfile.TemporaryDirectory() as d:
            save_file(model.state_dict(), os.path.join(d, "model.safetensors"))
            Path(d, "state.json").write_text(json.dumps({"epoch": epoch}))
            metrics = {"epoch": epoch, "loss": loss.item(), "start_epoch": start, "node_id": node}
            metrics["device"] = pick_device()
            ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(d))
        if config.get("marker_dir"):
            Path(config["marker_dir"], f"epoch{epoch}-{node}").touch()
        time.sleep(config.get("epoch_sleep_s", 0))


def _trainer(sim, tmp_path: Path, config: dict, *, max_failures: int = 0):
    import ray.train
    from ray.train.torch import TorchConfig, TorchTrainer

    use_gpu = placement.resolve_use_gpu(None)  # the cluster has a (logical) GPU: True
    return TorchTrainer(
        _train_loop,
        train_loop_config=config,
        scaling_config=placement.scaling_config(1, use_gpu),
        # the simulated GPU is logical: no CUDA, so gloo instead of nccl
        torch_config=TorchConfig(backend="gloo"),
        run_config=ray.train.RunConfig(
            storage_path=str(tmp_path / "ray_results"),
            failure_config=ray.train.FailureConfig(max_failures=max_failures),
        ),
    )


@pytest.mark.slow
def test_nodes_advertise_their_kind(sim) -> None:
    import ray

    by_id = {n["NodeID"]: n for n in ray.nodes() if n["Alive"]}
    for kind, node in sim["nodes"].items():
        info = by_id[node.node_id]
        assert info["Labels"][placement.NODE_KIND_LABEL] == kind
        for resource in sim["kinds"][kind]["resources"]:
            assert info["Resources"].get(resource, 0) >= 1, (kind, resource)
    assert placement.cluster_accelerator_types() == [RTX5090]


@pytest.mark.slow
def test_training_asks_for_gpus_and_the_pinned_accelerator(sim, monkeypatch) -> None:
    """Where the workers then land is asserted by the training drill below (it runs the real fit)."""
    assert placement.resolve_use_gpu(None) is True
    monkeypatch.setenv("KOLM_ACCELERATOR_TYPE", "H100")
    with pytest.raises(KolmError, match=RTX5090):  # a pin no node satisfies fails now, not never
        placement.scaling_config(1, True)
    monkeypatch.setenv("KOLM_ACCELERATOR_TYPE", RTX5090)
    sc = placement.scaling_config(1, True)
    assert sc.accelerator_type == RTX5090 and sc.resources_per_worker["GPU"] == 1


@pytest.mark.slow
def test_data_actors_take_whatever_capacity_is_free_a_mac_included(sim) -> None:
    """Featurize actors ask only for CPU: with head, gpu and cpu busy, they must land on the Mac."""
    import ray

    @ray.remote(num_cpus=1)
    class Busy:
        def ready(self) -> bool:
            return True

    busy = [
        Busy.options(label_selector={placement.NODE_KIND_LABEL: k}).remote() for k in ("head", "gpu", "cpu")
    ]
    ray.get([b.ready.remote() for b in busy])
    try:

        class Featurize:
            def __init__(self) -> None:
                self.node = ray.get_runtime_context().get_node_id()

            def __call__(self, batch: dict) -> dict:
                batch["node"] = [self.node] * len(batch["text"])
                batch["n_chars"] = [len(t) for t in batch["text"]]
                return batch

        ds = ray.data.from_items([{"text": f"query {i}"} for i in range(64)])
        rows = ds.map_batches(Featurize, batch_size=16, concurrency=1, num_cpus=1).take_all()
    finally:
        for b in busy:
            ray.kill(b)
    assert len(rows) == 64 and all(r["n_chars"] == len(r["text"]) for r in rows)
    assert {_kind_of(sim, r["node"]) for r in rows} == {"mac"}


def _where_app(name: str):  # a deployment that says where it runs
    from ray import serve

    @serve.deployment(name=name)
    class Where:
        def __call__(self, _request=None) -> dict:
            import ray

            return {"node_id": ray.get_runtime_context().get_node_id(), "device": placement.pick_device()}

    return Where


@pytest.mark.slow
def test_serve_replicas_go_where_ray_actor_options_say(sim) -> None:
    """One app, one deployment per placement style, deployed together (one wait instead of four)."""
    from ray import serve

    cases = {
        "OnMac": ({"num_cpus": 0, "resources": {"mps": 0.25}}, "mac"),
        "OnCpu": ({"num_cpus": 0, "label_selector": {placement.NODE_KIND_LABEL: "cpu"}}, "cpu"),
        "OnGpu": ({"num_cpus": 0, "num_gpus": 0.25}, "gpu"),
        "PreferGpu": (
            {
                "num_cpus": 0,
                "label_selector": {placement.NODE_KIND_LABEL: "gpu"},
                "fallback_strategy": [{"label_selector": {placement.NODE_KIND_LABEL: "mac"}}],
            },
            "gpu",
        ),
    }

    @serve.deployment(ray_actor_options={"num_cpus": 0})
    class Ingress:
        def __init__(self, **handles) -> None:
            self.handles = handles

        async def __call__(self, _request=None) -> dict:
            return {name: await h.remote() for name, h in self.handles.items()}

    serve.start(proxy_location="HeadOnly", http_options={"host": "127.0.0.1", "port": _free_port()})
    bound = {n: _where_app(n).options(ray_actor_options=opts).bind() for n, (opts, _) in cases.items()}
    handle = serve.run(Ingress.bind(**bound), name="placement", route_prefix="/placement")
    try:
        answers = handle.remote().result(timeout_s=60)
        for name, (_, kind) in cases.items():
            assert _kind_of(sim, answers[name]["node_id"]) == kind, name
    finally:
        serve.shutdown()  # the next Serve test starts its own, on its own port


@pytest.mark.slow
def test_job_submit_with_runtime_env_and_token(sim) -> None:
    """`ray job submit` as the README shows it: working_dir + env_vars, token required."""
    import httpx
    from ray.job_submission import JobStatus, JobSubmissionClient

    url = f"http://{sim['cluster'].head_node.address_info['webui_url']}"
    assert httpx.get(f"{url}/api/jobs/", timeout=10).status_code == 401  # no token, no jobs
    headers = {"Authorization": f"Bearer {sim['token']}"}
    assert httpx.get(f"{url}/api/jobs/", headers=headers, timeout=10).status_code == 200

    client = JobSubmissionClient(url)  # RAY_AUTH_MODE=token + RAY_AUTH_TOKEN in env: sends the token
    deadline = time.monotonic() + 120
    while True:  # the head's dashboard agent can take a while to come up on a loaded machine
        try:
            job = client.submit_job(
                entrypoint=f"{sys.executable} check.py && echo accel=$KOLM_ACCELERATOR_TYPE",
                runtime_env={"working_dir": str(CLUSTER_DIR), "env_vars": {"KOLM_ACCELERATOR_TYPE": RTX5090}},
            )
            break
        except RuntimeError as e:
            if "No available agent" not in str(e) or time.monotonic() > deadline:
                raise
            time.sleep(2)
    while client.get_job_status(job) not in {JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.STOPPED}:
        assert time.monotonic() < deadline, "job did not finish"
        time.sleep(1)
    logs = client.get_job_logs(job)
    assert client.get_job_status(job) == JobStatus.SUCCEEDED, logs
    report = json.loads(logs[logs.index("{") : logs.rindex("}") + 1])
    assert {_kind_of(sim, node) for node in report["tasks"].values()} == {"head", "gpu", "cpu", "mac"}
    for kind, node in report["tasks"].items():
        assert _kind_of(sim, node) == kind
    assert f"accel={RTX5090}" in logs


# ---------------------------------------------------------------- drills (slow; they remove nodes, so last)


@pytest.fixture(scope="module")
def tagger_artifact(tmp_path_factory) -> Path:
    """The serve tests' signed tagger; the same path as tests/test_recall.py, so one suite builds it once."""
    import recall_artifact

    return recall_artifact.build(tmp_path_factory.getbasetemp() / "recall-artifact")


@pytest.mark.slow
def test_drill_replica_node_lost_router_keeps_answering(sim, tagger_artifact, tmp_path) -> None:
    """The recall router with two tagger replicas, on the mac and the cpu node; the mac goes away.

    Every request still gets a 200 in the contract's shape (narrow from the surviving replica, or broad
    with a reason while Serve notices), never an error.
    """
    import hashlib

    import httpx
    import recall_artifact
    from ray import serve
    from ray.util.state import list_actors

    from deployments.recall import NamespaceTagger, RecallIngress

    tenants = tmp_path / "tenants.yaml"
    key = "drill-key"
    tenants.write_text(
        yaml.safe_dump(
            {
                "tenants": {
                    "acme": {
                        "key_sha256": hashlib.sha256(key.encode()).hexdigest(),
                        "namespaces": recall_artifact.NAMESPACES,
                    }
                }
            }
        )
    )
    port = _free_port()
    serve.start(proxy_location="HeadOnly", http_options={"host": "127.0.0.1", "port": port})
    tagger = NamespaceTagger.options(
        num_replicas=2,
        autoscaling_config=None,
        max_replicas_per_node=1,
        ray_actor_options={
            "num_cpus": 0,
            "label_selector": {placement.NODE_KIND_LABEL: "in(mac,cpu)"},
            "runtime_env": {
                "env_vars": {"KOLM_SIGNING_KEY": recall_artifact.SIGNING_KEY, "KOLM_SERVE_THREADS": "1"}
            },
        },
    ).bind(str(tagger_artifact))
    # the ingress stays on the head: with no selector it may land on the Mac and go down with it
    ingress = RecallIngress.options(
        ray_actor_options={"num_cpus": 0, "label_selector": {placement.NODE_KIND_LABEL: "head"}}
    )
    # use_student=False: every query goes to the tagger replicas, whose node this drill takes away
    app = ingress.bind(tagger, str(tenants), 0.0, 2000.0, str(tagger_artifact), use_student=False)
    serve.run(app, name="recall-drill", route_prefix="/")
    url = f"http://127.0.0.1:{port}/v1/recall/route"
    queries = [r["input"] for r in recall_artifact.pairs()[:8]]
    try:
        alive = list_actors(filters=[("state", "=", "ALIVE")], detail=True)
        replicas = [a for a in alive if "NamespaceTagger" in (a.class_name or "")]
        assert {_kind_of(sim, a.node_id) for a in replicas} == {"mac", "cpu"}
        with httpx.Client(timeout=30, headers={"Authorization": f"Bearer {key}"}) as client:
            log: list[dict] = []

            def ask(q: str) -> dict:
                r = client.post(url, json={"query": q})
                assert r.status_code == 200, (len(log), r.text)
                body = r.json()
                assert body["mode"] in ("narrow", "broad")
                log.append(body)
                return body

            deadline = time.monotonic() + 90
            while "reason" in ask(queries[0]):  # warm: wait for a tagger answer
                assert time.monotonic() < deadline, "the tagger never answered"
                time.sleep(0.5)
            sim["cluster"].remove_node(sim["nodes"].pop("mac"), allow_graceful=False)
            answers = [ask(queries[i % len(queries)]) for i in range(60)]
        assert sum(a["mode"] == "narrow" and "reason" not in a for a in answers[-10:]) == 10
    finally:
        serve.shutdown()


@pytest.mark.slow
def test_drill_node_lost_mid_training_resumes_from_checkpoint(sim, tmp_path, monkeypatch) -> None:
    """Two gpu-kind nodes; the one training dies after its first checkpoint; the other resumes from it."""
    monkeypatch.setenv("KOLM_ACCELERATOR_TYPE", RTX5090)
    sim["nodes"]["gpu-b"] = sim["cluster"].add_node(**_node_args("gpu", sim["kinds"]))
    sim["cluster"].wait_for_nodes()
    markers = tmp_path / "markers"
    markers.mkdir()
    config = {"epochs": 4, "marker_dir": str(markers), "epoch_sleep_s": 1.5}
    trainer = _trainer(sim, tmp_path, config, max_failures=2)
    outcome: dict = {}
    fit = threading.Thread(target=lambda: outcome.update(result=trainer.fit()), daemon=True)
    fit.start()
    deadline = time.monotonic() + 120
    # the node dies once epoch 1 ran and the controller has registered a checkpoint (its snapshot is on disk)
    while not (
        list(markers.glob("epoch1-*"))
        and list(tmp_path.glob("ray_results/*/checkpoint_manager_snapshot.json"))
    ):
        assert time.monotonic() < deadline and fit.is_alive(), "training never reached epoch 1"
        time.sleep(0.2)
    first_node = next(markers.glob("epoch1-*")).name.split("-", 1)[1]
    victim = next(k for k, n in sim["nodes"].items() if n.node_id == first_node)
    assert victim in ("gpu", "gpu-b")  # compile workers ask for a GPU and the RTX 5090 type: gpu kind only
    sim["cluster"].remove_node(sim["nodes"].pop(victim), allow_graceful=False)
    fit.join(timeout=180)
    assert not fit.is_alive(), "training did not finish after the node loss"
    result = outcome["result"]
    assert result.error is None
    assert result.metrics["epoch"] == 3 and result.metrics["node_id"] != first_node
    assert result.metrics["start_epoch"] >= 1  # resumed from a checkpoint, not from scratch
    survivors = {p.name.split("-", 1)[1] for p in markers.iterdir()} - {first_node}
    assert survivors == {result.metrics["node_id"]}
    assert _kind_of(sim, result.metrics["node_id"]) in ("gpu", "gpu-b")
    assert result.metrics["device"] == "cpu"  # logical GPU, no CUDA: pick_device falls through to cpu
    assert result.metrics["loss"] < 1.0  # it trained (the target is linear, the start loss is ~10)
