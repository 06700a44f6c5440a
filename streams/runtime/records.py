"""The two JSON formats as ``faust.Record`` classes: what a Python producer can build events with, and what the
output topic's records hold. The worker itself decodes with orjson and validates by hand
(:class:`streams.core.events.EventDecoder`), so that a rejected event reaches the dead-letter topic with its bytes."""

from __future__ import annotations

import faust


class ClickEvent(faust.Record, serializer="json"):
    """One interaction, as produced to the input topic (key: the user id, UTF-8)."""

    user_id: str  # [A-Za-z0-9._@-], at most max_user_id_len characters (an integer is accepted too)
    ts: float  # event time: epoch seconds (int or float) or an ISO 8601 string
    item_id: str | None = None  # looked up in the model's catalog unless category/categories are given
    category: str | None = None  # one category name/id of the model's vocabulary
    categories: list[str] | None = None  # several categories (the item's category vector is their normalised mix)
    action: str | None = None  # e.g. "pv", "cart", "fav", "buy", or a rating "1".."5"; default: the model's default
    event_id: str | None = None  # unique id; a re-send with the same id is dropped as a duplicate


class InterestUpdate(faust.Record, serializer="json"):
    """One refreshed distribution, published to the output topic per applied event, or per user and batch with
    ``INTEREST_OUTPUT_MODE=user`` (key: the user id)."""

    user_id: str
    probs: list[float]  # probability per category, in the order of the model's ``categories``
    top: list[dict]  # [{"category": name, "p": prob}, ...] the top_n categories, most likely first
    model_version: str
    event_time: float  # the applied event's time, epoch seconds
    processed_at: float  # when the worker computed this, epoch seconds
    events: int  # events applied to this user so far
    event_id: str | None = None  # the applied event's id, if it had one
