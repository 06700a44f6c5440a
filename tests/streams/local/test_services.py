"""Real round trips against the session's broker and Redis (no mocks)."""

from __future__ import annotations

import time

import pytest
import redis
from kafka import KafkaConsumer, KafkaProducer, TopicPartition
from kafka.admin import KafkaAdminClient, NewTopic

from models.errors import ServiceError
from streams.local.services import free_port, port_is_free, start_redis, wait_until

pytestmark = pytest.mark.integration


def _consume(consumer: KafkaConsumer, n: int, timeout: float = 30.0) -> list:
    got: list = []
    deadline = time.monotonic() + timeout
    while len(got) < n and time.monotonic() < deadline:
        for records in consumer.poll(timeout_ms=500).values():
            got.extend(records)
    return got


def test_produce_consume_with_group_and_committed_offsets(kafka_bootstrap: str, names) -> None:
    topic = names.input_topic
    admin = KafkaAdminClient(bootstrap_servers=kafka_bootstrap)
    admin.create_topics([NewTopic(topic, num_partitions=1, replication_factor=1)])
    admin.close()
    producer = KafkaProducer(bootstrap_servers=kafka_bootstrap)
    for i in range(10):
        producer.send(topic, key=b"u1", value=f"m{i}".encode())
    producer.flush()
    producer.close()

    group = names.app_id
    opts = dict(
        bootstrap_servers=kafka_bootstrap,
        group_id=group,
        auto_offset_reset="earliest",
        enable_auto_commit=False,
        session_timeout_ms=6000,
        heartbeat_interval_ms=1000,
    )
    first = KafkaConsumer(topic, **opts)
    got = _consume(first, 6)
    assert [r.value for r in got[:6]] == [f"m{i}".encode() for i in range(6)]
    tp = TopicPartition(topic, 0)
    first.commit({tp: __import__("kafka").OffsetAndMetadata(6, "", -1)})
    assert first.committed(tp) == 6
    first.close()

    # a new member of the same group resumes at the committed offset
    second = KafkaConsumer(topic, **opts)
    rest = _consume(second, 4)
    second.close()
    assert [r.value for r in rest] == [f"m{i}".encode() for i in range(6, 10)]


def test_redis_round_trip(redis_url: str, names) -> None:
    client = redis.Redis.from_url(redis_url)
    key = f"{names.redis_prefix}hello"
    client.hset(key, mapping={"a": "1", "b": b"\x00\x01"})
    assert client.hgetall(key) == {b"a": b"1", b"b": b"\x00\x01"}
    client.delete(key)
    assert not client.exists(key)


def test_start_refuses_taken_port(tmp_path) -> None:
    svc = start_redis(port=free_port(), run_dir=tmp_path)
    try:
        assert not port_is_free(svc.port)
        with pytest.raises(ServiceError, match=f"port {svc.port} .* is taken"):
            start_redis(port=svc.port, run_dir=tmp_path / "other")
    finally:
        svc.stop()
    wait_until(lambda: port_is_free(svc.port), 10, what="port release")
