"""The capture path's guards in-process: request validation, scrubbing, capped decoding, the writer's
poison isolation, the spool and its idempotent replay. Fast; the subprocess chaos suite is
tests/test_capture_chaos.py."""

from __future__ import annotations

import gzip
import json
import sqlite3
import zlib

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kolm_ray.capture.exchange import (
    MAX_DEPTH,
    Exchange,
    check_request,
    decode_body,
    nesting_depth,
    sanitize,
    to_observation,
)
from kolm_ray.capture.spool import Spool, SpoolFull
from kolm_ray.capture.writer import BackgroundWriter
from kolm_ray.observations.model import Observation
from kolm_ray.observations.store import open_store
from kolm_ray.providers import REDACTED, is_credential_field, scrub_credentials, scrub_text

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(),
    lambda kids: st.lists(kids, max_size=4) | st.dictionaries(st.text(max_size=12), kids, max_size=4),
    max_leaves=30,
)
KEYS = st.sampled_from(
    [
        "sk-proj-" + "Ab3_" * 8,
        "sk-ant-api03-" + "z" * 30,
        "sk_live_" + "4x" * 8,
        "rk_live_" + "7y" * 8,
        "hf_" + "H" * 34,
        "ghp_" + "g" * 36,
        "github_pat_" + "p" * 40,
        "xoxb-123456789012-abcdef",
        "AKIAIOSFODNN7EXAMPLE",
        "AIzaSyD-" + "k" * 31,
        "ya29." + "o" * 30,
        "eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiIxMjM0In0.c2lnbmF0dXJlMTIz",
        "Bearer abc123def456",
        "Basic dXNlcjpwYXNzd29yZA==",
    ]
)
_SEP = st.sampled_from([" ", "\n", "\t", "(", '"', ": ", "=", ",", "key:"])


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(json_values)
def test_any_json_object_is_accepted_and_never_breaks_the_scrubber(value):
    body = json.dumps({"model": "m", "messages": [{"role": "user", "content": "q"}], "x": value}).encode()
    assert check_request(body) is None
    out = scrub_credentials(json.loads(body))
    json.dumps(out)  # still JSON
    obs = to_observation(Exchange("openai", "default", None, body, 200, 1.0, body=b"{}"))
    assert obs.input == "q"


@settings(max_examples=200, deadline=None)
@given(st.text(max_size=40), KEYS, _SEP, _SEP, st.text(max_size=40))
def test_a_key_inside_any_text_is_redacted(before, key, left, right, after):
    text = before + left + key + right + after
    scrubbed = scrub_text(text)
    assert key not in scrubbed and REDACTED in scrubbed
    # and the same inside a request body, after JSON escaping
    out = scrub_credentials({"messages": [{"role": "user", "content": text}], "n": [text]})
    assert key not in json.dumps(out, ensure_ascii=False)


@pytest.mark.parametrize(
    "name,secret",
    [
        ("api_keys", True),
        ("secrets", True),
        ("tokens", True),
        ("pwd", True),
        ("passwd", True),
        ("apiKey", True),
        ("max_tokens", False),
        ("budget_tokens", False),
        ("max_completion_tokens", False),
        ("prompt_cache_key", False),
        ("monkey", False),
    ],
)
def test_credential_field_names_by_their_words(name, secret):
    assert is_credential_field(name) is secret


def test_prose_that_looks_like_a_prefix_is_kept():
    text = "task-management-system-v2-release and Basic instructions and a bearer of bad news"
    assert scrub_text(text) == text


@pytest.mark.parametrize(
    "body,problem",
    [
        (b'{"a": "\xff"}', "UTF-8"),
        (b"[" * 5000 + b"]" * 5000, f"deeper than {MAX_DEPTH}"),
        (b'{"a": ' + b"[" * (MAX_DEPTH + 1) + b"]" * (MAX_DEPTH + 1) + b"}", f"deeper than {MAX_DEPTH}"),
        (b'{"a": 1', "not valid JSON"),
        (b"[1, 2]", "must be a JSON object"),
        ('{"a": "x"}'.encode("utf-16"), "UTF-8"),
    ],
)
def test_bad_request_bodies_are_refused_with_the_reason(body, problem):
    assert problem in check_request(body)


def test_depth_limit_is_exact_on_both_sides_of_the_bracket_count_shortcut():
    # Exactly MAX_DEPTH levels: as many brackets as the limit, so the count alone settles it.
    at_limit = b"{" + b'"a": ' + b"[" * (MAX_DEPTH - 1) + b"]" * (MAX_DEPTH - 1) + b"}"
    assert check_request(at_limit) is None
    # Many brackets, all inside strings: past the count, so the exact scan decides (shallow: fine).
    assert check_request(json.dumps({"a": "[{" * MAX_DEPTH}).encode()) is None
    # Many brackets side by side, never deep: also fine.
    assert check_request(json.dumps({"a": [[1]] * MAX_DEPTH}).encode()) is None


@settings(max_examples=100, deadline=None)
@given(json_values)
def test_nesting_depth_matches_the_parsed_depth(value):
    def depth(v) -> int:
        if isinstance(v, dict):
            return 1 + max((depth(x) for x in v.values()), default=0)
        if isinstance(v, list):
            return 1 + max((depth(x) for x in v), default=0)
        return 0

    assert nesting_depth(json.dumps(value).encode()) == depth(value)


def test_compressed_answers_are_decoded_within_the_cap():
    assert decode_body(gzip.compress(b"ok") + gzip.compress(b"!"), "gzip") == b"ok!"
    assert decode_body(zlib.compress(b"deflated"), "deflate") == b"deflated"
    bomb = gzip.compress(b"\0" * (8 << 20))
    with pytest.raises(ValueError, match="over 1048576 bytes"):
        decode_body(bomb, "gzip", cap=1 << 20)
    with pytest.raises(ValueError, match="cannot decode"):
        decode_body(b"not gzip", "gzip")


def _obs(text: str, **kw) -> Observation:
    return Observation(namespace="ns", input=text, output=kw.pop("output", "a"), **kw)


def test_a_poison_row_is_stored_sanitised_and_costs_its_batch_nothing(tmp_path):
    store = open_store(f"sqlite:///{tmp_path / 'obs.db'}")
    writer = BackgroundWriter(store, Spool(tmp_path / "spool"), tmp_path / "dead.jsonl")
    try:
        rows = [_obs(f"good {i}") for i in range(50)]
        rows.insert(17, _obs("bad \ud800", request={"k": "\udfff"}))
        writer._handle(rows, spill=False)
        stored = [o.input for o in store.list(limit=100)[0]]
        assert len(stored) == 51 and stored[17] == "bad \ufffd" and writer.sanitized == 1
        assert store.get(rows[17].id).request == {"k": "\ufffd"}
        assert writer.dead_lettered == 0 and writer.handled == 51
    finally:
        writer.close()
        store.close()


def test_sanitize_fixes_nul_surrogates_and_nan():
    o = sanitize(_obs("a\x00b\ud800", output={"x": float("nan"), "s": "\udc00"}))
    assert o.input == "a\ufffdb\ufffd" and o.output == {"x": None, "s": "\ufffd"}


def test_a_row_no_store_takes_goes_to_the_dead_letter_file_owner_only(tmp_path):
    class Refusing:  # a store whose every insert fails on the data, sanitised or not
        url = "sqlite:///x"

        def append_many(self, observations, ignore_existing=False, timeout_s=None):
            if any(o.input.startswith("bad") for o in observations):
                raise ValueError("refused")
            return len(observations)

    dead = tmp_path / "dead.jsonl"
    writer = BackgroundWriter(Refusing(), Spool(tmp_path / "spool"), dead)
    try:
        writer._handle([_obs("ok 1"), _obs("bad"), _obs("ok 2")], spill=False)
        assert writer.written == 2 and writer.dead_lettered == 1 and writer.handled == 3
        (line,) = dead.read_text().splitlines()
        assert json.loads(line)["observation"]["input"] == "bad" and dead.stat().st_mode & 0o777 == 0o600
    finally:
        writer.close()


def test_spool_replay_is_exactly_once_even_after_a_crash_before_the_ack(tmp_path):
    store = open_store(f"sqlite:///{tmp_path / 'obs.db'}")
    spool = Spool(tmp_path / "spool")
    rows = [_obs(f"r{i}") for i in range(10)]
    spool.append(rows[:6])
    spool.append(rows[6:])
    spool.seal()
    store.append_many(rows[:6])  # committed, then "crashed" before the segment was deleted
    writer = BackgroundWriter(store, Spool(tmp_path / "spool"), tmp_path / "dead.jsonl")
    try:
        assert writer.spool_rows == 10 and not writer.health()[0]
        writer._replay()
        assert [o.input for o in store.list(limit=100)[0]] == [f"r{i}" for i in range(10)]
        assert writer.spool_rows == 0 and writer.health() == (True, None)
        assert not list((tmp_path / "spool").glob("*.jsonl"))
    finally:
        writer.close()
        store.close()


def test_a_lone_surrogate_is_spooled_sanitised(tmp_path):
    spool = Spool(tmp_path / "s")
    spool.append([_obs("x \ud800"), _obs("fine")])
    spool.seal()
    assert [o.input for _, rows in spool.segments() for o in rows] == ["x \ufffd", "fine"]


def test_a_torn_last_line_is_skipped_and_a_full_spool_says_so(tmp_path):
    spool = Spool(tmp_path / "s", max_bytes=4096)
    spool.append([_obs("whole")])
    spool.seal()
    seg = next((tmp_path / "s").glob("*.jsonl"))
    with open(seg, "ab") as f:
        f.write(b'{"id": "obs_torn", "namesp')
    assert [o.input for _, rows in spool.segments() for o in rows] == ["whole"]
    with pytest.raises(SpoolFull, match="full"):
        spool.append([_obs("x" * 5000)])


def test_a_locked_store_sends_the_batch_to_the_spool_after_the_retry_window(tmp_path):
    db = tmp_path / "obs.db"
    store = open_store(f"sqlite:///{db}")
    writer = BackgroundWriter(
        store, Spool(tmp_path / "spool"), None, retry_window_s=0.3, attempt_timeout_s=0.1
    )
    lock = sqlite3.connect(db, isolation_level=None)
    try:
        lock.execute("BEGIN IMMEDIATE")
        writer._handle([_obs("held")], spill=False)
        ok, reason = writer.health()
        assert not ok and "locked" in reason and writer.spool_rows == 1 and store.count() == 0
        lock.execute("ROLLBACK")
        writer._replay()
        assert store.count() == 1 and writer.health() == (True, None)
    finally:
        lock.close()
        writer.close()
        store.close()


def test_append_many_ignore_existing_skips_stored_ids(tmp_path):
    store = open_store(f"sqlite:///{tmp_path / 'obs.db'}")
    try:
        a, b = _obs("a"), _obs("b")
        assert store.append_many([a]) == 1
        with pytest.raises(KeyError):
            store.append_many([a, b])
        assert store.append_many([a, b], ignore_existing=True) == 1
        assert store.count() == 2
    finally:
        store.close()
