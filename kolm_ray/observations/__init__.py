"""Observations: what the capture proxy records and every later stage reads.

from kolm_ray.observations import Observation, open_store
store = open_store()                       # $KOLM_STORE, else SQLite at $KOLM_HOME/observations.db
for batch in store.iter_observations("support"): ...
"""

from kolm_ray.observations.model import Observation
from kolm_ray.observations.store import Store, open_store

__all__ = ["Observation", "Store", "open_store"]
