"""Consumer-group offsets with kafka-python's admin client: what a version's group has committed, the topics' end
offsets, its lag, and the backfill's hand-off commit (the group must have no members then)."""

from __future__ import annotations

import time
from collections.abc import Iterable

from kafka import KafkaAdminClient, KafkaConsumer, TopicPartition
from kafka.errors import KafkaError
from kafka.structs import OffsetAndMetadata

from models.errors import ServiceError
from streams.kafka import admin, client_config
from streams.settings import Settings

TP = tuple[str, int]  # (topic, partition)
RETRY_S = 30.0  # how long a retriable error (no group coordinator yet, a leader moving) is retried


def _retrying(what: str, op):
    """``op()``, retried while Kafka answers with a retriable error (a fresh broker has no group coordinator until
    its offsets topic exists); ServiceError naming ``what`` otherwise or after RETRY_S."""
    deadline = time.monotonic() + RETRY_S
    while True:
        try:
            return op()
        except KafkaError as exc:
            if not getattr(exc, "retriable", False) or time.monotonic() > deadline:
                raise ServiceError(f"cannot {what}: {type(exc).__name__}: {exc}") from None
            time.sleep(0.5)


def partitions_of(settings: Settings, topics: Iterable[str]) -> list[TP]:
    """Every partition of ``topics`` that exists (an absent topic has none)."""
    consumer = KafkaConsumer(**client_config(settings))
    try:
        out: list[TP] = []
        for t in topics:
            out.extend((t, p) for p in sorted(consumer.partitions_for_topic(t) or ()))
        return out
    finally:
        consumer.close()


def end_offsets(settings: Settings, tps: Iterable[TP], beginning: bool = False) -> dict[TP, int]:
    """The high watermark (next offset to be written) of each partition, or with ``beginning`` its first offset."""
    tps = list(tps)
    if not tps:
        return {}
    consumer = KafkaConsumer(**client_config(settings))
    get = consumer.beginning_offsets if beginning else consumer.end_offsets
    try:
        ends = _retrying("read offsets", lambda: get([TopicPartition(t, p) for t, p in tps]))
    finally:
        consumer.close()
    return {(tp.topic, tp.partition): off for tp, off in ends.items()}


def committed(settings: Settings, group: str, tps: Iterable[TP]) -> dict[TP, int]:
    """The group's committed offsets of ``tps`` (partitions it has none for are left out)."""
    tps = list(tps)
    client: KafkaAdminClient = admin(settings)
    try:
        spec = {group: [TopicPartition(t, p) for t, p in tps]}
        got = _retrying(f"read group {group}'s offsets", lambda: client.list_group_offsets(spec))[group]
    finally:
        client.close()
    return {(tp.topic, tp.partition): meta.offset for tp, meta in got.items() if meta.offset >= 0}


def members(settings: Settings, group: str) -> int:
    """How many consumers are members of ``group`` now (0 for an empty or unknown group)."""
    client = admin(settings)
    try:
        desc = _retrying(f"describe group {group}", lambda: client.describe_groups([group]))
    finally:
        client.close()
    return len((desc.get(group) or {}).get("members") or ())  # {group: {"members": [...], "group_state": ...}}


def commit(settings: Settings, group: str, offsets: dict[TP, int]) -> None:
    """Commit ``offsets`` (next offset to read) for ``group``, which must have no members; ServiceError otherwise."""
    client = admin(settings)
    try:
        want = {TopicPartition(t, p): OffsetAndMetadata(off, "backfill", None) for (t, p), off in offsets.items()}
        result = _retrying(f"commit group {group}'s offsets", lambda: client.alter_group_offsets(group, want))
    finally:
        client.close()
    failed = {f"{tp.topic}:{tp.partition}": err.__name__ for tp, err in result.items() if err.errno != 0}
    if failed:
        raise ServiceError(f"Kafka refused group {group}'s offsets (is a worker of it running?): {failed}")


def delete_group(settings: Settings, group: str) -> bool:
    """Delete ``group`` and its offsets; False when Kafka refused (it has members, or it does not exist)."""
    client = admin(settings)
    try:
        result = client.delete_groups([group])
    except KafkaError:
        return False
    finally:
        client.close()
    return result.get(group) == "OK"  # {group: "OK" or the error's name}


def lag(settings: Settings, group: str, topics: Iterable[str]) -> int:
    """Records of ``topics`` that ``group`` has not committed past (a partition without a commit counts from its
    first retained record)."""
    tps = partitions_of(settings, topics)
    ends = end_offsets(settings, tps)
    done = committed(settings, group, tps)
    if len(done) < len(ends):
        done = end_offsets(settings, [tp for tp in ends if tp not in done], beginning=True) | done
    return sum(max(0, end - done[tp]) for tp, end in ends.items())
