"""Check a kolm-ray cluster: nodes by kind, one task per kind, optionally one placed Train worker.

    ray job submit --working-dir . -- python cluster/check.py            # on a running cluster
    ray job submit --working-dir . -- python cluster/check.py --train    # + a compile-shaped Train worker
    RAY_ADDRESS=auto python cluster/check.py                             # from a node of the cluster

Prints one JSON object: {"nodes": [...], "tasks": {kind: node_id}, "train": {...}}; exits 1 when a node
has no kolm.io/node-kind label or a kind's task could not be placed.
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import ray

NODE_KIND_LABEL = "kolm.io/node-kind"


@ray.remote(num_cpus=0)
def _where() -> dict:
    ctx = ray.get_runtime_context()
    return {"node_id": ctx.get_node_id()}


def nodes_by_kind() -> list[dict]:
    """Alive nodes with their kind, resources and labels."""
    out = []
    for n in ray.nodes():
        if not n.get("Alive"):
            continue
        labels = n.get("Labels") or {}
        out.append(
            {
                "node_id": n["NodeID"],
                "ip": n.get("NodeManagerAddress"),
                "kind": labels.get(NODE_KIND_LABEL),
                "accelerator_type": labels.get("ray.io/accelerator-type"),
                "resources": {k: v for k, v in n["Resources"].items() if not k.startswith("node:")},
                "labels": {k: v for k, v in labels.items() if k != "ray.io/node-id"},
            }
        )
    return out


def task_per_kind(kinds: set[str], timeout_s: float = 60.0) -> dict[str, str | None]:
    """Run a zero-CPU task on each kind (label selector) and return the node it ran on."""
    refs = {k: _where.options(label_selector={NODE_KIND_LABEL: k}).remote() for k in sorted(kinds)}
    out: dict[str, str | None] = {}
    deadline = time.monotonic() + timeout_s
    for kind, ref in refs.items():
        try:
            out[kind] = ray.get(ref, timeout=max(1.0, deadline - time.monotonic()))["node_id"]
        except ray.exceptions.GetTimeoutError:
            out[kind] = None
    return out


def train_once() -> dict:
    """One Ray Train worker placed exactly as `kolm compile` places its workers."""
    from ray.train.torch import TorchTrainer

    from kolm_ray import placement

    use_gpu = placement.resolve_use_gpu(None)

    def loop() -> None:
        import ray.train

        ray.train.report(
            {"node_id": ray.get_runtime_context().get_node_id(), "device": placement.pick_device()}
        )

    result = TorchTrainer(loop, scaling_config=placement.scaling_config(1, use_gpu)).fit()
    return {"use_gpu": use_gpu, **(result.metrics or {})}


def main(argv: list[str] | None = None) -> int:
    """Connect (RAY_ADDRESS, as `ray job submit` sets it), report, and exit 0 when every kind answers."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--train", action="store_true", help="also run one placed Ray Train worker")
    args = p.parse_args(argv)
    ray.init(address="auto", log_to_driver=False)
    nodes = nodes_by_kind()
    kinds = {n["kind"] for n in nodes if n["kind"]}
    report = {"nodes": nodes, "tasks": task_per_kind(kinds)}
    if args.train:
        report["train"] = train_once()
    print(json.dumps(report, indent=2, sort_keys=True))
    unlabelled = [n["node_id"] for n in nodes if not n["kind"]]
    unplaced = [k for k, v in report["tasks"].items() if v is None]
    if unlabelled or unplaced:
        print(
            f"problems: unlabelled nodes {unlabelled}, kinds without a placed task {unplaced}",
            file=sys.stderr,
        )
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
