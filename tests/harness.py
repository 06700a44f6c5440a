"""Helpers for tests that run real worker processes against the session's broker and Redis.

worker = start_worker(names, kafka_bootstrap, redis_url, model, tmp_path)
produce(kafka_bootstrap, names.input_topic, events)
wait_for(lambda: applied_events(client, names.redis_prefix) == len(events), 60, "all events applied")
worker.stop()
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Callable, Iterable
from pathlib import Path

import orjson
from kafka import KafkaConsumer, KafkaProducer

from streams.local.services import WorkerProcess, free_port, spawn_worker, wait_until
from tests.conftest import REPO

TEST_SESSION_TIMEOUT_S = "6"  # Kafka's lowest (group.min.session.timeout.ms): a killed worker's partitions move soon


def wait_for(predicate: Callable[[], object], timeout: float, what: str, interval: float = 0.2) -> object:
    """Poll until ``predicate()`` is truthy (returned); fail the test with ``what`` after ``timeout`` seconds."""
    return wait_until(predicate, timeout, interval, what, AssertionError)


def worker_env(names, kafka_bootstrap: str, redis_url: str, model: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("INTEREST_")}
    env.update(names.worker_env(kafka_bootstrap, redis_url))
    env.update(
        {
            "INTEREST_MODEL_PATH": str(model),
            "INTEREST_SESSION_TIMEOUT_S": TEST_SESSION_TIMEOUT_S,
            "INTEREST_WEB_PORT": "0",
            "INTEREST_PARTITIONS": "4",
            "INTEREST_DEVICE": "cpu",
            "PYTHONUNBUFFERED": "1",
        }
    )
    env.update(extra)
    return env


def run_cli(env: dict[str, str], *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    """``interest-stream ARGS`` with exactly ``env``, from the repository root; output captured as text."""
    return subprocess.run(
        [sys.executable, "-m", "streams.cli", *args], env=env, cwd=REPO, capture_output=True, text=True, timeout=timeout
    )


def start_worker(
    names, kafka_bootstrap: str, redis_url: str, model: Path, log_dir: Path, ready: bool = True, **extra: str
) -> WorkerProcess:
    """Start a worker; with ``ready`` wait until its metrics endpoint answers (the model loaded, topics exist)."""
    port = free_port()
    env = worker_env(names, kafka_bootstrap, redis_url, model, INTEREST_METRICS_PORT=str(port), **extra)
    w = spawn_worker(env, log_dir / f"worker-{port}.log", cwd=REPO)
    if ready:
        wait_for(lambda: w.alive() and w.metric("interest_events_in_total") >= 0, 60, f"worker metrics ({w.log})")
    return w


def produce(
    kafka_bootstrap: str,
    topic: str,
    events: Iterable[dict | bytes],
    key: Callable[[object], bytes | None] | None = None,
    headers: list[tuple[str, bytes]] | None = None,
) -> int:
    """Send events (dicts are JSON-encoded) keyed by their user id (or by ``key(event)``), each with ``headers``;
    returns the count."""
    producer = KafkaProducer(bootstrap_servers=kafka_bootstrap, linger_ms=5, acks=1)
    n = 0
    try:
        for ev in events:
            value = ev if isinstance(ev, bytes) else orjson.dumps(ev)
            if key is not None:
                k = key(ev)
            elif isinstance(ev, dict):
                k = str(ev["user_id"]).encode()
            else:
                k = None
            producer.send(topic, key=k, value=value, headers=headers)
            n += 1
        producer.flush()
    finally:
        producer.close()
    return n


def consume_all(kafka_bootstrap: str, topic: str, expected: int, timeout: float = 60.0) -> list:
    """Read ``expected`` records from the start of ``topic`` (no group); fails on timeout."""
    consumer = KafkaConsumer(
        topic, bootstrap_servers=kafka_bootstrap, auto_offset_reset="earliest", enable_auto_commit=False
    )
    got: list = []
    try:
        deadline = time.monotonic() + timeout
        while len(got) < expected and time.monotonic() < deadline:
            for records in consumer.poll(timeout_ms=500).values():
                got.extend(records)
    finally:
        consumer.close()
    assert len(got) >= expected, f"{topic}: got {len(got)} records, expected {expected}"
    return got


def model_names(names, model: Path):
    """The names a worker of ``model`` uses under this test's settings (:class:`streams.core.versions.Version`:
    tag, consumer group, re-key topic)."""
    from streams.core.versions import Version, model_version
    from streams.settings import Settings

    settings = Settings(**{k[len("INTEREST_") :].lower(): v for k, v in names.worker_env("x:1", "redis://x").items()})
    return Version.of(settings, model_version(model))


def user_keys(client, prefix: str, tag: str | None = None) -> list[bytes]:
    """The user hashes under ``prefix`` (of version ``tag``, or of every version; not the pointer or registry)."""
    from streams.core.state import user_key, versions_key

    match = user_key(prefix, tag, "*") if tag else prefix + "*:*"
    registry = versions_key(prefix).encode()
    return [k for k in client.scan_iter(match=match, count=1000, _type="HASH") if k != registry]


def applied_events(client, prefix: str, tag: str | None = None) -> int:
    """Sum of the ``events`` field over all users under ``prefix`` (of version ``tag``, or of all versions): what
    the workers have applied."""
    keys = user_keys(client, prefix, tag)
    if not keys:
        return 0
    pipe = client.pipeline(transaction=False)
    for k in keys:
        pipe.hget(k, "events")
    return sum(int(v or 0) for v in pipe.execute())


def redis_target(request, mode: str) -> tuple[str, object, dict[str, str], dict[str, object]]:
    """For tests run against one Redis and a Redis Cluster alike (``mode``: "single" or "cluster"): the URL, a client
    (a ``RedisCluster`` for the cluster), the worker's extra INTEREST_* variables and the settings overrides. The
    cluster fixtures are asked for only in cluster mode, so a single-Redis run starts no cluster."""
    if mode == "single":
        return request.getfixturevalue("redis_url"), request.getfixturevalue("rclient"), {}, {}
    url = request.getfixturevalue("redis_cluster_url")
    client = request.getfixturevalue("cluster_client")
    return url, client, {"INTEREST_REDIS_CLUSTER": "true"}, {"redis_url": url, "redis_cluster": True}


def ml_events(data_dir: Path, limit: int, users: int | None = None) -> list[dict]:
    """The first ``limit`` ML-100K events as the replay tool produces them (optionally only ``users`` users)."""
    from models.data import load_dataset
    from streams.tools.replay import wire_events

    ds = load_dataset("movielens-100k", data_dir / "ml-100k")
    events = list(wire_events(ds))
    if users is not None:
        keep = set(list(dict.fromkeys(e["user_id"] for e in events))[:users])
        events = [e for e in events if e["user_id"] in keep]
    return events[:limit]


def raw_messages(settings, events: Iterable[dict], start: int = 0, partition: int | None = None) -> list:
    """Events as the messages a worker would take from the input topic (4 partitions, keyed by user id), without a
    broker: offsets ``start``, ``start + 1``, ... (per partition increasing), on the key's partition unless given."""
    from streams.core.processor import RawMessage, default_partition

    out = []
    now_ms = time.time() * 1000.0  # a produce time, as Kafka stamps it
    for i, ev in enumerate(events):
        key = str(ev["user_id"]).encode()
        p = default_partition(key, 4) if partition is None else partition
        out.append(RawMessage(settings.input_topic, p, start + i, key, orjson.dumps(ev), now_ms))
    return out
