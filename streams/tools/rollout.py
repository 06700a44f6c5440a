"""Switch readers between model versions, see where each stands, remove a retired one.

    interest-stream status                                   # versions, the promoted one, each one's lag
    interest-stream promote --model NEW/model.onnx           # readers and the output topic switch to NEW
    interest-stream promote --version movielens-100k-1a2b3c  # rollback: promote the previous version again
    interest-stream retire --version OLD                     # delete OLD's states, group and re-key topic

A version's lag is what its consumer group has not committed of the input topic and its own re-key topic: a version
whose workers are running and caught up has a lag of about a second's events, a stopped one's grows with the input.
Promotion is one ``SET`` of the pointer ``<prefix>promoted``: a reader's next lookup reads the new version; its
workers start publishing within a second and the previous version's stop (they re-read the pointer every second).
"""

from __future__ import annotations

import argparse
import contextlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import orjson

from models.errors import ConfigError, ServiceError
from streams.core import versions
from streams.core.state import user_key
from streams.settings import Settings

MAX_LAG = 1000  # events: the default bound on a version's lag for it to be promoted


def has_states(client, settings: Settings, tag: str) -> bool:
    """Whether any user hash of the version is in Redis (SCAN, stops at the first one found)."""
    return next(iter(client.scan_iter(match=user_key(settings.redis_prefix, tag, "*"), count=1000)), None) is not None


def version_lag(settings: Settings, v: versions.Version) -> int:
    from streams.tools.groups import lag

    return lag(settings, v.group, [settings.input_topic, v.rekey_topic])


def resolve(client, settings: Settings, model: Path | None, version: str | None) -> versions.Version:
    """The version named by --model (its ONNX metadata) or --version (which must be registered)."""
    if model is not None:
        name = versions.model_version(model)
    elif version:
        name = version
    else:
        raise ConfigError("name the version: --model PATH or --version VERSION")
    known = versions.registry(client, settings)
    if model is None and name not in known:
        listed = ", ".join(sorted(known)) or "none"
        raise ConfigError(f"version {name!r} is not registered (registered: {listed})")
    return versions.Version.of(settings, name)


def promote(client, settings: Settings, v: versions.Version, max_lag: int) -> str | None:
    """Point readers at ``v`` once it has states and a lag of at most ``max_lag``; returns the version before."""
    if not has_states(client, settings, v.tag):
        raise ServiceError(f"{v.version} has no states in Redis: backfill it and start its workers first")
    lag = version_lag(settings, v)
    if lag > max_lag:
        raise ServiceError(
            f"{v.version} is not caught up: lag {lag} events > {max_lag} (start its workers and wait, or --max-lag)"
        )
    return versions.set_promoted(client, settings, v.version)


def status(client, settings: Settings) -> list[dict]:
    from streams.tools.groups import members

    promoted = versions.promoted(client, settings)
    rows = []
    for name, entry in sorted(versions.registry(client, settings).items(), key=lambda kv: kv[1].get("registered", 0)):
        v = versions.Version.of(settings, name)
        rows.append(
            {
                "version": name,
                "promoted": name == promoted,
                "tag": v.tag,
                "group": v.group,
                "workers": members(settings, v.group),
                "lag": version_lag(settings, v),
                "states": has_states(client, settings, v.tag),
                "model": entry.get("model"),
            }
        )
    return rows


def retire(client, settings: Settings, v: versions.Version) -> int:
    """Delete a version that readers do not see: its user hashes, registry entry, consumer group and re-key topic.
    Returns the number of hashes deleted."""
    from kafka.errors import KafkaError

    from streams.kafka import admin
    from streams.tools.groups import delete_group, members

    if versions.promoted(client, settings) == v.version:
        raise ServiceError(f"{v.version} is the promoted version: promote another before retiring it")
    if members(settings, v.group):
        raise ServiceError(f"workers of {v.version} (group {v.group}) are running: stop them before retiring it")
    deleted, batch = 0, []
    for key in client.scan_iter(match=user_key(settings.redis_prefix, v.tag, "*"), count=1000):
        batch.append(key)
        if len(batch) >= 1000:
            deleted += client.unlink(*batch)
            batch = []
    if batch:
        deleted += client.unlink(*batch)
    client.hdel(versions.versions_key(settings.redis_prefix), v.version)
    delete_group(settings, v.group)
    kafka = admin(settings)
    try:  # a later backfill of the same version must not meet this run's re-keyed events
        kafka.delete_topics([v.rekey_topic])
    except KafkaError:
        pass
    finally:
        kafka.close()
    return deleted


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The same options for promote, status and retire (status ignores the version)."""
    parser.add_argument("--model", type=Path, help="the version of this ONNX model")
    parser.add_argument("--version", help="a registered version (see `interest-stream status`)")
    parser.add_argument("--max-lag", type=int, default=MAX_LAG, help=f"promote only below this lag (default {MAX_LAG})")
    parser.add_argument("--json", action="store_true", help="status as JSON")


def _redis_error(settings: Settings, exc: Exception) -> ServiceError:
    from streams.settings import redact_url

    return ServiceError(f"cannot use Redis at {redact_url(settings.redis_url)}: {type(exc).__name__}: {exc}")


@contextlib.contextmanager
def _session() -> Iterator[tuple[Settings, Any]]:
    """What each command runs in: the settings and a Redis client, closed after; a Redis error is one clear line."""
    import redis

    from streams.core.state import sync_client
    from streams.settings import load_settings

    settings = load_settings()
    client = sync_client(settings)
    try:
        yield settings, client
    except redis.RedisError as exc:
        raise _redis_error(settings, exc) from None
    finally:
        client.close()


def run_promote(args: argparse.Namespace) -> int:
    with _session() as (settings, client):
        v = resolve(client, settings, args.model, args.version)
        before = promote(client, settings, v, args.max_lag)
    print(f"promoted {v.version} (before: {before}); readers see it now, its workers publish within a second")
    return 0


def run_status(args: argparse.Namespace) -> int:
    with _session() as (settings, client):
        rows = status(client, settings)
    if args.json:
        print(orjson.dumps(rows).decode())
        return 0
    if not rows:
        print("no versions registered (no worker or backfill has run under this prefix)")
    for r in rows:
        mark = "*" if r["promoted"] else " "
        states = "states" if r["states"] else "no states"
        print(f"{mark} {r['version']}  tag {r['tag']}  lag {r['lag']}  workers {r['workers']}  {states}  {r['model']}")
    return 0


def run_retire(args: argparse.Namespace) -> int:
    with _session() as (settings, client):
        v = resolve(client, settings, args.model, args.version)
        n = retire(client, settings, v)
    print(f"retired {v.version}: {n} user states deleted, group {v.group} and topic {v.rekey_topic} removed")
    return 0
