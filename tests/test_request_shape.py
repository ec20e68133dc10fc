"""The request shape: what a promoted model may answer, recorded by the recipe and carried by compile."""

from __future__ import annotations

import recipe_data as rd
import yaml

from kolm_ray.observations.request_shape import EMPTY_SHAPE, matches, shape_of_cluster, shape_of_request


def req(system: str | None = None, *turns: str, **extra) -> dict:
    msgs = ([{"role": "system", "content": system}] if system else []) + [
        {"role": "user" if i % 2 == 0 else "assistant", "content": t} for i, t in enumerate(turns)
    ]
    return {"messages": msgs, **extra}


def test_same_prompt_modulo_digits_and_spaces_matches_and_others_do_not():
    model = shape_of_cluster(
        [req("Classify ticket 12 of 2024.", "hi"), req("Classify ticket 7 of 2025.", "yo")]
    )
    assert model["turns"] == "single"
    assert matches(model, shape_of_request(req("classify  ticket 99 of 2026.", "refund please")))
    assert not matches(model, shape_of_request(req("You are a poet.", "refund please")))
    assert not matches(model, shape_of_request(req(None, "refund please")))
    assert not matches(model, shape_of_request(req("Classify ticket 1 of 1.", "a", "b", "c")))  # multi-turn
    json_mode = req("Classify ticket 1 of 1.", "x", response_format={"type": "json_object"})
    assert not matches(model, shape_of_request(json_mode))


def test_anthropic_system_and_openai_system_message_are_the_same_prompt():
    anthropic_req = {"system": "Be terse.", "messages": [{"role": "user", "content": "hi"}]}
    assert matches(shape_of_cluster([req("Be terse.", "hi")]), shape_of_request(anthropic_req))


def test_plain_pairs_shape_answers_only_plain_calls():
    assert matches(EMPTY_SHAPE, shape_of_request(req(None, "hello")))
    assert not matches(EMPTY_SHAPE, shape_of_request(req("Be terse.", "hello")))


def test_recipe_records_the_cluster_shape_and_compile_carries_it(tmp_path):
    from kolm_ray.cli import build_parser
    from kolm_ray.compile.plan import validate
    from kolm_ray.recipe import recipe_from_observations

    observations, _ = rd.categorical(300, field="namespace")
    local = [{**o, "id": f"local-{i}", "provider": "local", "output": {"namespace": "billing"}}
             for i, o in enumerate(observations[:40])]  # fmt: skip
    info = recipe_from_observations(observations + local, out_dir=str(tmp_path / "r"))
    recipe = yaml.safe_load((tmp_path / "r" / "recipe.yaml").read_text())
    shape = recipe["request_shape"]
    assert shape["system_prompt"] == "classify the request. answer json." and shape["turns"] == "single"
    assert matches(shape, shape_of_request(req("Classify the request. Answer JSON.", "my card was charged")))
    diagnostics = yaml.safe_load((tmp_path / "r" / "diagnostics.json").read_text())
    assert diagnostics["dropped"]["by_reason"].get("local answer (a promoted model's output)") == 40
    plan = validate(
        build_parser().parse_args(["compile", "--recipe", info["recipe_dir"], "--output", "x.kolm"])
    )
    assert plan.request_shape == shape
