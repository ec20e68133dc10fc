"""Follow a namespace's live model from a long-lived process (a Serve replica): `artifact: registry:NS`.

    path = live_artifact("support")                       # the registry's verified copy of NS's live model
    follower = RegistryFollower("support", current=path, on_change=replica.reload)   # polls ~1 s

The replica keeps answering with the model it has while `on_change(path)` builds the next one on the
follower's thread; the replica swaps it in by assignment, so no request waits for a load or fails during
one. The store is the one the replica's environment names (KOLM_STORE, else $KOLM_HOME/observations.db):
on a cluster, give the Serve application the same `runtime_env: {env_vars: {KOLM_STORE: ...}}`.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable

from kolm_ray.errors import KolmError

PREFIX = "registry:"
POLL_S = 1.0
log = logging.getLogger("kolm.registry")


def registry_namespace(artifact: str) -> str | None:
    """NS for `registry:NS`, else None (a plain path)."""
    return artifact[len(PREFIX) :] if artifact.startswith(PREFIX) else None


def _live(namespace: str):
    from kolm_ray import registry
    from kolm_ray.observations.store import open_store

    store = open_store()
    try:
        return registry.live_models(store).get(namespace)
    finally:
        store.close()


def live_artifact(namespace: str) -> str:
    """The path of NS's live model, checked (file present, unchanged, verifies); KolmError otherwise."""
    from kolm_ray import registry

    row = _live(namespace)
    if row is None:
        raise KolmError(
            f"registry:{namespace}: no live model; run `kolm models promote X.kolm --namespace {namespace}`"
        )
    problem = registry.check_file(row)
    if problem is not None:
        raise KolmError(f"registry:{namespace}: {problem}")
    return row.path


class RegistryFollower:
    """A daemon thread that calls `on_change(path)` when NS's live model changes (and verifies)."""

    def __init__(
        self, namespace: str, current: str, on_change: Callable[[str], None], poll_s: float = POLL_S
    ):
        self.namespace = namespace
        self.current = current
        self.on_change = on_change
        self.poll_s = poll_s
        self.problem: str | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"kolm-follow-{namespace}", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(self.poll_s):
            try:
                path = live_artifact(self.namespace)
                if path != self.current:
                    self.on_change(path)  # builds and swaps; the old model serves until then
                    log.info("registry:%s now serves %s", self.namespace, path)
                    self.current = path
                self.problem = None
            except Exception as e:  # keep serving the loaded model; say why it did not move
                self.problem = f"{type(e).__name__}: {e}"

    def stop(self) -> None:
        self._stop.set()
