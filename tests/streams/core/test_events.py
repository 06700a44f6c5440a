"""Validation of click events (pure logic)."""

from __future__ import annotations

import orjson
import pytest

from streams.core.events import EventDecoder, Limits, Rejected, parse_ts

ACTIONS = {None: 0, "view": 0, "buy": 1}


def action_index(a):
    return ACTIONS[a]


@pytest.fixture
def decoder() -> EventDecoder:
    return EventDecoder({"i1": (0,), "i2": (1, 2)}, {"A": 0, "B": 1, "C": 2}, action_index, Limits(), now=lambda: 2e9)


def _d(decoder: EventDecoder, **event) -> object:
    return decoder.decode(orjson.dumps(event))


def test_valid_events(decoder) -> None:
    c = _d(decoder, user_id="u1", item_id="i2", ts=1_600_000_000, action="buy", event_id="e1")
    assert (c.user_id, c.categories, c.action, c.ts, c.event_id) == ("u1", (1, 2), 1, 1.6e9, "e1")
    c = _d(decoder, user_id=7, categories=["A", "C"], ts="2020-09-13T12:26:40Z")
    assert c.user_id == "7" and c.categories == (0, 2) and c.ts == 1_600_000_000.0 and c.action == 0
    assert _d(decoder, user_id="u", category="B", ts="2020-09-13T12:26:40").ts == 1_600_000_000.0  # naive = UTC


def test_fingerprint_is_event_id_else_bytes(decoder) -> None:
    a = _d(decoder, user_id="u", item_id="i1", ts=1, event_id="x")
    b = _d(decoder, user_id="u", item_id="i2", ts=2, event_id="x")
    assert a.fingerprint == b.fingerprint
    c = _d(decoder, user_id="u", item_id="i1", ts=1)
    d = _d(decoder, user_id="u", item_id="i1", ts=2)
    assert c.fingerprint != d.fingerprint and len(c.fingerprint) == 8


@pytest.mark.parametrize(
    ("raw", "reason"),
    [
        (b"\xff\xfe", "bad_json"),
        (b"{", "bad_json"),
        (b'{"user_id": "u", "ts": NaN, "item_id": "i1"}', "bad_json"),
        (b"[1]", "not_object"),
        (b'"s"', "not_object"),
        (b'{"ts": 1, "item_id": "i1"}', "missing_field"),
        (b'{"user_id": "u", "item_id": "i1"}', "missing_field"),
        (b'{"user_id": "u", "ts": 1}', "missing_field"),
        (b'{"user_id": "u", "ts": 1, "item_id": "i1", "x": 1}', "unknown_field"),
        (b'{"user_id": "a:b", "ts": 1, "item_id": "i1"}', "bad_user_id"),
        (b'{"user_id": "a b", "ts": 1, "item_id": "i1"}', "bad_user_id"),
        (b'{"user_id": "a\\nb", "ts": 1, "item_id": "i1"}', "bad_user_id"),
        (b'{"user_id": "{x}", "ts": 1, "item_id": "i1"}', "bad_user_id"),
        (b'{"user_id": true, "ts": 1, "item_id": "i1"}', "bad_user_id"),
        (b'{"user_id": "u", "ts": -1, "item_id": "i1"}', "bad_ts"),
        (b'{"user_id": "u", "ts": "yesterday", "item_id": "i1"}', "bad_ts"),
        (b'{"user_id": "u", "ts": [1], "item_id": "i1"}', "bad_ts"),
        (b'{"user_id": "u", "ts": 9e9, "item_id": "i1"}', "future_ts"),
        (b'{"user_id": "u", "ts": 1, "item_id": "nope"}', "unknown_item"),
        (b'{"user_id": "u", "ts": 1, "item_id": {"a": 1}}', "bad_item_id"),
        (b'{"user_id": "u", "ts": 1, "category": "Z"}', "unknown_category"),
        (b'{"user_id": "u", "ts": 1, "categories": "A"}', "bad_categories"),
        (b'{"user_id": "u", "ts": 1, "categories": []}', "bad_categories"),
        (b'{"user_id": "u", "ts": 1, "item_id": "i1", "action": "steal"}', "unknown_action"),
        (b'{"user_id": "u", "ts": 1, "item_id": "i1", "action": 1.5}', "bad_action"),
        (None, "empty"),
    ],
)
def test_rejections_have_reasons(decoder, raw, reason) -> None:
    with pytest.raises(Rejected) as exc:
        decoder.decode(raw)
    assert exc.value.reason == reason
    assert exc.value.detail and "\n" not in exc.value.detail


def test_limits(decoder) -> None:
    with pytest.raises(Rejected, match="limit 4096"):
        decoder.decode(b'{"user_id": "u", "ts": 1, "item_id": "' + b"x" * 5000 + b'"}')
    with pytest.raises(Rejected) as exc:
        _d(decoder, user_id="u" * 129, ts=1, item_id="i1")
    assert exc.value.reason == "bad_user_id"
    with pytest.raises(Rejected) as exc:
        _d(decoder, user_id="u", ts=1, categories=["A"] * 33)
    assert exc.value.reason == "bad_categories"


def test_parse_ts() -> None:
    assert parse_ts(5) == 5.0
    assert parse_ts("1970-01-01T00:00:10+00:00") == 10.0
    assert parse_ts("12.5") == 12.5
    with pytest.raises(Rejected):
        parse_ts(float("inf"))


def test_allowed_fields_are_the_documented_record_fields() -> None:
    from streams.core.events import ALLOWED_FIELDS
    from streams.runtime.records import ClickEvent

    assert frozenset(ClickEvent._options.fields) == ALLOWED_FIELDS
