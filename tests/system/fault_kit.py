"""What the fault suites share: the event slice, a background feeder, the oracle and the numbers each test records.

Every fault test replays the same >= 20,000 real ML-100K events across all 943 users (each user's first 22 ratings,
in time order) and ends with the offline replay oracle passing (every user present, exact event counts, max |dp| <=
1e-5). "Mid-stream" always means: wait until some but not all events are applied, then inject the fault.

The feeder produces the events at a modest rate and, where a test needs the stream to still be running when a fault
hits, stays at most ``lead`` events ahead of what Redis shows applied (so a worker outage pauses it rather than
letting the stream end during the outage).
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections import Counter
from pathlib import Path

import orjson
import pytest
import redis
from kafka import KafkaProducer

from export.runtime import StepSession
from streams.tools.verify import verify_events
from tests.conftest import REPO
from tests.harness import applied_events, ml_events, user_keys, wait_for

PER_USER = 22  # first 22 events of each of the 943 users: 20,658 events
WAIT = 180  # generous: the box is shared with other test runs
FAULTS_LOG = REPO / "artifacts" / "faults.jsonl"


@pytest.fixture(scope="module")
def events(data_dir: Path) -> list[dict]:
    everything = ml_events(data_dir, 100_000)
    seen: Counter = Counter()
    out = []
    for e in everything:
        if seen[e["user_id"]] < PER_USER:
            seen[e["user_id"]] += 1
            out.append(e)
    assert len(out) >= 20_000 and len(seen) >= 500, (len(out), len(seen))
    return out


class Feeder(threading.Thread):
    """Produces ``events`` (keyed by user id) at about ``rate`` events/s, at most ``lead`` ahead of ``applied()``.

    ``gate`` (set = go) pauses it between chunks; ``rate`` may be changed while it runs; ``producer`` options go to
    kafka-python's producer (``linger_ms=5, acks=1`` unless given).
    """

    def __init__(
        self,
        bootstrap: str,
        topic: str,
        events: list,
        rate: float,
        lead: int | None = None,
        applied=None,
        **producer: object,
    ):
        super().__init__(daemon=True)
        self.bootstrap, self.topic, self.events = bootstrap, topic, events
        self.producer_options = {"linger_ms": 5, "acks": 1, **producer}
        self.rate, self.lead, self.applied = rate, lead, applied
        self.produced = 0
        self.last_applied = 0
        self.error: BaseException | None = None
        self.gate = threading.Event()
        self.gate.set()
        self.stopping = False

    def run(self) -> None:
        try:
            producer = KafkaProducer(bootstrap_servers=self.bootstrap, **self.producer_options)
            try:
                chunk = 100
                t_next = time.monotonic()
                for i in range(0, len(self.events), chunk):
                    while not self.stopping and (not self.gate.is_set() or self._too_far_ahead()):
                        time.sleep(0.05)
                        t_next = time.monotonic()
                    if self.stopping:
                        return
                    for ev in self.events[i : i + chunk]:
                        value = ev if isinstance(ev, bytes) else orjson.dumps(ev)
                        producer.send(self.topic, key=str(ev["user_id"]).encode(), value=value)
                    producer.flush()
                    self.produced = min(len(self.events), i + chunk)
                    t_next += chunk / self.rate
                    time.sleep(max(0.0, t_next - time.monotonic()))
            finally:
                producer.close()
        except BaseException as exc:  # surfaced by finish()
            self.error = exc

    def _too_far_ahead(self) -> bool:
        if self.lead is None or self.applied is None:
            return False
        # Redis down (the outage test): keep feeding up to ``lead`` past the last known count, so the worker has
        # events to apply (and Redis writes to retry) during the outage instead of sitting idle
        with contextlib.suppress(redis.RedisError):
            self.last_applied = self.applied()
        return self.produced - self.last_applied >= self.lead

    def finish(self, timeout: float = WAIT) -> None:
        self.join(timeout)
        assert not self.is_alive(), f"feeder still running after {timeout}s ({self.produced} produced)"
        if self.error:
            raise self.error


def oracle(events, trained_model, settings, client):
    report = verify_events(events, StepSession(trained_model, device="cpu"), settings, client)
    assert report.ok, report.summary()
    assert report.max_dp <= 1e-5, report.summary()
    return report


def record(test: str, **numbers: object) -> None:
    """Print the test's numbers (pytest -s) and append them as one JSON line to artifacts/faults.jsonl."""
    line = orjson.dumps({"test": test, "at": round(time.time(), 1), **numbers}).decode()
    print(f"\nFAULTS {line}")
    FAULTS_LOG.parent.mkdir(parents=True, exist_ok=True)
    with open(FAULTS_LOG, "a") as f:
        f.write(line + "\n")


def safe_metric(worker, name: str, default: float = 0.0) -> float:
    try:
        return worker.metric(name)
    except OSError:
        return default


def partition_progress(client, prefix: str, topic: str) -> dict[int, int]:
    """Per input partition, the highest applied offset over all users (from each user's ``pos`` field)."""
    keys = user_keys(client, prefix)
    pipe = client.pipeline(transaction=False)
    for k in keys:
        pipe.hget(k, "pos")
    out: dict[int, int] = {}
    for pos in pipe.execute():
        for tp, off in orjson.loads(pos or b"{}").items():
            t, p = tp.rsplit(":", 1)
            if t == topic:
                out[int(p)] = max(out.get(int(p), -1), off)
    return out


def wait_applied_more_than(client, prefix: str, before: int, what: str) -> float:
    """Wait until Redis shows more than ``before`` applied events; return when (monotonic)."""
    wait_for(lambda: applied_events(client, prefix) > before, WAIT, what, interval=0.05)
    return time.monotonic()
