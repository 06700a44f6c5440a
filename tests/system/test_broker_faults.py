"""The broker's own faults, on Apache Kafka: killed and restarted, stopped for 20 s, a rebalance storm.

    python -m pytest tests/system/test_broker_faults.py -s     # numbers also go to artifacts/faults.jsonl

The kill and the stop hit a broker of this module's own (the session's broker serves every other test), started on
a free port with its log on disk: started again on the same port and folder it keeps every topic, record and
committed offset, as a production broker does. The worker is never restarted: it must ride out the outage, reconnect
and go on. The feeder is an idempotent producer (``acks=all``), as a careful click producer is, so the broker's
restart neither loses nor reorders what it acknowledged; each test ends with the oracle exact. ``recover_s`` is from
the broker answering again to the first event applied after it, producer's reconnect included.
"""

from __future__ import annotations

import signal
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from streams.local.services import Service, free_port, start_broker
from tests.harness import applied_events, start_worker, wait_for
from tests.system.fault_kit import WAIT, Feeder, events, oracle, record, safe_metric, wait_applied_more_than

pytestmark = [pytest.mark.integration, pytest.mark.faults, pytest.mark.slow]
__all__ = ["events"]  # the module fixture, used by every test here

OUTAGE_S = 20.0


class Broker:
    """This module's broker: one port and log folder, stopped and started again by the tests."""

    def __init__(self, run_dir: Path) -> None:
        self.run_dir = run_dir
        self.port = free_port()
        self.svc: Service = start_broker(self.port, run_dir)

    @property
    def bootstrap(self) -> str:
        return f"127.0.0.1:{self.port}"

    def restart(self) -> None:
        self.svc = start_broker(self.port, self.run_dir)


@pytest.fixture(scope="module")
def broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Broker]:
    b = Broker(tmp_path_factory.mktemp("own-broker"))
    yield b
    b.svc.stop()


def _outage(
    kind: str, broker: Broker, names, redis_url, trained_model, events, rclient, settings_for, tmp_path
) -> None:
    """Events flow; at 30 % applied the broker goes down (``kill`` -9, or ``stop``: SIGTERM) for OUTAGE_S, then comes
    back. The same worker process must apply every event, exactly."""
    n = len(events)
    prefix = names.redis_prefix
    t_start = time.monotonic()
    worker = start_worker(names, broker.bootstrap, redis_url, trained_model, tmp_path)
    feeder = Feeder(
        broker.bootstrap,
        names.input_topic,
        events,
        rate=1500,
        lead=4000,
        applied=lambda: applied_events(rclient, prefix),
        acks="all",
        enable_idempotence=True,
        reconnect_backoff_max_ms=1000,  # Java's default; kafka-python's 30 s would time its recovery, not the worker's
    )
    feeder.start()
    try:
        wait_for(lambda: applied_events(rclient, prefix) >= 0.3 * n, WAIT, "30% applied")
        applied_before = safe_metric(worker, "interest_events_applied_total")
        broker.svc.stop(signal.SIGKILL if kind == "kill" else signal.SIGTERM)
        t_down = time.monotonic()
        before = applied_events(rclient, prefix)
        assert before < n, "the stream must still be running when the broker goes down"
        while time.monotonic() - t_down < OUTAGE_S:  # the worker must survive the outage
            assert worker.alive(), worker.output()[-3000:]
            time.sleep(0.2)
        at_restart = applied_events(rclient, prefix)
        applied_during = at_restart - before
        broker.restart()
        t_up = time.monotonic()
        # measured from before the restart: clients reconnect as soon as the port opens, and the worker may have
        # applied everything the feeder had left before start_broker's own readiness check returns
        t_moved = wait_applied_more_than(rclient, prefix, at_restart, "progress after restart")
        feeder.finish()
        wait_for(lambda: applied_events(rclient, prefix) == n, WAIT, "all events applied")
        assert worker.alive(), "the worker exited instead of reconnecting"
        counted = ("interest_duplicates_skipped_total", "interest_events_applied_total")
        wait_for(lambda: worker.metric("interest_events_applied_total") >= n, 30, "applied events counted")
        dups = worker.metric("interest_duplicates_skipped_total")
        applied_metric = worker.metric("interest_events_applied_total")
        taken = worker.metric("interest_events_in_total")
        assert sum(worker.metric(m) for m in counted) <= taken
    finally:
        feeder.stopping = True
        code = worker.stop()
    out = worker.output()
    assert code == 0, out[-3000:]
    # one process did it all: every event applied once (a redelivery after the outage is skipped as a duplicate)
    assert applied_metric == n, (applied_metric, n)
    report = oracle(events, trained_model, settings_for(kafka_bootstrap=broker.bootstrap), rclient)
    assert report.events == n and report.users >= 500
    record(
        f"broker_{kind}" if kind == "kill" else f"broker_stopped_{OUTAGE_S:.0f}s",
        events=n,
        users=report.users,
        events_applied=int(applied_metric),
        applied_before_outage=int(applied_before),
        applied_while_down=applied_during,
        duplicates_skipped=int(dups),
        max_dp=report.max_dp,
        outage_s=round(t_up - t_down, 2),
        recover_s=round(t_moved - t_up, 2),
        total_s=round(time.monotonic() - t_start, 1),
    )


def test_broker_kill_9_mid_stream_and_restart(
    broker, names, redis_url, trained_model, events, rclient, settings_for, tmp_path
):
    _outage("kill", broker, names, redis_url, trained_model, events, rclient, settings_for, tmp_path)


def test_broker_stopped_20s_mid_stream(
    broker, names, redis_url, trained_model, events, rclient, settings_for, tmp_path
):
    _outage("stop", broker, names, redis_url, trained_model, events, rclient, settings_for, tmp_path)


def test_rebalance_storm(names, kafka_bootstrap, redis_url, trained_model, events, rclient, settings_for, tmp_path):
    """Workers join and leave every few seconds while events flow: one stays throughout, others come and go (most
    leave with SIGTERM, one is killed -9). Every event is applied exactly once in effect."""
    n = len(events)
    prefix = names.redis_prefix
    t_start = time.monotonic()
    anchor = start_worker(names, kafka_bootstrap, redis_url, trained_model, tmp_path)
    rate = 400  # ~50 s of events, or longer (below)
    feeder = Feeder(kafka_bootstrap, names.input_topic, events, rate=rate)
    feeder.start()
    guests: list = []
    changes = []  # (seconds since the storm began, what happened)
    gone: list = []
    try:
        wait_for(lambda: applied_events(rclient, prefix) > 0, WAIT, "first events applied")
        t_storm = time.monotonic()
        # join, join, leave, join, kill, leave, join, leave: a membership change every few seconds (a join lasts
        # until the new worker is up, a few seconds, then 2 s more)
        for step in ("join", "join", "leave", "join", "kill", "leave", "join", "leave"):
            if step == "join":
                guests.append(start_worker(names, kafka_bootstrap, redis_url, trained_model, tmp_path))
            else:
                w = guests.pop(0)
                if step == "kill":
                    w.kill()
                else:
                    assert w.stop() == 0, w.output()[-3000:]
                gone.append(w)
            changes.append((round(time.monotonic() - t_storm, 1), step))
            assert anchor.alive(), anchor.output()[-3000:]
            # a worker's start takes seconds more on a loaded machine: near the end of the events, slow the feed to a
            # trickle so that events still flow through the last membership changes (a step takes < 20 s)
            if n - feeder.produced < 20 * rate:
                feeder.rate = 50
            time.sleep(2)
        storm_s = round(time.monotonic() - t_storm, 1)
        applied_in_storm = applied_events(rclient, prefix)
        assert applied_in_storm < n, "the stream must outlast the storm"
        feeder.rate = rate
        feeder.finish()
        wait_for(lambda: applied_events(rclient, prefix) == n, WAIT, "all events applied")
        dups = sum(safe_metric(w, "interest_duplicates_skipped_total") for w in [anchor, *guests])
    finally:
        feeder.stopping = True
        codes = [w.stop() for w in [anchor, *guests]]
    assert codes == [0] * len(codes), anchor.output()[-3000:]
    rebalances = anchor.output().count("partitions revoked")  # the worker that stayed took part in each of them
    assert rebalances >= 5, f"only {rebalances} rebalances reached the worker that stayed"
    report = oracle(events, trained_model, settings_for(), rclient)
    assert report.events == n
    record(
        "rebalance_storm",
        events=n,
        users=report.users,
        events_applied=applied_events(rclient, prefix),
        membership_changes=changes,
        rebalances_seen_by_the_stayer=rebalances,
        storm_s=storm_s,
        applied_during_storm=applied_in_storm,
        duplicates_skipped_by_survivors=int(dups),
        max_dp=report.max_dp,
        recover_s=None,
        total_s=round(time.monotonic() - t_start, 1),
    )
