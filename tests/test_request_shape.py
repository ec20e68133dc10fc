"""The request shape: what a promoted model may answer, recorded by the recipe and carried by compile."""

from __future__ import annotations

import random

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


# ---- instructions in the user turn (one system prompt, several tasks) ------------------------------------

APP = "You are Acme's assistant. Answer with JSON only."
QUERIES = [
    "what is my balance", "i lost my card yesterday", "book me a flight to rome", "how do i reset my pin",
    "transfer 20 dollars to sam", "is my card blocked", "when does the bank open", "freeze my account now",
    "show recent transactions please", "why was i charged twice",
]  # fmt: skip


def _calls(phrasings: list[str], n: int = 60) -> list[dict]:
    return [
        req(APP, f"{phrasings[i % len(phrasings)]}\n\n{QUERIES[(i * 7) % len(QUERIES)]} {i}")
        for i in range(n)
    ]


def test_a_cluster_of_instructed_calls_answers_only_its_own_instructions():
    banking = _calls(["Which banking intent is this?", "Banking support: tag the message with its intent."])
    inputs = [c["messages"][-1]["content"] for c in banking]
    model = shape_of_cluster(banking, inputs)
    assert model["templates"] == [
        "which banking intent is this?", "banking support: tag the message with its intent."
    ]  # fmt: skip
    assert matches(model, shape_of_request(req(APP, "which banking intent is this?  12\nfreeze it")))
    # the same system prompt, another task's instruction: not this model's call
    assert not matches(model, shape_of_request(req(APP, "Which travel intent is this?\n\nbook a flight")))
    assert not matches(model, shape_of_request(req(APP, "freeze my account now")))
    # an Anthropic body: `system` apart, the last user turn is the input
    anthropic = {"system": APP, "messages": [{"role": "user", "content": [{"type": "text", "text":
                 "Which banking intent is this? my pin"}]}]}  # fmt: skip
    assert matches(model, shape_of_request(anthropic))


def test_plain_user_text_has_no_templates_and_old_shapes_answer_as_before():
    rng = random.Random(0)
    plain = [req(APP, q) for intent in rd.INTENTS for q in rd.queries(intent, 60, rng)]  # people's own words
    model = shape_of_cluster(plain, [c["messages"][-1]["content"] for c in plain])
    assert "templates" not in model  # no phrasing opens 95% of the calls: any opening may come
    assert matches(model, shape_of_request(req(APP, "Which travel intent is this?\n\nbook a flight")))
    old = {k: v for k, v in shape_of_cluster(_calls(["Which banking intent is this?"])).items()}
    assert "templates" not in old  # no inputs given (an artifact compiled before templates): as before
    assert matches(old, shape_of_request(req(APP, "anything at all")))


def test_the_head_of_a_hostile_user_turn_is_bounded():
    huge = shape_of_request(req(APP, "word " * 2_000_000))
    assert len(huge["head"].split(" ")) == 17
    assert shape_of_request(req(APP, "\ud800 lone \udfff surrogates"))["head"].startswith("\ud800")
    assert shape_of_request({"messages": "not a list"})["head"] == ""


def test_the_recipe_of_an_instructed_cluster_records_its_phrasings(tmp_path):
    from kolm_ray.recipe import recipe_from_observations

    observations, _ = rd.categorical(300, field="namespace")
    phrasings = ["Route this ticket to a namespace.", "Which namespace should answer this ticket?"]
    instructed = []
    for i, o in enumerate(observations):
        text = f"{phrasings[i % 2]}\n\n{o['input']}"
        instructed.append({**o, "input": text, "request": req(APP, text)})
    recipe_from_observations(instructed, out_dir=str(tmp_path / "r"))
    shape = yaml.safe_load((tmp_path / "r" / "recipe.yaml").read_text())["request_shape"]
    assert shape["templates"] == [
        "route this ticket to a namespace.",
        "which namespace should answer this ticket?",
    ]
    assert matches(shape, shape_of_request(req(APP, "Route this ticket to a namespace. my card was charged")))
    assert not matches(shape, shape_of_request(req(APP, "Which banking intent is this? my card was charged")))
