"""``python -m streams.bench producers``: the output records' delivery alone, the worker's way (aiokafka record
batches, two batches awaiting delivery) against librdkafka's producer (confluent-kafka), on a broker of its own.

A probe, not a bench job: it asks whether another producer would deliver the worker's records faster or for less
CPU. Each round runs every variant once, alternating, over the same records (batches of 5,000 records of 580 bytes,
the size of ML-100K's output records, keyed over 2,000 users, 16 partitions); it prints records/s and records per
CPU-second of the producing process (its librdkafka threads included).
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import random
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from streams.settings import Settings

PER_BATCH, PARTITIONS, RECORD_BYTES, USERS = 5000, 16, 580, 2000
KEYS = [f"user{i}@0".encode() for i in range(USERS)]
VALUE = b"x" * RECORD_BYTES


def _topic(settings: Settings, tag: str) -> str:
    from kafka.admin import NewTopic

    from streams.kafka import admin
    from streams.local.services import wait_until

    name = f"probe-{tag}-{random.randrange(1 << 30)}"
    client = admin(settings)
    try:
        client.create_topics([NewTopic(name, PARTITIONS, 1)])
        wait_until(
            lambda: (
                sum(p.get("leader_id", -1) >= 0 for p in client.describe_topics([name])[0]["partitions"]) == PARTITIONS
            ),
            30,
            what=f"topic {name}",
        )
    finally:
        client.close()
    return name


def _key(i: int) -> tuple[bytes, int]:
    key = KEYS[i % USERS]
    return key, i % USERS % PARTITIONS


async def _aiokafka(settings: Settings, batches: int, max_request: int) -> tuple[float, float]:
    """The worker's producer (``output_producer``) and its RecordBatches, up to two batches awaiting delivery."""
    from streams.kafka import RecordBatches, output_producer

    topic = _topic(settings, "aiokafka")
    producer = output_producer(settings, max_request_size=max_request)
    await producer.start()
    try:
        # warm: metadata, connections and every partition's leader answering, before the timed records
        await asyncio.gather(*(producer.send_and_wait(topic, VALUE, partition=p) for p in range(PARTITIONS)))
        pending: list[asyncio.Future] = []
        t0, c0 = time.perf_counter(), time.process_time()
        for b in range(batches):
            records = RecordBatches(producer)
            for i in range(b * PER_BATCH, (b + 1) * PER_BATCH):
                key, partition = _key(i)
                records.add(topic, partition, key, VALUE)
            pending.append(asyncio.ensure_future(asyncio.gather(*await records.send())))
            while len(pending) > 2:
                await pending.pop(0)
        await asyncio.gather(*pending)
        return time.perf_counter() - t0, time.process_time() - c0
    finally:
        await producer.stop()


def _librdkafka(settings: Settings, batches: int, extra: dict) -> tuple[float, float]:
    """``produce()`` per record, a delivery callback on each batch's last one, up to two batches undelivered."""
    from confluent_kafka import Producer

    topic = _topic(settings, "librdkafka")
    conf = {
        "bootstrap.servers": settings.kafka_bootstrap,
        "enable.idempotence": True,
        "linger.ms": 1,
        "batch.size": 1 << 20,
        "queue.buffering.max.messages": 1_000_000,
        "queue.buffering.max.kbytes": 2 << 20,
    }
    producer = Producer(conf | extra)
    delivered = [0]
    failed: list[str] = []

    def on_delivery(err, msg) -> None:
        if err is not None:
            failed.append(str(err))
        delivered[0] += 1

    for p in range(PARTITIONS):  # warm, as above
        producer.produce(topic, VALUE, partition=p, on_delivery=on_delivery)
    if producer.flush(60) or failed:
        raise RuntimeError(f"librdkafka warm-up failed: {failed[:1]}")
    delivered[0] = 0
    t0, c0 = time.perf_counter(), time.process_time()
    for b in range(batches):
        for i in range(b * PER_BATCH, (b + 1) * PER_BATCH):
            key, partition = _key(i)
            last = i == (b + 1) * PER_BATCH - 1
            producer.produce(topic, VALUE, key, partition=partition, on_delivery=on_delivery if last else None)
        while b + 1 - delivered[0] > 2:
            producer.poll(0.001)
    if producer.flush(60):
        failed.append("records left undelivered after 60 s")
    if failed:
        raise RuntimeError(f"librdkafka delivery failed: {failed[0]}")
    return time.perf_counter() - t0, time.process_time() - c0


def producers(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(prog="python -m streams.bench producers", description=__doc__)
    ap.add_argument("--bootstrap", help="an existing broker (default: start one, then stop it)")
    ap.add_argument("--batches", type=int, default=40, help="batches of 5,000 records per variant and round")
    ap.add_argument("--rounds", type=int, default=3)
    a = ap.parse_args(argv)
    # aiokafka warns of each NotLeaderForPartition retry while a new topic's leaders come up (the warm-up's)
    logging.getLogger("aiokafka").setLevel(logging.ERROR)

    from streams.local.services import free_port, start_broker

    service = None
    bootstrap = a.bootstrap
    if bootstrap is None:
        port = free_port()
        service = start_broker(port, Path(tempfile.mkdtemp(prefix="producers-probe-")))
        bootstrap = service.address
    settings = Settings(kafka_bootstrap=bootstrap)
    variants: list[tuple[str, Callable[[], tuple[float, float]]]] = [
        ("aiokafka, 1 MiB requests (the worker)", lambda: asyncio.run(_aiokafka(settings, a.batches, 1 << 20))),
        ("aiokafka, 8 MiB requests", lambda: asyncio.run(_aiokafka(settings, a.batches, 8 << 20))),
        ("librdkafka, idempotent, 5 in flight", lambda: _librdkafka(settings, a.batches, {})),
        (
            "librdkafka, not idempotent, 1 in flight",
            lambda: _librdkafka(
                settings,
                a.batches,
                {"enable.idempotence": False, "acks": "all", "max.in.flight.requests.per.connection": 1},
            ),
        ),
    ]
    n = a.batches * PER_BATCH
    try:
        for r in range(a.rounds):
            for name, run in variants:
                seconds, cpu = run()
                print(f"round {r + 1}  {name:40s} {n / seconds:9,.0f} records/s  {n / cpu:9,.0f} per CPU-s", flush=True)
    finally:
        if service is not None:
            service.stop()
    return 0
