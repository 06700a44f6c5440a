"""Model versions side by side: what each version's worker, backfill and readers derive from the model version.

Every version has its own user hashes (``<prefix><tag>:<user>``, keys built in :mod:`streams.core.state`), its own
consumer group ``<app_id>.<tag>`` and its own re-key topic ``<rekey_topic>.<tag>``, so two versions consuming the
same input never share offsets or re-keyed events (each re-keys the misrouted events itself and applies its own copy
once). The pointer ``<prefix>promoted`` says which version readers (and the output topic) see; the registry
``<prefix>versions`` lists the versions with their model path and group. Nothing here touches Kafka.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import orjson

from streams.core.state import promoted_key, version_tag, versions_key
from streams.settings import Settings


def model_version(model_path: Path) -> str:
    """The version recorded in an exported model (a CPU session: the same checks, and the same one-line errors for a
    missing, corrupt or foreign file, as the worker's own loading)."""
    from export.runtime import StepSession

    return StepSession(model_path, device="cpu", intra_op_threads=1).meta.version


@dataclass(frozen=True)
class Version:
    """One model version's names: its tag, consumer group and re-key topic."""

    version: str
    tag: str
    group: str
    rekey_topic: str

    @classmethod
    def of(cls, settings: Settings, version: str) -> Version:
        tag = version_tag(version)
        return cls(version, tag, f"{settings.app_id}.{tag}", f"{settings.rekey_topic}.{tag}")

    def settings(self, settings: Settings) -> Settings:
        """The settings a worker of this version runs with: its consumer group (the Faust app id) and re-key topic."""
        return settings.model_copy(update={"app_id": self.group, "rekey_topic": self.rekey_topic})


def registry(client, settings: Settings) -> dict[str, dict]:
    """version -> its registry entry (tag, group, rekey_topic, model, registered, promoted, backfilled...)."""
    raw = client.hgetall(versions_key(settings.redis_prefix))
    return {k.decode(): orjson.loads(v) for k, v in raw.items()}


def promoted(client, settings: Settings) -> str | None:
    value = client.get(promoted_key(settings.redis_prefix))
    return value.decode() if value is not None else None


def register(client, settings: Settings, v: Version, model_path: Path, **fields: object) -> dict:
    """Add (or update) a version's registry entry; returns it. Keeps what an earlier registration recorded."""
    key = versions_key(settings.redis_prefix)
    old = client.hget(key, v.version)
    entry = orjson.loads(old) if old else {"registered": time.time()}
    entry.update(tag=v.tag, group=v.group, rekey_topic=v.rekey_topic, model=str(Path(model_path).resolve()))
    entry.update(fields)
    client.hset(key, v.version, orjson.dumps(entry))
    return entry


def promote_if_none(client, settings: Settings, version: str) -> bool:
    """A fresh deployment just works: promote ``version`` when nothing is promoted yet (SET NX). True if it did."""
    if client.set(promoted_key(settings.redis_prefix), version, nx=True):
        _stamp(client, settings, version)
        return True
    return False


def set_promoted(client, settings: Settings, version: str) -> str | None:
    """Point readers at ``version`` (one SET: atomic for every reader); returns the version promoted before."""
    before = client.set(promoted_key(settings.redis_prefix), version, get=True)
    _stamp(client, settings, version)
    return before.decode() if before is not None else None


def _stamp(client, settings: Settings, version: str) -> None:
    key = versions_key(settings.redis_prefix)
    old = client.hget(key, version)
    if old:
        entry = orjson.loads(old)
        entry["promoted"] = time.time()
        client.hset(key, version, orjson.dumps(entry))
