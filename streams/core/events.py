"""Click events in, interest updates out: the wire records and the validation that guards the worker.

:mod:`streams.runtime.records` documents the two JSON formats as ``faust.Record`` classes; the hot path decodes with
orjson and validates by hand, because every rejected event must reach the dead-letter
topic with its original bytes and a reason rather than crash a stream.
"""

from __future__ import annotations

import hashlib
import math
import re
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import orjson

from models.data import epoch_seconds

# the fields of the wire format (streams.runtime.records.ClickEvent documents each; a test keeps the two equal)
ALLOWED_FIELDS = frozenset({"user_id", "ts", "item_id", "category", "categories", "action", "event_id"})
USER_ID_RE = re.compile(r"[A-Za-z0-9._@-]+")


class Rejected(Exception):
    """An event failed validation; ``reason`` is a short code, the message a one-line explanation."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(detail)
        self.reason = reason
        self.detail = detail


@dataclass(frozen=True, slots=True)
class Limits:
    """The validation limits (from Settings)."""

    max_event_bytes: int = 4096
    max_user_id_len: int = 128
    max_categories: int = 32
    max_future_s: float = 86_400.0
    max_id_len: int = 256


@dataclass(slots=True)
class Click:
    """A validated event, ready to be stepped."""

    user_id: str
    categories: tuple[int, ...]  # output category indices of the model
    action: int  # action index of the model
    ts: float  # epoch seconds
    fingerprint: bytes  # 8 bytes identifying the event (event_id, else the raw bytes) for re-send detection
    event_id: str | None


def parse_ts(value: object) -> float:
    """Epoch seconds from an int/float or an ISO 8601 string; raises Rejected('bad_ts') otherwise."""
    if isinstance(value, bool):
        raise Rejected("bad_ts", "ts must be a number or an ISO 8601 string, not a boolean")
    if isinstance(value, int | float):
        ts = float(value)
    elif isinstance(value, str) and 0 < len(value) <= 64:
        try:
            ts = epoch_seconds(value)  # the data files' reading of a timestamp, so training and serving agree
        except ValueError as exc:
            raise Rejected("bad_ts", f"ts {value[:40]!r}: {exc}") from None
    else:
        raise Rejected("bad_ts", f"ts must be a number or an ISO 8601 string, got {type(value).__name__}")
    if not math.isfinite(ts):
        raise Rejected("bad_ts", "ts is not finite")
    if ts < 0:
        raise Rejected("bad_ts", "ts is negative")
    return ts


def _id_str(value: object, field: str, max_len: int) -> str:
    if type(value) is str and 0 < len(value) <= max_len:  # the common case, first
        return value
    if isinstance(value, bool) or not isinstance(value, str | int):
        raise Rejected(f"bad_{field}", f"{field} must be a string or an integer, got {type(value).__name__}")
    s = str(value)
    if not s or len(s) > max_len:
        raise Rejected(f"bad_{field}", f"{field} must have 1..{max_len} characters, got {len(s)}")
    return s


class EventDecoder:
    """Turns raw message bytes into a ``Click``, or raises ``Rejected`` with a reason code.

    ``catalog`` maps item ids to output category indices; ``category_index`` maps raw category names/ids to output
    indices; ``action_index`` maps an action (None for absent) to its index or raises KeyError.
    """

    def __init__(
        self,
        catalog: Mapping[str, tuple[int, ...]],
        category_index: Mapping[str, int],
        action_index: Callable[[str | None], int],
        limits: Limits = Limits(),
        now: Callable[[], float] = time.time,
    ) -> None:
        self.catalog = catalog
        self.category_index = category_index
        self.limits = limits
        self._now = now
        self._action_cache: dict[str | None, int] = {}
        self._action_index = action_index

    def decode(self, raw: bytes | None) -> Click:
        lim = self.limits
        if raw is None:
            raise Rejected("empty", "message has no value")
        if len(raw) > lim.max_event_bytes:
            raise Rejected("oversized", f"event is {len(raw)} bytes, limit {lim.max_event_bytes}")
        try:
            obj = orjson.loads(raw)
        except orjson.JSONDecodeError as exc:
            raise Rejected("bad_json", f"not valid UTF-8 JSON: {str(exc)[:120]}") from None
        if not isinstance(obj, dict):
            raise Rejected("not_object", f"event must be a JSON object, got {type(obj).__name__}")
        if not ALLOWED_FIELDS.issuperset(obj):  # no set built per event (obj.keys() - ALLOWED_FIELDS costs ~1.5 us)
            names = ", ".join(sorted(repr(k[:40]) for k in obj.keys() - ALLOWED_FIELDS)[:5])
            raise Rejected("unknown_field", f"unknown field(s) {names}")

        if "user_id" not in obj:
            raise Rejected("missing_field", "user_id is required")
        user = _id_str(obj["user_id"], "user_id", lim.max_user_id_len)
        if not (user.isascii() and user.isalnum()) and not USER_ID_RE.fullmatch(user):  # most ids: no regex
            raise Rejected("bad_user_id", "user_id may only contain letters, digits and . _ @ -")

        if "ts" not in obj:
            raise Rejected("missing_field", "ts is required")
        ts = parse_ts(obj["ts"])
        if ts > self._now() + lim.max_future_s:
            raise Rejected("future_ts", f"ts {ts:.0f} is more than {lim.max_future_s:.0f}s in the future")

        cats = self._categories(obj)

        action_raw = obj.get("action")
        if action_raw is not None:
            action_raw = _id_str(action_raw, "action", 64)
        action = self._action_cache.get(action_raw)
        if action is None:
            try:
                action = self._action_index(action_raw)
            except KeyError:
                raise Rejected("unknown_action", f"action {action_raw!r} is not in the model's vocabulary") from None
            if len(self._action_cache) < 1024:
                self._action_cache[action_raw] = action

        event_id = obj.get("event_id")
        if event_id is not None:
            event_id = _id_str(event_id, "event_id", lim.max_id_len)
            fp = hashlib.blake2b(event_id.encode(), digest_size=8).digest()
        else:
            fp = hashlib.blake2b(raw, digest_size=8).digest()
        return Click(user, cats, action, ts, fp, event_id)

    def _categories(self, obj: dict) -> tuple[int, ...]:
        lim = self.limits
        if obj.get("categories") is not None or obj.get("category") is not None:
            raw = obj.get("categories")
            if raw is None:
                raw = [obj["category"]]
            elif not isinstance(raw, list):
                raise Rejected("bad_categories", "categories must be a list")
            if not raw:
                raise Rejected("bad_categories", "categories is empty")
            if len(raw) > lim.max_categories:
                raise Rejected("bad_categories", f"{len(raw)} categories, limit {lim.max_categories}")
            out = []
            for c in raw:
                name = _id_str(c, "category", 256)
                idx = self.category_index.get(name)
                if idx is None:
                    raise Rejected("unknown_category", f"category {name[:60]!r} is not in the model's vocabulary")
                out.append(idx)
            return tuple(out)
        if obj.get("item_id") is None:
            raise Rejected("missing_field", "item_id or category/categories is required")
        item = _id_str(obj["item_id"], "item_id", 256)
        cats = self.catalog.get(item)
        if cats is None:
            raise Rejected("unknown_item", f"item {item[:60]!r} is not in the catalog")
        return cats


def encode_event(event: Mapping[str, object]) -> bytes:
    """Serialise one click event for the input topic (what producers and the replay tool send)."""
    return orjson.dumps(event)
