"""Kafka plumbing with no Faust in it: :class:`KafkaConnection` (one connection config rendered for every client),
kafka-python admin and topic creation, the output producer, and :class:`RecordBatches`, the worker's batched
producer path."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import ssl
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from kafka import KafkaAdminClient
from kafka.admin import NewTopic
from kafka.errors import KafkaError, TopicAlreadyExistsError

from models.errors import ServiceError
from streams.settings import Settings

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class KafkaConnection:
    """How to reach the brokers (addresses, SASL, TLS), read once from the settings and rendered for each client:
    kafka-python, aiokafka, Faust and librdkafka (confluent-kafka, kcat) name the same options differently."""

    bootstrap: tuple[str, ...]
    security_protocol: str = "PLAINTEXT"
    sasl_mechanism: str = "PLAIN"
    sasl_username: str | None = None
    sasl_password: str | None = None
    ssl_cafile: str | None = None
    ssl_certfile: str | None = None
    ssl_keyfile: str | None = None

    @classmethod
    def from_settings(cls, s: Settings) -> KafkaConnection:
        tls = s.kafka_security_protocol in ("SSL", "SASL_SSL")
        path = lambda p: str(p) if tls and p else None  # noqa: E731  (TLS files only matter with TLS)
        return cls(
            bootstrap=tuple(b.strip() for b in s.kafka_bootstrap.split(",")),
            security_protocol=s.kafka_security_protocol,
            sasl_mechanism=s.kafka_sasl_mechanism,
            sasl_username=s.kafka_sasl_username,
            sasl_password=s.kafka_sasl_password.get_secret_value() if s.kafka_sasl_password else None,
            ssl_cafile=path(s.kafka_ssl_cafile),
            ssl_certfile=path(s.kafka_ssl_certfile),
            ssl_keyfile=path(s.kafka_ssl_keyfile),
        )

    @property
    def sasl(self) -> bool:
        return self.security_protocol.startswith("SASL")

    @property
    def tls(self) -> bool:
        return self.security_protocol in ("SSL", "SASL_SSL")

    def ssl_context(self) -> ssl.SSLContext | None:
        """The TLS context (the CA bundle, and the client certificate for mutual TLS), or None without TLS."""
        if not self.tls:
            return None
        context = ssl.create_default_context(cafile=self.ssl_cafile)
        if self.ssl_certfile:
            context.load_cert_chain(self.ssl_certfile, self.ssl_keyfile)
        return context

    def kafka_python(self) -> dict[str, Any]:
        """Options for any kafka-python client (producer, consumer, admin)."""
        cfg: dict[str, Any] = {"bootstrap_servers": list(self.bootstrap), "security_protocol": self.security_protocol}
        if self.sasl:
            cfg |= {
                "sasl_mechanism": self.sasl_mechanism,
                "sasl_plain_username": self.sasl_username,
                "sasl_plain_password": self.sasl_password,
            }
        for name in ("cafile", "certfile", "keyfile"):
            value = getattr(self, f"ssl_{name}")
            if value:
                cfg[f"ssl_{name}"] = value
        return cfg

    def aiokafka(self) -> dict[str, Any]:
        """Options for an aiokafka client: as kafka-python's, with one ``ssl_context`` instead of the files."""
        cfg = {k: v for k, v in self.kafka_python().items() if not k.startswith("ssl_")}
        if self.tls:
            cfg["ssl_context"] = self.ssl_context()
        return cfg

    def faust_broker(self) -> list[str]:
        return [f"kafka://{b}" for b in self.bootstrap]

    def faust_credentials(self) -> Any:
        """Faust's ``broker_credentials``: SASL and/or SSL credentials, or None for PLAINTEXT."""
        import faust

        context = self.ssl_context()
        if self.sasl:
            return faust.SASLCredentials(
                username=self.sasl_username,
                password=self.sasl_password or "",
                ssl_context=context,
                mechanism=self.sasl_mechanism,
            )
        return faust.SSLCredentials(context) if context is not None else None

    def librdkafka(self) -> dict[str, str]:
        """Properties for a librdkafka client (confluent-kafka's config dict; ``kcat -X name=value``)."""
        cfg = {"bootstrap.servers": ",".join(self.bootstrap), "security.protocol": self.security_protocol.lower()}
        if self.sasl:
            cfg |= {
                "sasl.mechanism": self.sasl_mechanism,
                "sasl.username": self.sasl_username or "",
                "sasl.password": self.sasl_password or "",
            }
        for name, prop in (("cafile", "ca"), ("certfile", "certificate"), ("keyfile", "key")):
            value = getattr(self, f"ssl_{name}")
            if value:
                cfg[f"ssl.{prop}.location"] = value
        return cfg


def client_config(settings: Settings) -> dict[str, Any]:
    """Connection options for any kafka-python client (producer, consumer, admin)."""
    return KafkaConnection.from_settings(settings).kafka_python()


def output_producer(settings: Settings, **overrides: Any) -> Any:
    """An aiokafka producer (not started) for the worker's records (output, dead letters, re-keys): idempotent (acks
    from all in-sync replicas; a batch resent after a lost acknowledgement is not written twice, so a broker failover
    duplicates no output record and no re-keyed event), a 1 ms linger (a batch waits for delivery of its records) and
    256 KiB record batches. ``overrides`` are other AIOKafkaProducer options (the bench's producer probe varies
    ``max_request_size``)."""
    from aiokafka import AIOKafkaProducer

    return AIOKafkaProducer(
        **KafkaConnection.from_settings(settings).aiokafka(),
        acks="all",
        enable_idempotence=True,
        linger_ms=1,
        max_batch_size=256 * 1024,
        compression_type=None if settings.output_compression == "none" else settings.output_compression,
        client_id=settings.app_id,
        **overrides,
    )


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
        # Kafka answers CreateTopics before every broker's metadata has the new topics: wait until they show
        counts = _partition_counts(client)
        deadline = time.monotonic() + 30.0
        while any(t not in counts for t in wanted):
            if time.monotonic() > deadline:
                absent = ", ".join(t for t in wanted if t not in counts)
                raise ServiceError(f"topics {absent} still missing from Kafka's metadata 30 s after creating them")
            time.sleep(0.1)
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
