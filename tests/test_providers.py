"""Provider wire formats (pure functions) and the workload generator's labelling."""

from __future__ import annotations

import json

import pytest

from kolm_ray.demo import simulate
from kolm_ray.demo.simulate.upstream import _sse
from kolm_ray.providers import REDACTED, iter_sse, json_or_text, scrub_credentials
from kolm_ray.providers import anthropic as anth
from kolm_ray.providers import openai as oai


def sse(*events: tuple[str | None, object]) -> bytes:
    return b"".join(_sse(e, d) for e, d in events)


# ---------------------------------------------------------------- shared helpers


def test_iter_sse_handles_crlf_comments_multiline_and_a_cut_tail():
    raw = b": keep-alive\r\nevent: a\r\ndata: one\r\ndata: two\r\n\r\ndata:no-space\n\ndata: cut"
    assert list(iter_sse(raw)) == [("a", "one\ntwo"), (None, "no-space"), (None, "cut")]


@pytest.mark.parametrize(
    "text,expected",
    [
        ('{"namespace": "billing"}', {"namespace": "billing"}),
        ("  [1, 2]\n", [1, 2]),
        ('```json\n{"a": 1}\n```', {"a": 1}),
        ("42", "42"),  # bare scalars stay text
        ("true", "true"),
        ("{not json", "{not json"),
        ("plain answer", "plain answer"),
        (None, None),
    ],
)
def test_json_or_text(text, expected):
    assert json_or_text(text) == expected


def test_scrub_credentials_drops_key_fields_at_any_depth_and_redacts_key_shaped_strings():
    body = {
        "model": "m",
        "api_key": "sk-abc",
        "apiKey": "x",
        "metadata": {"X-API-Key": "y", "Authorization": "Bearer z", "note": "Bearer abcdef"},
        "extra": [{"client_secret": "s", "keep": 1}, "sk-ant-" + "a" * 30],
        "max_tokens": 5,
    }
    out = scrub_credentials(body)
    assert out == {
        "model": "m",
        "metadata": {"note": REDACTED},
        "extra": [{"keep": 1}, REDACTED],
        "max_tokens": 5,
    }
    assert body["api_key"] == "sk-abc"  # a copy, the request itself is untouched


def test_scrub_credentials_knows_key_fields_by_their_last_word_and_common_key_formats():
    body = {
        "metadata": {
            "openai_api_key": "sk-short",
            "gemini_api_key": "AIzaSyD-0123456789abcdefghijkl",
            "github_token": "t",
            "key": "k",
            "sessionToken": "s",
            "APIKEY": "a",
            "accesstoken": "t",
            "note": "AIzaSyD-" + "a" * 31,
            "other": "ghp_" + "a" * 36,
            "jwt": "eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiIxMjM0In0.c2lnbmF0dXJlMTIz",
            "monkey": "banana",
        },
        "auth": {"type": "basic", "password": "p"},
        "response_format": {"json_schema": {"schema": {"properties": {"token": {"type": "string"}}}}},
        "max_tokens": 5,
        "max_completion_tokens": 6,
        "prompt_cache_key": "user-42",
    }
    assert scrub_credentials(body) == {
        "metadata": {"note": REDACTED, "other": REDACTED, "jwt": REDACTED, "monkey": "banana"},
        "auth": {"type": "basic"},
        "response_format": {"json_schema": {"schema": {"properties": {"token": {"type": "string"}}}}},
        "max_tokens": 5,
        "max_completion_tokens": 6,
        "prompt_cache_key": "user-42",
    }


# ---------------------------------------------------------------- OpenAI


def test_openai_input_single_turn_is_the_user_text_and_system_is_not_a_turn():
    req = {
        "messages": [
            {"role": "system", "content": "classify"},
            {"role": "user", "content": "reset my password"},
        ]
    }
    assert oai.input_text(req) == "reset my password"


def test_openai_input_multi_turn_is_a_transcript_with_content_parts():
    req = {
        "messages": [
            {"role": "developer", "content": "be brief"},
            {
                "role": "user",
                "content": [{"type": "text", "text": "look"}, {"type": "image_url", "image_url": {}}],
            },
            {"role": "assistant", "content": "ok"},
            {"role": "user", "content": "and now?"},
        ]
    }
    assert oai.input_text(req) == "user: look\n[image_url]\n\nassistant: ok\n\nuser: and now?"


def test_openai_from_response_parses_json_text_usage_and_model():
    body = {
        "model": "gpt-4o",
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": '{"namespace": "billing"}'},
                "finish_reason": "stop",
            }
        ],
        "usage": {"prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5},
    }
    ex = oai.from_response(body)
    assert (ex.output, ex.model, ex.usage["total_tokens"], ex.finish_reason, ex.error) == (
        {"namespace": "billing"},
        "gpt-4o",
        5,
        "stop",
        None,
    )


def test_openai_from_response_tool_calls_and_errors():
    body = {
        "choices": [
            {
                "message": {
                    "content": None,
                    "tool_calls": [
                        {
                            "id": "c",
                            "type": "function",
                            "function": {"name": "route", "arguments": '{"ns": "x"}'},
                        }
                    ],
                }
            }
        ]
    }
    assert oai.from_response(body).output == [{"name": "route", "arguments": {"ns": "x"}}]
    err = oai.from_response({"error": {"message": "slow down", "type": "rate_limit_exceeded"}})
    assert err.error == "rate_limit_exceeded: slow down"


def _openai_chunk(delta, finish=None, usage=None, choices=True):
    c = {
        "id": "c1",
        "object": "chat.completion.chunk",
        "model": "gpt-4o-mini",
        "choices": [{"index": 0, "delta": delta, "finish_reason": finish}] if choices else [],
    }
    if usage:
        c["usage"] = usage
    return (None, c)


def test_openai_from_stream_assembles_text_usage_and_done():
    raw = sse(
        _openai_chunk({"role": "assistant", "content": ""}),
        _openai_chunk({"content": '{"namespace": '}),
        _openai_chunk({"content": '"runbooks"}'}),
        _openai_chunk({}, "stop"),
        _openai_chunk({}, usage={"total_tokens": 9}, choices=False),
        (None, "[DONE]"),
    )
    ex = oai.from_stream(raw)
    assert ex.output == {"namespace": "runbooks"}
    assert (ex.model, ex.usage, ex.finish_reason, ex.complete) == (
        "gpt-4o-mini",
        {"total_tokens": 9},
        "stop",
        True,
    )


def test_openai_from_stream_cut_short_is_incomplete_and_keeps_the_partial_text():
    raw = sse(_openai_chunk({"content": '{"namespace": "run'}))[:-1]  # even the event is cut
    ex = oai.from_stream(raw)
    assert ex.complete is False
    assert ex.output == '{"namespace": "run'


def test_openai_from_stream_tool_call_deltas():
    raw = sse(
        _openai_chunk({"tool_calls": [{"index": 0, "function": {"name": "route", "arguments": '{"n'}}]}),
        _openai_chunk({"tool_calls": [{"index": 0, "function": {"arguments": 's": 1}'}}]}),
        (None, "[DONE]"),
    )
    assert oai.from_stream(raw).output == [{"name": "route", "arguments": {"ns": 1}}]


# ---------------------------------------------------------------- Anthropic


def test_anthropic_input_text_blocks_and_transcript():
    single = {
        "system": "classify",
        "messages": [{"role": "user", "content": [{"type": "text", "text": "hi there"}]}],
    }
    assert anth.input_text(single) == "hi there"
    multi = {
        "messages": [
            {"role": "user", "content": "a"},
            {"role": "assistant", "content": "b"},
            {"role": "user", "content": [{"type": "image", "source": {}}, {"type": "text", "text": "c"}]},
        ]
    }
    assert anth.input_text(multi) == "user: a\n\nassistant: b\n\nuser: [image]\nc"


def test_anthropic_from_response_and_error():
    body = {
        "type": "message",
        "model": "claude-x",
        "content": [{"type": "text", "text": '{"namespace": "security"}'}],
        "stop_reason": "end_turn",
        "usage": {"input_tokens": 4, "output_tokens": 2},
    }
    ex = anth.from_response(body)
    assert (ex.output, ex.model, ex.usage, ex.finish_reason) == (
        {"namespace": "security"},
        "claude-x",
        {"input_tokens": 4, "output_tokens": 2},
        "end_turn",
    )
    err = anth.from_response({"type": "error", "error": {"type": "overloaded_error", "message": "busy"}})
    assert err.error == "overloaded_error: busy"


def test_anthropic_from_stream_text_tool_use_usage_and_stop():
    raw = sse(
        (
            "message_start",
            {
                "type": "message_start",
                "message": {"model": "claude-x", "usage": {"input_tokens": 7, "output_tokens": 1}},
            },
        ),
        (
            "content_block_start",
            {
                "type": "content_block_start",
                "index": 0,
                "content_block": {"type": "tool_use", "name": "route", "input": {}},
            },
        ),
        ("ping", {"type": "ping"}),
        (
            "content_block_delta",
            {
                "type": "content_block_delta",
                "index": 0,
                "delta": {"type": "input_json_delta", "partial_json": '{"ns": '},
            },
        ),
        (
            "content_block_delta",
            {
                "type": "content_block_delta",
                "index": 0,
                "delta": {"type": "input_json_delta", "partial_json": '"x"}'},
            },
        ),
        ("content_block_stop", {"type": "content_block_stop", "index": 0}),
        (
            "message_delta",
            {"type": "message_delta", "delta": {"stop_reason": "tool_use"}, "usage": {"output_tokens": 5}},
        ),
        ("message_stop", {"type": "message_stop"}),
    )
    ex = anth.from_stream(raw)
    assert ex.output == [{"name": "route", "input": {"ns": "x"}}]
    assert (ex.model, ex.usage, ex.finish_reason, ex.complete) == (
        "claude-x",
        {"input_tokens": 7, "output_tokens": 5},
        "tool_use",
        True,
    )


def test_anthropic_from_stream_error_event_and_cut():
    raw = sse(
        ("message_start", {"type": "message_start", "message": {"model": "m", "usage": {}}}),
        (
            "content_block_delta",
            {"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": "par"}},
        ),
        ("error", {"type": "error", "error": {"type": "overloaded_error", "message": "Overloaded"}}),
    )
    ex = anth.from_stream(raw)
    assert (ex.output, ex.error, ex.complete) == ("par", "overloaded_error: Overloaded", False)


# ---------------------------------------------------------------- the workload and its labels


def test_workload_is_deterministic_varied_and_labelled_by_the_same_function():
    a = simulate.generate_workload(3000, seed=7, noise=0.0)
    assert a == simulate.generate_workload(3000, seed=7, noise=0.0)
    assert a != simulate.generate_workload(3000, seed=8, noise=0.0)
    assert {i.namespace for i in a} == set(simulate.NAMESPACES)
    assert len({i.query for i in a}) > 0.9 * len(a)
    assert all(i.label == i.namespace == simulate.true_namespace(i.query) for i in a)


def test_workload_noise_flips_a_few_labels_consistently():
    items = simulate.generate_workload(4000, seed=1, noise=0.03)
    flipped = [i for i in items if i.label != i.namespace]
    assert 0.015 < len(flipped) / len(items) < 0.045
    assert all(simulate.frontier_label(i.query, 0.03) == i.label for i in items)
    assert json.loads(simulate.frontier_answer(items[0].query, 0.03)) == {"namespace": items[0].label}
    assert simulate.true_namespace("hello there") == simulate.UNKNOWN
