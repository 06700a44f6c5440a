"""Read a user's interest distribution from Redis.

    interest-stream lookup 196            # bar chart of the top categories
    interest-stream lookup 196 --json     # the whole record as JSON

From another service::

    from streams.lookup import get_interests
    interests = get_interests("196")          # settings from INTEREST_* (Redis URL, key prefix)
    if interests:
        print(interests.top[0])               # ("Drama", 0.31)
"""

from __future__ import annotations

import argparse
from dataclasses import asdict, dataclass

import orjson
import redis

from streams.core.events import USER_ID_RE
from streams.core.state import promoted_key, sync_client, user_key, version_tag
from streams.settings import Settings, get_settings

LOOKUP_FIELDS = ("probs", "top", "event_ts", "updated_at", "model_version", "events")


@dataclass(frozen=True)
class Interests:
    """One user's published interest distribution."""

    user_id: str
    probs: list[float]  # per category, in the model's category order
    top: list[tuple[str, float]]  # (category, probability), most likely first
    event_ts: float  # time of the last applied event, epoch seconds
    updated_at: float  # when the worker wrote it, epoch seconds
    model_version: str
    events: int  # events applied to this user


def get_interests(
    user_id: str, settings: Settings | None = None, client: redis.Redis | None = None
) -> Interests | None:
    """The user's distribution as published by the worker, or None if the user has none (or an invalid id).

    Reads the promoted version (the pointer), then that version's hash of the user: every read sees one version
    whole, and a promotion switches every later read at once."""
    settings = settings or get_settings()
    if not USER_ID_RE.fullmatch(user_id) or len(user_id) > settings.max_user_id_len:
        return None
    own = client is None
    client = client or sync_client(settings)
    try:
        promoted = client.get(promoted_key(settings.redis_prefix))
        if promoted is None:  # no version deployed yet
            return None
        tag = version_tag(promoted.decode() if isinstance(promoted, bytes) else promoted)
        values = client.hmget(user_key(settings.redis_prefix, tag, user_id), LOOKUP_FIELDS)
    finally:
        if own:
            client.close()
    probs, top, event_ts, updated_at, version, events = values
    if probs is None:
        return None
    return Interests(
        user_id=user_id,
        probs=orjson.loads(probs),
        top=[(t["category"], t["p"]) for t in orjson.loads(top or b"[]")],
        event_ts=float(event_ts or "nan"),
        updated_at=float(updated_at or "nan"),
        model_version=version.decode() if isinstance(version, bytes) else (version or ""),
        events=int(events or 0),
    )


def bar_chart(interests: Interests, width: int = 40) -> str:
    """The top categories as a text bar chart."""
    lines = [f"user {interests.user_id}: {interests.events} events, model {interests.model_version}"]
    name_w = max((len(n) for n, _ in interests.top), default=0)
    for name, p in interests.top:
        bar = "█" * max(1, round(p * width)) if p > 0 else ""
        lines.append(f"  {name:<{name_w}}  {bar:<{width}} {p:6.1%}")
    return "\n".join(lines)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("user_id")
    parser.add_argument("--json", action="store_true", help="print the whole record as JSON")


def run(args: argparse.Namespace) -> int:
    from streams.settings import load_settings

    settings = load_settings()
    try:
        interests = get_interests(args.user_id, settings)
    except (redis.RedisError, redis.exceptions.RedisClusterException) as exc:  # a cluster client's own, too
        from models.errors import ServiceError
        from streams.settings import redact_url

        raise ServiceError(f"cannot read Redis at {redact_url(settings.redis_url)}: {type(exc).__name__}") from None
    if interests is None:
        print(f"no interests for user {args.user_id!r} (never seen, or expired)")
        return 1
    print(orjson.dumps(asdict(interests)).decode() if args.json else bar_chart(interests))
    return 0
