"""A rebalance at the batch path's rate: while 200,000 events flow, a second worker joins (its share of the
partitions moves to it) and then leaves with SIGTERM (they move back); the oracle is exact over every event."""

from __future__ import annotations

import time

import pytest

from tests.harness import applied_events, ml_events, start_worker, wait_for
from tests.system.fault_kit import WAIT, Feeder, oracle, record

pytestmark = [pytest.mark.integration, pytest.mark.faults]

TOTAL = 200_000


def _looped(data_dir) -> list[dict]:
    """ML-100K twice, each loop with user ids of its own (``<user>_<loop>``: distinct users, real sequences)."""
    base = ml_events(data_dir, 100_000)
    out = [e | {"user_id": f"{e['user_id']}_{loop}"} for loop in range(2) for e in base]
    assert len(out) == TOTAL
    return out


def test_a_worker_joins_and_leaves_while_200k_events_flow(
    names, kafka_bootstrap, redis_url, trained_model, data_dir, rclient, settings_for, tmp_path
):
    events = _looped(data_dir)
    prefix = names.redis_prefix
    t0 = time.monotonic()
    w1 = start_worker(names, kafka_bootstrap, redis_url, trained_model, tmp_path)
    w2 = None
    feeder = Feeder(kafka_bootstrap, names.input_topic, events, rate=50_000)  # as fast as the producer goes
    feeder.start()
    try:
        wait_for(lambda: applied_events(rclient, prefix) >= 0.2 * TOTAL, WAIT, "20% applied", interval=0.2)
        w2 = start_worker(names, kafka_bootstrap, redis_url, trained_model, tmp_path)
        t_join = time.monotonic()
        wait_for(lambda: w2.metric("interest_events_applied_total") > 0, WAIT, "the second worker applying")
        join_s = round(time.monotonic() - t_join, 2)
        at_join = applied_events(rclient, prefix)
        assert at_join < TOTAL, "the stream ended before the second worker took part: nothing was rebalanced"
        wait_for(lambda: w2.metric("interest_events_applied_total") > 5_000, WAIT, "the second worker's share")
        applied_by_w2 = w2.metric("interest_events_applied_total")  # before it leaves (it applies a few more)
        dups_w2 = w2.metric("interest_duplicates_skipped_total")
        assert w2.stop() == 0, w2.output()[-3000:]  # leaves: its partitions go back to the first worker
        t_leave = time.monotonic()
        at_leave = applied_events(rclient, prefix)
        assert at_leave < TOTAL, "the stream ended before the second worker left"
        feeder.finish()
        wait_for(lambda: applied_events(rclient, prefix) == TOTAL, WAIT, "all events applied", interval=0.5)
        back_s = round(time.monotonic() - t_leave, 2)
        applied_by_w1 = w1.metric("interest_events_applied_total")
        dups = w1.metric("interest_duplicates_skipped_total") + dups_w2
    finally:
        feeder.stopping = True
        assert w1.stop() == 0, w1.output()[-3000:]
        if w2 is not None and w2.alive():
            w2.stop()
    report = oracle(events, trained_model, settings_for(), rclient)
    assert report.users == len({e["user_id"] for e in events})
    record(
        "rebalance_at_rate_200k",
        events=TOTAL,
        users=report.users,
        applied_by={"w1": int(applied_by_w1), "w2": int(applied_by_w2)},
        applied_when={"w2_joined": at_join, "w2_left": at_leave},
        duplicates_skipped=int(dups),
        max_dp=report.max_dp,
        join_to_first_apply_s=join_s,
        leave_to_all_applied_s=back_s,
        total_s=round(time.monotonic() - t0, 1),
    )
