"""`kolm cluster` and `kolm recipe` read through the store: a PostgreSQL store gives the same clusters and
the same recipe as SQLite for the same observations (slow: Ray and a PostgreSQL server)."""

from __future__ import annotations

import json
import random
import re

import pytest
import recipe_data as rd

from kolm_ray.cli import main
from kolm_ray.observations.model import Observation
from kolm_ray.observations.store import open_store

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def ray_local():
    import ray
    import ray.data

    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    # Blocks leave the featurize pool as they finish; the fit's sample follows that order. Keeping the
    # order makes a run a function of the rows read, which is what is compared here.
    ctx = ray.data.DataContext.get_current()
    before, ctx.execution_options.preserve_order = ctx.execution_options.preserve_order, True
    yield
    ctx.execution_options.preserve_order = before
    ray.shutdown()


@pytest.fixture(scope="module")
def observations() -> list[Observation]:
    rng = random.Random(0)
    cat, _ = rd.categorical(240, noise=0.1, seed=1)
    for o in cat:  # task A: an intent classifier behind its own system prompt (dates vary)
        o["request"]["messages"][0]["content"] = (
            f"Classify the request. Today is 2024-05-{rng.randint(1, 28):02d}."
        )
    rows = cat + [{**o, "id": "x" + o["id"]} for o in rd.extractive(160, seed=2)]
    rows.append({**rows[0], "id": "err-1", "verified": False, "output": {"error": "upstream 500"}})
    return [Observation(**{**r, "namespace": "support"}) for r in rows]


@pytest.fixture(scope="module")
def stores(observations, pg_server, tmp_path_factory) -> dict[str, str]:
    urls = {
        "sqlite": f"sqlite:///{tmp_path_factory.mktemp('store') / 'obs.db'}",
        "postgresql": pg_server.create_database("pipeline"),
    }
    for url in urls.values():
        with open_store(url) as s:
            s.append_many(observations)
    return urls


def test_cluster_on_postgres_equals_sqlite(ray_local, stores, capsys):
    docs = {}
    for name, url in stores.items():
        assert (
            main(["cluster", "--namespace", "support", "--store", url, "--json", "--num-workers", "2"]) == 0
        )
        doc = json.loads(capsys.readouterr().out)
        doc.pop("timings")
        docs[name] = doc
    assert docs["sqlite"]["rows"] == 401 and [c["size"] for c in docs["sqlite"]["clusters"]] == [241, 160]
    for a, b in zip(docs["sqlite"]["clusters"], docs["postgresql"]["clusters"], strict=True):
        assert {k: (v, b.get(k)) for k, v in a.items() if b.get(k) != v} == {}
    assert docs["postgresql"] == docs["sqlite"]


def test_recipe_on_postgres_equals_sqlite(ray_local, stores, tmp_path, capsys):
    # The embedder both runs use, built once up front: a build that fails under load falls back to
    # PyTorch's fp32 MiniLM, whose slightly different vectors would flag other pairs in one run only.
    from kolm_ray.clustering.featurize import onnx_model_path

    assert onnx_model_path() is not None
    written = {}
    for name, url in stores.items():
        out = tmp_path / name
        assert main(["recipe", "--namespace", "support", "--store", url, "--out", str(out)]) == 0
        capsys.readouterr()
        files = {p.name: p.read_text() for p in sorted(out.rglob("*")) if p.is_file()}
        diagnostics = json.loads(files["diagnostics.json"])
        assert diagnostics.pop("created_at")  # the one field that is the time of the run
        files["diagnostics.json"] = json.dumps(diagnostics, sort_keys=True)
        written[name] = {k: v.replace(str(out), "OUT") for k, v in files.items()}  # where it was written
        # the lineage names its store's scheme (sqlite / postgresql): the one thing that must differ
        written[name]["recipe.yaml"] = re.sub(
            r'"store": "(sqlite|postgresql)"', '"store": "SCHEME"', written[name]["recipe.yaml"]
        )
    assert {"pairs.jsonl", "spec.json", "diagnostics.json", "recipe.yaml"} <= written["sqlite"].keys()
    assert len(written["sqlite"]["pairs.jsonl"].splitlines()) == 240  # the rejected call is dropped
    assert written["postgresql"].keys() == written["sqlite"].keys()
    for f, text in written["sqlite"].items():
        assert written["postgresql"][f] == text, f"{f} differs between the backends"
