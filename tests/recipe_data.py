"""Generated observation sets for the recipe and clustering tests (deterministic, no network, no dataset)."""

from __future__ import annotations

import itertools
import random
from typing import Any

INTENTS: dict[str, list[str]] = {
    "billing": [
        "why was my card charged twice for the {p} plan",
        "I see an unexpected charge of {n} dollars on my {p} invoice",
        "can you explain the {p} bill I got this {t}",
        "my {p} subscription invoice looks wrong this {t}",
    ],
    "outage": [
        "the {p} service is down since {t}, nothing loads",
        "{p} keeps timing out with error {n}",
        "is there an outage on {p} right now? it fails every request",
        "our {p} dashboard shows 500 errors since {t}",
    ],
    "password": [
        "I forgot my password for {p}, how do I reset it",
        "the {p} login says my password is wrong after {n} tries",
        "how can I change the password on my {p} account",
        "locked out of {p} after resetting the password this {t}",
    ],
    "shipping": [
        "where is my {p} order, it was due {t}",
        "tracking number {n} for the {p} hasn't moved",
        "can I change the delivery address for my {p} shipment",
        "the {p} package arrived damaged {t}",
    ],
    "cooking": [
        "how long should I roast a {p} at {n} degrees",
        "what can I cook tonight with {p} and rice",
        "give me a quick recipe that uses {p} for {t}",
        "can I substitute butter in a {p} cake",
    ],
}
FILL = {
    "p": ["pro", "basic", "team", "enterprise", "mobile", "analytics", "storage", "email", "cloud", "family",
          "premium", "starter", "api", "billing portal", "chicken", "salmon", "pumpkin", "tofu", "lamb", "carrot"],
    "t": ["morning", "monday", "yesterday", "last week", "friday", "tonight", "this weekend", "noon"],
    "n": [str(i) for i in (3, 5, 12, 42, 99, 120, 180, 220, 404, 503, 1200, 7781)],
}  # fmt: skip


def queries(intent: str, k: int, rng: random.Random) -> list[str]:
    """k distinct queries for an intent (templates x fillers, shuffled)."""
    out = []
    for template in INTENTS[intent]:
        keys = [key for key in "ptn" if "{" + key + "}" in template]
        for combo in itertools.product(*(FILL[key] for key in keys)):
            out.append(template.format(**dict(zip(keys, combo, strict=True))))
    rng.shuffle(out)
    return out[:k]


def obs(i: int, text: str, output: Any, verified: bool | None = True, system: str | None = None) -> dict:
    request = {
        "messages": ([{"role": "system", "content": system}] if system else [])
        + [{"role": "user", "content": text}]
    }
    return {"id": f"obs-{i:05d}", "namespace": "test", "input": text, "output": output, "verified": verified,
            "request": request}  # fmt: skip


def categorical(
    n: int = 400, noise: float = 0.0, field: str = "intent", seed: int = 0, intents=None
) -> tuple[list, int]:
    """{field: intent} outputs, `noise` of them flipped to another intent; returns (observations, flips)."""
    rng = random.Random(seed)
    intents = intents or list(INTENTS)
    per = n // len(intents)
    rows = [(q, it) for it in intents for q in queries(it, per, rng)]
    rng.shuffle(rows)
    n_flip = round(noise * len(rows))
    flip = set(rng.sample(range(len(rows)), n_flip))
    out = []
    for i, (q, it) in enumerate(rows):
        label = rng.choice([x for x in intents if x != it]) if i in flip else it
        out.append(obs(i, q, {field: label}, system="Classify the request. Answer JSON."))
    return out, n_flip


def extractive(n: int = 300, seed: int = 1) -> list[dict]:
    """{"order_id": <substring of the input>, "priority": high|low}."""
    rng = random.Random(seed)
    out = []
    for i in range(n):
        oid = f"ORD-{rng.randint(10000, 99999)}"
        text = rng.choice(
            [f"please look up order {oid}, it is late", f"status for {oid}?", f"my package {oid} never arrived",
             f"cancel {oid} right away please", f"I want a refund for {oid}"]
        )  # fmt: skip
        urgent = rng.random() < 0.4
        text = ("URGENT!! " if urgent else "") + text
        out.append(obs(i, text, {"order_id": oid, "priority": "high" if urgent else "low"}))
    return out


def mixed(n: int = 300, seed: int = 2) -> list[dict]:
    """Categorical + extractive + numeric + a confidence field."""
    rng = random.Random(seed)
    intents = list(INTENTS)[:4]
    out = []
    for i in range(n):
        it = intents[i % 4]
        q = queries(it, 40, rng)[i % 40] + f" (ticket T{1000 + i})"
        out.append(obs(i, q, {"intent": it, "ticket": f"T{1000 + i}", "urgency": rng.randint(1, 5),
                             "confidence": round(rng.uniform(0.6, 1.0), 2)}))  # fmt: skip
    return out


def text_outputs(n: int = 300, seed: int = 3) -> list[dict]:
    """Free-text answers (non-JSON)."""
    rng = random.Random(seed)
    out = []
    for i in range(n):
        it = list(INTENTS)[i % 5]
        q = queries(it, 60, rng)[i % 60]
        out.append(
            obs(i, q, f"Thanks for asking about {it} ({i}). Here is what to do: step {rng.randint(1, 9)}.")
        )
    return out


def no_common_shape(n: int = 300, seed: int = 4) -> list[dict]:
    rng = random.Random(seed)
    shapes = [
        lambda i: {"a": i},
        lambda i: [i, i + 1],
        lambda i: {"b": str(i)},
        lambda i: i * 1.5,
        lambda i: {"c": True},
    ]
    return [obs(i, f"request number {i} about {rng.choice(FILL['p'])}", shapes[i % 5](i)) for i in range(n)]
