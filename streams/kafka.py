"""Kafka plumbing: kafka-python clients from the settings (SASL/SSL, topic creation), the fetch-wait cap for Faust's
consumer, and :class:`RecordBatches`, the worker's batched producer path."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Sequence
from typing import Any

from kafka import KafkaAdminClient
from kafka.admin import NewTopic
from kafka.errors import KafkaError, TopicAlreadyExistsError

from models.errors import ServiceError
from streams.settings import Settings

log = logging.getLogger(__name__)


def cap_fetch_wait(max_wait_ms: int) -> None:
    """Cap the fetch wait of every AIOKafkaConsumer created from now on (Faust's included) at ``max_wait_ms``.

    Faust builds its consumer with ``fetch_max_wait_ms=1500`` and offers no setting; a broker that holds a fetch that
    long (Tansu holds it ~500 ms even with data waiting) adds it to every event's latency.
    """
    import aiokafka

    original = getattr(aiokafka.AIOKafkaConsumer, "_interest_original", aiokafka.AIOKafkaConsumer)

    class ConsumerWithFetchWait(original):  # type: ignore[misc, valid-type]
        _interest_original = original

        def __init__(self, *args: object, **kwargs: object) -> None:
            kwargs["fetch_max_wait_ms"] = min(int(kwargs.get("fetch_max_wait_ms", 500)), max_wait_ms)  # type: ignore[call-overload]
            super().__init__(*args, **kwargs)

    aiokafka.AIOKafkaConsumer = ConsumerWithFetchWait  # the name Faust's driver looks up at consumer creation


def client_config(settings: Settings) -> dict[str, object]:
    """Connection options for any kafka-python client (producer, consumer, admin)."""
    cfg: dict[str, object] = {
        "bootstrap_servers": [b.strip() for b in settings.kafka_bootstrap.split(",")],
        "security_protocol": settings.kafka_security_protocol,
    }
    if settings.kafka_security_protocol.startswith("SASL"):
        cfg["sasl_mechanism"] = settings.kafka_sasl_mechanism
        cfg["sasl_plain_username"] = settings.kafka_sasl_username
        cfg["sasl_plain_password"] = (
            settings.kafka_sasl_password.get_secret_value() if settings.kafka_sasl_password else None
        )
    if settings.kafka_security_protocol in ("SSL", "SASL_SSL"):
        for name in ("cafile", "certfile", "keyfile"):
            value = getattr(settings, f"kafka_ssl_{name}")
            if value:
                cfg[f"ssl_{name}"] = str(value)
    return cfg


def output_producer(settings: Settings) -> Any:
    """An aiokafka producer (not started) for the worker's records, configured like Faust's own: acks from all
    in-sync replicas, a 1 ms linger (a batch waits for delivery of its records) and 256 KiB record batches."""
    from aiokafka import AIOKafkaProducer
    from aiokafka.helpers import create_ssl_context

    cfg = client_config(settings)
    ssl = {k: cfg.pop(f"ssl_{k}", None) for k in ("cafile", "certfile", "keyfile")}
    if settings.kafka_security_protocol in ("SSL", "SASL_SSL"):
        cfg["ssl_context"] = create_ssl_context(**ssl)
    return AIOKafkaProducer(**cfg, acks="all", linger_ms=1, max_batch_size=256 * 1024, client_id=settings.app_id)


def admin(settings: Settings) -> KafkaAdminClient:
    try:
        return KafkaAdminClient(**client_config(settings), request_timeout_ms=10_000)
    except KafkaError as exc:
        raise ServiceError(f"cannot reach Kafka at {settings.kafka_bootstrap}: {type(exc).__name__}") from None


def ensure_topics(settings: Settings) -> dict[str, int]:
    """Create the input, re-key, output and dead-letter topics if missing; return the partition count of each.

    The re-key topic gets as many partitions as the input topic, so a user hashes to the same partition number in
    both and Faust's assignor gives both to the same worker (co-partitioning).
    """
    client = admin(settings)
    try:
        existing = _partition_counts(client)
        wanted_input = existing.get(settings.input_topic, settings.partitions)
        wanted = {
            settings.input_topic: wanted_input,
            settings.rekey_topic: wanted_input,
            settings.output_topic: settings.partitions,
            settings.dlq_topic: settings.partitions,
        }
        missing = [NewTopic(t, n, 1) for t, n in wanted.items() if t not in existing]
        if missing:
            with contextlib.suppress(TopicAlreadyExistsError):  # another worker created them meanwhile
                client.create_topics(missing)
            log.info("created topics: %s", ", ".join(f"{t.name}[{t.num_partitions}]" for t in missing))
        counts = _partition_counts(client)
    finally:
        client.close()
    if counts.get(settings.rekey_topic) != counts.get(settings.input_topic):
        raise ServiceError(
            f"topic {settings.rekey_topic!r} has {counts.get(settings.rekey_topic)} partitions but "
            f"{settings.input_topic!r} has {counts.get(settings.input_topic)}; they must match (co-partitioning)"
        )
    return {t: counts[t] for t in wanted}


def _partition_counts(client: KafkaAdminClient) -> dict[str, int]:
    out = {}
    for t in client.describe_topics():
        if not t.get("error_code") and t.get("partitions"):
            out[t.get("name") or t.get("topic")] = len(t["partitions"])
    return out


class RecordBatches:
    """One batch's records, filled straight into aiokafka record batches per (topic, partition), then sent together.

    ``producer.send()`` (Faust's or aiokafka's) costs ~25 us a record: a future, signals, the accumulator's lookups.
    Appending to a ``BatchBuilder`` costs a few; each builder goes out with one ``send_batch``. :meth:`send` hands them
    over and returns their delivery futures (each resolves once the broker has acknowledged its records).
    """

    def __init__(self, producer: Any) -> None:  # an aiokafka.AIOKafkaProducer, started
        self.producer = producer
        self._open: dict[tuple[str, int], Any] = {}  # (topic, partition) -> BatchBuilder being filled
        self._full: dict[tuple[str, int], list[Any]] = {}  # builders that filled up, in order

    def add(
        self, topic: str, partition: int, key: bytes | None, value: bytes, headers: Sequence[tuple[str, bytes]] = ()
    ) -> None:
        tp = (topic, partition)
        builder = self._open.get(tp)
        if builder is None:
            builder = self._open[tp] = self.producer.create_batch()
        if builder.append(key=key, value=value, timestamp=None, headers=list(headers)) is None:
            self._full.setdefault(tp, []).append(builder)  # full: start another (a first record always fits)
            builder = self._open[tp] = self.producer.create_batch()
            builder.append(key=key, value=value, timestamp=None, headers=list(headers))

    async def send(self) -> list[asyncio.Future]:
        """Hand every builder to the producer (one partition's in order); returns their delivery futures at once.

        aiokafka keeps one batch per partition in flight, so records sent by a later call are delivered after these.
        """
        send_batch = self.producer.send_batch

        async def send_partition(tp: tuple[str, int]) -> list[asyncio.Future]:
            return [await send_batch(b, tp[0], partition=tp[1]) for b in (*self._full.get(tp, ()), self._open[tp])]

        sent = await asyncio.gather(*(send_partition(tp) for tp in self._open))
        self._open.clear()
        self._full.clear()
        return [f for per_tp in sent for f in per_tp]
