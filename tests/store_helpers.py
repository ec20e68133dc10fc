"""What the store tests share: a numbered observation to append."""

from __future__ import annotations

from kolm_ray.observations.model import Observation


def obs(i: int, ns: str = "support", **kw) -> Observation:
    return Observation(
        namespace=ns, provider="import", input=f"query {i}", output={"namespace": f"n{i % 3}"}, **kw
    )
