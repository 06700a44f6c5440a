"""The fault suite: real broker, real Redis, real worker processes, faults injected mid-stream, judged by the oracle.

    python -m pytest -m faults -s          # -s shows each test's numbers; they also go to artifacts/faults.jsonl

Every test replays the same >= 20,000 real ML-100K events across all 943 users (each user's first 22 ratings, in
time order) and ends with the offline replay oracle passing (every user present, exact event counts, max |dp| <=
1e-5). "Mid-stream" always means: wait until some but not all events are applied, then inject the fault.

A background feeder produces the events at a modest rate and, where a test needs the stream to still be running
when a fault hits, stays at most ``lead`` events ahead of what Redis shows applied (so a worker outage pauses it
rather than letting the stream end during the outage).
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
from kafka import KafkaAdminClient, KafkaProducer, TopicPartition
from redis.backoff import NoBackoff
from redis.retry import Retry

from export.runtime import StepSession
from streams.services import free_port, start_redis
from streams.verify import verify_events
from tests.conftest import REPO
from tests.streams.harness import applied_events, ml_events, start_worker, wait_for

pytestmark = [pytest.mark.integration, pytest.mark.faults, pytest.mark.slow]

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

    ``gate`` (set = go) pauses it between chunks; ``rate`` may be changed while it runs.
    """

    def __init__(self, bootstrap: str, topic: str, events: list, rate: float, lead: int | None = None, applied=None):
        super().__init__(daemon=True)
        self.bootstrap, self.topic, self.events = bootstrap, topic, events
        self.rate, self.lead, self.applied = rate, lead, applied
        self.produced = 0
        self.last_applied = 0
        self.error: BaseException | None = None
        self.gate = threading.Event()
        self.gate.set()
        self.stopping = False

    def run(self) -> None:
        try:
            producer = KafkaProducer(bootstrap_servers=self.bootstrap, linger_ms=5, acks=1)
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
    keys = list(client.scan_iter(match=prefix + "*", count=1000))
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


def test_kill_9_three_times_mid_stream(
    names, kafka_bootstrap, redis_url, trained_model, events, rclient, settings_for, tmp_path
):
    n = len(events)
    prefix = names.redis_prefix
    t_start = time.monotonic()
    worker = start_worker(names, kafka_bootstrap, redis_url, trained_model, tmp_path)
    feeder = Feeder(
        kafka_bootstrap,
        names.input_topic,
        events,
        rate=1500,
        lead=4000,
        applied=lambda: applied_events(rclient, prefix),
    )
    feeder.start()
    dups = applied_metric = 0.0
    recoveries, at_kill = [], []
    try:
        floor = 0
        for frac in (0.25, 0.5, 0.75):
            target = max(int(frac * n), floor + 1500)
            wait_for(lambda t=target: applied_events(rclient, prefix) >= t, WAIT, f"{target} events applied")
            dups += safe_metric(worker, "interest_duplicates_skipped_total")
            applied_metric += safe_metric(worker, "interest_events_applied_total")
            worker.kill()
            t_fault = time.monotonic()
            before = applied_events(rclient, prefix)
            assert before < n, "the stream must still be running when the worker is killed"
            at_kill.append(before)
            worker = start_worker(names, kafka_bootstrap, redis_url, trained_model, tmp_path)
            recoveries.append(
                round(wait_applied_more_than(rclient, prefix, before, "progress after kill") - t_fault, 2)
            )
            floor = applied_events(rclient, prefix)
        feeder.finish()
        wait_for(lambda: applied_events(rclient, prefix) == n, WAIT, "all events applied")
        dups += worker.metric("interest_duplicates_skipped_total")
        applied_metric += worker.metric("interest_events_applied_total")
    finally:
        feeder.stopping = True
        code = worker.stop()
    assert code == 0, worker.output()[-3000:]
    report = oracle(events, trained_model, settings_for(), rclient)
    assert report.events == n and report.users >= 500
    record(
        "kill_9_three_times",
        events=n,
        users=report.users,
        events_applied=applied_events(rclient, prefix),
        applied_at_kills=at_kill,
        duplicates_skipped=int(dups),
        max_dp=report.max_dp,
        recover_s=recoveries,
        total_s=round(time.monotonic() - t_start, 1),
    )


def test_two_workers_one_killed_survivor_takes_over_then_third_joins(
    names, kafka_bootstrap, redis_url, trained_model, events, rclient, settings_for, tmp_path
):
    n = len(events)
    prefix, topic = names.redis_prefix, names.input_topic
    t_start = time.monotonic()
    w1 = start_worker(names, kafka_bootstrap, redis_url, trained_model, tmp_path)
    w2 = start_worker(names, kafka_bootstrap, redis_url, trained_model, tmp_path)
    w3 = None
    feeder = Feeder(
        kafka_bootstrap, topic, events, rate=1500, lead=3000, applied=lambda: applied_events(rclient, prefix)
    )
    feeder.start()
    try:
        wait_for(
            lambda: (
                applied_events(rclient, prefix) >= 0.3 * n
                and w1.metric("interest_events_applied_total") > 0
                and w2.metric("interest_events_applied_total") > 0
            ),
            WAIT,
            "30% applied, both workers taking part",
        )
        w1_applied = w1.metric("interest_events_applied_total")
        dups_w1 = w1.metric("interest_duplicates_skipped_total")
        w1.kill()
        t_fault = time.monotonic()
        before = applied_events(rclient, prefix)
        assert before < n
        at_kill = partition_progress(rclient, prefix, topic)
        assert len(at_kill) == 4, at_kill
        # the survivor alone moves every partition past where it stood at the kill: it took over w1's partitions
        wait_for(
            lambda: all(p > at_kill[k] for k, p in partition_progress(rclient, prefix, topic).items()),
            WAIT,
            "every partition moving again (survivor took over)",
            interval=0.1,
        )
        takeover_s = round(time.monotonic() - t_fault, 2)
        wait_for(lambda: applied_events(rclient, prefix) >= max(0.6 * n, before + 1000), WAIT, "60% applied")
        assert applied_events(rclient, prefix) < n
        # a third worker joins while events still flow (the feeder slows down so it surely gets some)
        feeder.gate.clear()
        w3 = start_worker(names, kafka_bootstrap, redis_url, trained_model, tmp_path)
        t_join = time.monotonic()
        feeder.rate = 500
        feeder.gate.set()
        wait_for(lambda: w3.metric("interest_events_applied_total") > 0, WAIT, "the third worker applying events")
        join_s = round(time.monotonic() - t_join, 2)
        feeder.finish()
        wait_for(lambda: applied_events(rclient, prefix) == n, WAIT, "all events applied")
        a2 = w2.metric("interest_events_applied_total")
        a3 = w3.metric("interest_events_applied_total")
        dups = dups_w1 + w2.metric("interest_duplicates_skipped_total") + w3.metric("interest_duplicates_skipped_total")
    finally:
        feeder.stopping = True
        codes = [w.stop() for w in (w2, w3) if w is not None]
    assert codes == [0, 0], (w2.output()[-2000:], w3.output()[-2000:] if w3 else "")
    assert a2 > 0 and a3 > 0
    report = oracle(events, trained_model, settings_for(), rclient)
    record(
        "two_workers_kill_one_third_joins",
        events=n,
        users=report.users,
        events_applied=applied_events(rclient, prefix),
        applied_by={"w1_before_kill": int(w1_applied), "w2": int(a2), "w3": int(a3)},
        duplicates_skipped=int(dups),
        max_dp=report.max_dp,
        recover_s=takeover_s,
        third_join_to_first_apply_s=join_s,
        total_s=round(time.monotonic() - t_start, 1),
    )


def test_redis_down_10s_mid_stream_worker_backs_off_and_loses_nothing(
    names, kafka_bootstrap, trained_model, events, settings_for, tmp_path
):
    n = len(events)
    prefix = names.redis_prefix
    port = free_port()
    svc = start_redis(port, tmp_path, persistence=True)
    url = f"redis://127.0.0.1:{port}/0"
    # no redis-py retries (3 with backoff by default): during the outage a read must fail at once, not block the feeder
    client = redis.Redis.from_url(url, socket_timeout=5, socket_connect_timeout=2, retry=Retry(NoBackoff(), 0))
    t_start = time.monotonic()
    worker = start_worker(names, kafka_bootstrap, url, trained_model, tmp_path / "logs", INTEREST_REDIS_RETRY_MAX_S="1")
    feeder = Feeder(
        kafka_bootstrap, names.input_topic, events, rate=1500, lead=4000, applied=lambda: applied_events(client, prefix)
    )
    feeder.start()
    try:
        wait_for(lambda: applied_events(client, prefix) >= 0.3 * n, WAIT, "30% applied")
        before = applied_events(client, prefix)
        svc.stop()  # SIGTERM: Redis writes its AOF and RDB and exits
        t_down = time.monotonic()
        assert not svc.alive()
        wait_for(lambda: worker.metric("interest_redis_retries_total") > 0, 10, "the worker retrying Redis")
        while time.monotonic() - t_down < 10:  # the outage lasts 10 s; the worker must survive it
            assert worker.alive(), worker.output()[-3000:]
            time.sleep(0.2)
        retries_during = worker.metric("interest_redis_retries_total")
        svc = start_redis(port, tmp_path, persistence=True)
        t_up = time.monotonic()
        persisted = applied_events(client, prefix)
        assert persisted >= before, "Redis lost acknowledged writes across a graceful restart"
        t_moved = wait_applied_more_than(client, prefix, persisted, "progress after Redis came back")
        feeder.finish()
        wait_for(lambda: applied_events(client, prefix) == n, WAIT, "all events applied")
        assert worker.alive()
        wait_for(lambda: worker.metric("interest_events_applied_total") >= n, 10, "applied events counted")
        dups = worker.metric("interest_duplicates_skipped_total")
        applied_metric = worker.metric("interest_events_applied_total")
        stale = worker.metric("interest_stale_writes_total")
        retries = worker.metric("interest_redis_retries_total")
    finally:
        feeder.stopping = True
        code = worker.stop()
    try:
        assert code == 0, worker.output()[-3000:]
        assert "Traceback" not in worker.output()
        assert applied_metric == n  # one process did it all: nothing applied twice, nothing skipped
        report = oracle(events, trained_model, settings_for(redis_url=url), client)
    finally:
        client.close()
        svc.stop()
    record(
        "redis_down_10s",
        events=n,
        users=report.users,
        events_applied=int(applied_metric),
        applied_before_outage=before,
        persisted_across_restart=persisted,
        duplicates_skipped=int(dups),
        stale_writes=int(stale),
        redis_retries=int(retries),
        redis_retries_during_outage=int(retries_during),
        max_dp=report.max_dp,
        outage_s=round(t_up - t_down, 2),
        recover_s=round(t_moved - t_up, 2),
        recover_from_fault_s=round(t_moved - t_down, 2),
        total_s=round(time.monotonic() - t_start, 1),
    )


def test_producer_retry_storm_duplicates_change_nothing(
    names, kafka_bootstrap, redis_url, trained_model, events, rclient, settings_for, tmp_path
):
    n = len(events)
    prefix = names.redis_prefix
    # every chunk of 200 events is sent, then sent again (same event ids, new offsets): a producer retry storm.
    # Re-sends are caught by each user's ring of its last 256 applied events' fingerprints.
    stream = []
    for i in range(0, n, 200):
        chunk = events[i : i + 200]
        stream += chunk + chunk
    t_start = time.monotonic()
    worker = start_worker(names, kafka_bootstrap, redis_url, trained_model, tmp_path)
    feeder = Feeder(kafka_bootstrap, names.input_topic, stream, rate=3000)
    feeder.start()
    try:
        wait_for(lambda: applied_events(rclient, prefix) > 0, WAIT, "first events applied")
        feeder.finish()
        t_produced = time.monotonic()
        wait_for(lambda: worker.metric("interest_events_in_total") == len(stream), WAIT, "all events taken")
        wait_for(lambda: applied_events(rclient, prefix) == n, WAIT, "all events applied")
        catch_up = round(time.monotonic() - t_produced, 2)
        counted = ("interest_duplicates_skipped_total", "interest_events_applied_total")
        wait_for(lambda: sum(worker.metric(m) for m in counted) >= len(stream), 10, "events counted")
        dups = worker.metric("interest_duplicates_skipped_total")
        applied_metric = worker.metric("interest_events_applied_total")
    finally:
        feeder.stopping = True
        code = worker.stop()
    assert code == 0, worker.output()[-3000:]
    assert dups == len(stream) - n
    assert applied_metric == n
    report = oracle(stream, trained_model, settings_for(), rclient)
    assert report.events == n
    record(
        "producer_retry_storm",
        events=n,
        produced=len(stream),
        users=report.users,
        events_applied=int(applied_metric),
        duplicates_skipped=int(dups),
        max_dp=report.max_dp,
        recover_s=None,
        catch_up_after_last_produce_s=catch_up,
        total_s=round(time.monotonic() - t_start, 1),
    )


def committed_offsets(kafka_bootstrap: str, group: str, topic: str) -> dict[int, int]:
    admin = KafkaAdminClient(bootstrap_servers=kafka_bootstrap, request_timeout_ms=10_000)
    try:
        offsets = admin.list_group_offsets({group: [TopicPartition(topic, p) for p in range(4)]})[group]
    finally:
        admin.close()
    return {tp.partition: meta.offset for tp, meta in offsets.items() if meta.offset >= 0}


def test_sigterm_mid_batch_commits_only_what_was_applied_and_restart_continues(
    names, kafka_bootstrap, redis_url, trained_model, events, rclient, settings_for, tmp_path
):
    n = len(events)
    prefix, topic = names.redis_prefix, names.input_topic
    t_start = time.monotonic()
    # big batches over a pre-produced backlog: the worker is inside a batch nearly all the time
    extra = {"INTEREST_MAX_BATCH": "4000"}
    worker = start_worker(names, kafka_bootstrap, redis_url, trained_model, tmp_path, **extra)
    feeder = Feeder(kafka_bootstrap, topic, events, rate=20_000)
    feeder.start()
    feeder.finish()
    try:
        wait_for(lambda: applied_events(rclient, prefix) >= 0.25 * n, WAIT, "25% applied")
        in_before = worker.metric("interest_events_in_total")
        applied_before = worker.metric("interest_events_applied_total")
    finally:
        t_term = time.monotonic()
        code = worker.stop(timeout=60)
    stop_s = round(time.monotonic() - t_term, 2)
    out = worker.output()
    assert code == 0, out[-3000:]
    assert "Traceback" not in out
    applied_at_stop = applied_events(rclient, prefix)
    assert applied_at_stop < n, "the stop must land mid-stream"
    committed = committed_offsets(kafka_bootstrap, names.app_id, topic)
    progress = partition_progress(rclient, prefix, topic)
    # commits only what it applied: every committed offset is at most one past the last applied one
    for p, off in committed.items():
        assert off <= progress.get(p, -1) + 1, (p, off, progress)
    assert sum(committed.values()) <= applied_at_stop

    worker = start_worker(names, kafka_bootstrap, redis_url, trained_model, tmp_path / "restart", **extra)
    t_restart = time.monotonic()
    try:
        t_moved = wait_applied_more_than(rclient, prefix, applied_at_stop, "progress after restart")
        wait_for(lambda: applied_events(rclient, prefix) == n, WAIT, "all events applied")
        dups = worker.metric("interest_duplicates_skipped_total")
        applied_after = worker.metric("interest_events_applied_total")
    finally:
        code = worker.stop()
    assert code == 0, worker.output()[-3000:]
    # the restart continues exactly: it applies the rest, and what it re-reads is exactly the applied-but-uncommitted
    assert applied_after == n - applied_at_stop
    assert dups == applied_at_stop - sum(committed.values())
    report = oracle(events, trained_model, settings_for(), rclient)
    record(
        "sigterm_mid_batch",
        events=n,
        users=report.users,
        events_applied=applied_events(rclient, prefix),
        taken_before_stop=int(in_before),
        applied_before_sigterm=int(applied_before),
        applied_at_stop=applied_at_stop,
        committed_at_stop=sum(committed.values()),
        exit_code=0,
        stop_s=stop_s,
        duplicates_skipped=int(dups),
        max_dp=report.max_dp,
        recover_s=round(t_moved - t_restart, 2),
        total_s=round(time.monotonic() - t_start, 1),
    )
