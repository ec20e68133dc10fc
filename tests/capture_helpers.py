"""What the capture proxy tests share: the clients' keys, the question and its answer, a stored-row check."""

from __future__ import annotations

import json

from kolm_ray.demo.simulate import SYSTEM_PROMPT, frontier_answer

OPENAI_KEY = "sk-test-" + "q" * 40
ANTHROPIC_KEY = "sk-ant-test-" + "z" * 40


def msgs(q: str) -> list[dict]:
    return [{"role": "system", "content": SYSTEM_PROMPT}, {"role": "user", "content": q}]


Q = "hey team, how do I restart the ingest worker in prod?"
A = frontier_answer(Q)


def check(o, provider: str, stream: bool = False) -> None:
    assert o.provider == provider and o.input == Q and o.output == json.loads(A)
    assert o.status == 200 and o.verified is None and o.tenant == "acme" and o.latency_ms > 0
    assert o.request["messages"][-1]["content"] == Q and bool(o.request.get("stream")) is stream
    assert o.usage
