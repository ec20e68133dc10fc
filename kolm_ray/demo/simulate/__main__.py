"""`python -m kolm_ray.demo.simulate upstream|workload|traffic`: the stand-in upstream as a process, the
queries as JSON lines, or the queries sent through a `kolm capture` proxy with the openai SDK."""

from __future__ import annotations

import argparse
import json
import os

from kolm_ray.demo.simulate.traffic import DEMO_NAMESPACE, traffic_command
from kolm_ray.demo.simulate.upstream import run_upstream
from kolm_ray.demo.simulate.workload import generate_workload


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m kolm_ray.demo.simulate", description="stand-in frontier API and workload"
    )
    sub = p.add_subparsers(dest="cmd", required=True)
    up = sub.add_parser("upstream", help="run the stand-in frontier API")
    up.add_argument("--host", default="127.0.0.1")
    up.add_argument("--port", type=int, default=9100)
    up.add_argument("--latency-ms", type=float, default=0.0, help="time before each answer (ms)")
    up.add_argument("--chunk-delay-ms", type=float, default=0.0, help="time between SSE events (ms)")
    up.add_argument("--noise", type=float, default=0.02, help="fraction of labels the frontier gets wrong")
    wl = sub.add_parser("workload", help="print generated queries as JSON lines")
    wl.add_argument("-n", type=int, default=10)
    wl.add_argument("--seed", type=int, default=0)
    wl.add_argument("--noise", type=float, default=0.02)
    tr = sub.add_parser("traffic", help="send support queries through a kolm capture proxy (openai SDK)")
    tr.add_argument("--proxy", default="http://127.0.0.1:8700", help="the proxy's root URL")
    tr.add_argument("--calls", type=int, default=200)
    tr.add_argument("--namespace", default=DEMO_NAMESPACE, help="X-Kolm-Namespace of every call")
    tr.add_argument("--seed", type=int, default=1, help="workload seed (make demo's capture uses 0)")
    tr.add_argument("--threads", type=int, default=16, help="calls in flight")
    tr.add_argument(
        "--key", default=None, help="the team's capture key, sent as X-Kolm-Key (default $KOLM_KEY)"
    )
    args = p.parse_args(argv)
    if args.cmd == "traffic":
        return traffic_command(
            args.proxy,
            args.calls,
            args.namespace,
            args.seed,
            args.threads,
            args.key or os.environ.get("KOLM_KEY"),
        )
    if args.cmd == "upstream":
        run_upstream(args.host, args.port, args.latency_ms, args.chunk_delay_ms, args.noise)
    else:
        for item in generate_workload(args.n, args.seed, args.noise):
            print(json.dumps(item._asdict()))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
