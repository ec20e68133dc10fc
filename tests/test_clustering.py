"""Clustering: structural signals, the cluster fit, the MiniLM embedder, and the Ray Data pipeline (slow).

The static embedder, its cache and the MiniLM-confirmed split search: tests/test_cluster_static.py."""

from __future__ import annotations

import json
import random

import numpy as np
import pytest
import recipe_data as rd

from kolm_ray.clustering import (
    STATIC_DIMS,
    ClusterModel,
    MiniLMEmbedder,
    embed_texts,
    fit_clusters,
    format_table,
    output_shape,
    response_format,
    structural_fingerprint,
    system_prompt,
)
from kolm_ray.errors import KolmError


def test_system_prompt_and_format_from_openai_and_anthropic_requests():
    openai = {"messages": [{"role": "system", "content": "Tag it."}, {"role": "user", "content": "hi"}],
              "response_format": {"type": "json_schema", "json_schema": {"schema": {"properties": {"b": {}, "a": {}}}}}}  # fmt: skip
    anthropic = {
        "system": [{"type": "text", "text": "Tag it."}],
        "messages": [{"role": "user", "content": "hi"}],
    }
    assert system_prompt(openai) == system_prompt(anthropic) == "Tag it."
    assert response_format(openai) == "json_schema|a,b"
    assert system_prompt(None) == "" and response_format({}) == ""
    assert (
        output_shape({"b": 1, "a": 2}) == "object{a,b}"
        and output_shape("x") == "text"
        and output_shape(1.5) == "number"
    )


def test_fingerprint_ignores_digits_and_separates_prompts_and_shapes():
    day = lambda d: {"system": f"Classify banking requests. Today is 2024-05-{d:02d}."}  # noqa: E731
    assert structural_fingerprint(day(1), {"intent": "x"}) == structural_fingerprint(day(17), {"intent": "y"})
    assert structural_fingerprint(day(1), {"intent": "x"}) != structural_fingerprint(day(1), {"domain": "x"})
    assert structural_fingerprint(day(1), {"intent": "x"}) != structural_fingerprint(
        {"system": "Route it."}, {"intent": "x"}
    )


def _blob(center: np.ndarray, n: int, spread: float, rng) -> np.ndarray:
    x = center + spread * rng.standard_normal((n, len(center)))
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def test_fit_chooses_k_from_the_data():
    rng = np.random.default_rng(0)
    a, b = np.eye(384)[0], np.eye(384)[1]
    one = _blob(a, 300, 0.03, rng)
    two = np.vstack([_blob(a, 200, 0.03, rng), _blob(b, 150, 0.03, rng)])
    m1 = fit_clusters(one, np.array(["f"] * 300))
    m2 = fit_clusters(two, np.array(["f"] * 350))
    assert len(m1.ids) == 1 and len(m2.ids) == 2
    # the same two input groups answered from one vocabulary (high/low) are one task
    shared = np.array(["high", "low"] * 175)
    assert len(fit_clusters(two, np.array(["f"] * 350), shared).ids) == 1
    assert len(fit_clusters(two, np.array(["f"] * 350), np.array(["a"] * 200 + ["b"] * 150)).ids) == 2
    # a structural fingerprint always separates, even with identical embeddings
    m3 = fit_clusters(np.vstack([one, one]), np.array(["f"] * 300 + ["g"] * 300))
    assert len(m3.ids) == 2
    assigned = m3.assign(one[:5], np.array(["g"] * 5))
    assert set(assigned) == {m3.ids[m3.fingerprints.index("g")]}


def test_assign_unknown_fingerprint_goes_to_nearest():
    m = ClusterModel(np.eye(384, dtype=np.float32)[:2], ["f", "g"], [0, 1])
    e = np.eye(384, dtype=np.float32)[[1, 0]]
    assert m.assign(e, np.array(["new", "f"])).tolist() == [1, 0]


def test_embedder_onnx_matches_torch():
    texts = ["where is my order", "reset my password please", "the api is down"]
    onnx = embed_texts(texts)
    torch_emb = MiniLMEmbedder(backend="torch")(texts)
    assert onnx.shape == (3, 384) and np.allclose(np.linalg.norm(onnx, axis=1), 1, atol=1e-4)
    assert float((onnx * torch_emb).sum(axis=1).min()) > 0.9  # int8 weights: close to the fp32 model
    sims = onnx @ onnx.T
    assert sims[0, 1] < 0.9 and sims[0, 0] > 0.99


def test_embedder_embeds_a_repeated_input_once(monkeypatch):
    embedder = MiniLMEmbedder()
    seen: list[str] = []
    real = embedder._embed
    monkeypatch.setattr(embedder, "_embed", lambda texts: seen.extend(texts) or real(texts))
    texts = ["where is my order", "the api is down", "where is my order", "where is my order"]
    out = embedder(texts)
    assert sorted(seen) == ["the api is down", "where is my order"]
    assert np.array_equal(out[0], out[2]) and np.array_equal(out[0], out[3])
    assert np.allclose(out, embedder(["where is my order", "the api is down"])[[0, 1, 0, 0]])


def test_featurizer_reads_a_verified_column_with_no_value_at_all():
    from kolm_ray.clustering import Featurizer

    batch = {
        "input": np.array(["where is my order", "reset my password"], dtype=object),
        "output": np.array(['{"intent": "order"}', '{"intent": "password"}'], dtype=object),
        "request": np.array([None, None], dtype=object),
        # what Ray Data's read_sql yields for a shard where every `verified` is NULL (checked on Ray 2.60)
        "verified": np.array([np.nan, np.nan], dtype=np.float32),
    }
    featurizer = Featurizer(embedder="minilm")  # the static default: tests/test_cluster_static.py
    out = featurizer(dict(batch))
    assert out["rejected"].tolist() == [False, False]
    mixed = featurizer({**batch, "verified": np.array([0.0, np.nan], dtype=np.float32)})
    assert mixed["rejected"].tolist() == [True, False]


# ---- the Ray Data pipeline ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def ray_local():
    import ray

    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def store_url(tmp_path_factory):
    from kolm_ray.observations.model import Observation
    from kolm_ray.observations.store import open_store

    rng = random.Random(0)
    url = f"sqlite:///{tmp_path_factory.mktemp('store') / 'obs.db'}"
    cat, _ = rd.categorical(300, noise=0.1, seed=1)
    ext = rd.extractive(200, seed=2)
    rows = []
    for o in cat:  # task A: an intent classifier behind its own system prompt (dates vary)
        o["request"]["messages"][0]["content"] = (
            f"Classify the request. Today is 2024-05-{rng.randint(1, 28):02d}."
        )
        rows.append(o)
    for o in ext:  # task B: an extractor, no system prompt
        rows.append({**o, "id": "x" + o["id"]})
    rows.append({**rows[0], "id": "err-1", "verified": False, "output": {"error": "upstream 500"}})
    store = open_store(url)
    store.append_many([Observation(**{**r, "namespace": "support"}) for r in rows])
    store.close()
    return url


@pytest.mark.slow
def test_ray_pipeline_recovers_tasks_and_summarizes(ray_local, store_url, capsys):
    from sklearn.metrics import adjusted_rand_score

    from kolm_ray.cli import main
    from kolm_ray.clustering import cluster_members, cluster_namespace

    result = cluster_namespace(store_url, "support", num_workers=2)
    assert result.rows == 501 and len(result.clusters) == 2
    big, small = result.clusters
    assert big["size"] == 301 and small["size"] == 200 and big["rejected"] == 1
    assert 0.8 <= big["purity"] <= 1.0 and small["purity"] >= 0.95
    assert len(big["top_examples"]) == 3 and "intent" in big["top_examples"][0]["output"]
    members, emb = cluster_members(result, big["id"])
    assert len(members) == 301 and emb.shape == (301, STATIC_DIMS)  # the static vectors, for the recipe
    truth = [m["id"].startswith("x") for m in members]
    assert not any(truth)
    all_ids = [m["id"] for c in result.clusters for m in cluster_members(result, c["id"])[0]]
    labels = [c["id"] for c in result.clusters for _ in range(c["size"])]
    assert adjusted_rand_score([i.startswith("x") for i in all_ids], labels) == 1.0

    assert (
        main(["cluster", "--namespace", "support", "--store", store_url, "--json", "--num-workers", "1"]) == 0
    )
    printed = json.loads(capsys.readouterr().out)
    assert [c["size"] for c in printed["clusters"]] == [301, 200]
    table = format_table(result.clusters)
    assert table.splitlines()[0].split()[:3] == ["id", "size", "purity"] and "object{intent}" in table


@pytest.mark.slow
def test_recipe_command_from_the_store(ray_local, store_url, tmp_path, capsys):
    from kolm_ray.cli import main
    from kolm_ray.recipe import validate_recipe_dir

    out = tmp_path / "recipe"
    assert main(["recipe", "--namespace", "support", "--store", store_url, "--out", str(out)]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["recipe_dir"] == str(out) and 0.5 <= info["k_floor"] <= 0.95
    spec, settings, pairs = validate_recipe_dir(out)
    assert len(pairs) == 300 and spec.vocab() and settings["cluster"] == 0  # the rejected call is dropped
    diag = json.loads((out / "diagnostics.json").read_text())
    assert diag["dropped"]["by_reason"] == {"rejected (verified=false)": 1}
    assert main(["recipe", "--namespace", "support", "--store", store_url, "--out", str(tmp_path / "b"),
                 "--cluster", "1"]) == 0  # fmt: skip
    assert validate_recipe_dir(tmp_path / "b")[0].get("byte-grounded")
    assert main(["recipe", "--namespace", "support", "--store", store_url, "--out", str(tmp_path / "c"),
                 "--cluster", "7"]) == 2  # fmt: skip
    assert "cluster 7 does not exist" in capsys.readouterr().err


@pytest.mark.slow
def test_empty_namespace_is_a_clear_error(ray_local, store_url, capsys):
    from kolm_ray.cli import main

    assert main(["cluster", "--namespace", "nobody", "--store", store_url]) == 2
    assert "no observations" in capsys.readouterr().err
    with pytest.raises(KolmError, match="does not exist"):
        from kolm_ray.clustering import cluster_namespace

        cluster_namespace("sqlite:////nonexistent/dir/obs.db", "x")


@pytest.mark.slow
def test_one_pass_over_several_namespaces_keeps_them_apart(ray_local, store_url, tmp_path, capsys):
    from kolm_ray.cli import main
    from kolm_ray.clustering import cluster_members, cluster_namespaces
    from kolm_ray.observations.model import Observation
    from kolm_ray.observations.store import open_store

    # a second namespace beside "support": the extractor task again, under other ids
    url = f"sqlite:///{tmp_path / 'two.db'}"
    store = open_store(url)
    store.append_many([Observation(**{**o, "namespace": "support"}) for o in rd.categorical(120, seed=3)[0]])
    store.append_many(
        [Observation(**{**o, "id": "b" + o["id"], "namespace": "billing"}) for o in rd.extractive(80, seed=4)]
    )
    store.close()
    results = cluster_namespaces(url, ["support", "billing"], num_workers=2, summarize=False)
    assert results["support"].rows == 120 and results["billing"].rows == 80
    for ns, want in (("support", 120), ("billing", 80)):
        res = results[ns]
        assert sum(c["size"] for c in res.clusters) == want
        ids = [m["id"] for c in res.clusters for m in cluster_members(res, c["id"])[0]]
        assert len(ids) == want and all(i.startswith("b") == (ns == "billing") for i in ids)

    argv = ["cluster", "--namespace", "support", "--namespace", "billing", "--store", url, "--json"]
    assert main(argv) == 0
    printed = json.loads(capsys.readouterr().out)
    assert [d["namespace"] for d in printed["namespaces"]] == ["support", "billing"]
    assert [sum(c["size"] for c in d["clusters"]) for d in printed["namespaces"]] == [120, 80]
    assert main(["cluster", "--namespace", "support", "--namespace", "nobody", "--store", url]) == 2
    assert "'nobody' has no observations" in capsys.readouterr().err
