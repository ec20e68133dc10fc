"""A stand-in for the frontier API, and the workload it answers: namespaced support queries.

    url, stop = start_upstream_in_thread(latency_ms=20)      # speaks OpenAI and Anthropic, SSE too
    items = generate_workload(500, seed=0)                    # [WorkItem(namespace, query, label)]
    # client.chat.completions.create(model="gpt-4o-mini", messages=[
    #     {"role": "system", "content": SYSTEM_PROMPT}, {"role": "user", "content": items[0].query}])
    #     -> '{"namespace": "runbooks"}'  (== items[0].label)
    stop()

    python -m kolm_ray.demo.simulate upstream --port 9100 --latency-ms 20    # as its own process
    python -m kolm_ray.demo.simulate workload -n 5 --seed 0                  # JSON lines
    python -m kolm_ray.demo.simulate traffic --proxy http://127.0.0.1:8700   # through kolm capture

workload.py builds queries from templates around namespace-specific topic phrases; the upstream
(upstream.py) labels a query with `frontier_label`, the same deterministic function the generator
uses, so no lookup table or shared seed is needed. `noise` (default 2%) flips a hash-chosen few labels to another namespace: the
"frontier" is consistently wrong on those queries, as real ones are, which caps a tagger's K-score.

Upstream knobs (per request): header `x-sim-status: 429` or model `sim-error-429` answers that error in
the provider's shape; `x-sim-latency-ms`; `x-sim-chunk-delay-ms` (between SSE events); model
`sim-stream-cut` breaks the stream after two events (an upstream dying mid-answer).
"""

from kolm_ray.demo.simulate.traffic import DEMO_NAMESPACE, send_traffic
from kolm_ray.demo.simulate.upstream import (
    make_upstream_app,
    run_upstream,
    serve_in_thread,
    start_upstream_in_thread,
)
from kolm_ray.demo.simulate.workload import (
    NAMESPACES,
    SYSTEM_PROMPT,
    UNKNOWN,
    WorkItem,
    frontier_answer,
    frontier_label,
    generate_workload,
    true_namespace,
)

__all__ = [
    "DEMO_NAMESPACE",
    "NAMESPACES",
    "SYSTEM_PROMPT",
    "UNKNOWN",
    "WorkItem",
    "frontier_answer",
    "frontier_label",
    "generate_workload",
    "make_upstream_app",
    "run_upstream",
    "send_traffic",
    "serve_in_thread",
    "start_upstream_in_thread",
    "true_namespace",
]
