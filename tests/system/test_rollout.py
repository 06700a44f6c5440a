"""Model rollout on the real broker and Redis: backfill a new version from the retained log beside the running one,
hand the stream over to its worker, promote it, stop the old one, roll back and forward; readers never see a gap.
Each version is judged by the replay oracle (its states equal an offline replay of the whole log through it)."""

from __future__ import annotations

import time

import orjson
import pytest

from export.runtime import StepSession
from streams.tools.verify import verify_events
from tests.harness import applied_events, ml_events, model_names, start_worker, user_keys, wait_for
from tests.system.rollout_kit import MixedFeeder, Reader, cli

pytestmark = pytest.mark.integration

WAIT = 240


def oracle(events, model, settings, rclient):
    report = verify_events(events, StepSession(model, device="cpu"), settings, rclient)
    assert report.ok and report.max_dp <= 1e-5, report.summary()
    return report


def output_versions(kafka_bootstrap: str, topic: str, event_ids: set[str], timeout: float = 60) -> set[str]:
    """The model versions of every output record of ``event_ids`` (read from the start until all are seen)."""
    from kafka import KafkaConsumer

    consumer = KafkaConsumer(topic, bootstrap_servers=kafka_bootstrap, auto_offset_reset="earliest")
    seen: dict[str, set[str]] = {}
    try:
        deadline = time.monotonic() + timeout
        while not event_ids <= seen.keys() and time.monotonic() < deadline:
            for records in consumer.poll(timeout_ms=500).values():
                for r in records:
                    rec = orjson.loads(r.value)
                    if rec["event_id"] in event_ids:
                        seen.setdefault(rec["event_id"], set()).add(rec["model_version"])
    finally:
        consumer.close()
    assert event_ids <= seen.keys(), f"{len(event_ids - seen.keys())} events without an output record"
    return {v for vs in seen.values() for v in vs}


def test_backfill_side_by_side_promote_stop_old_rollback_and_back(
    names,
    kafka_bootstrap,
    redis_url,
    trained_model,
    new_model,
    data_dir,
    rclient,
    settings_for,
    tmp_path,
):
    events = ml_events(data_dir, 24_000)
    first, rest = events[:8000], events[8000:]
    users = list(dict.fromkeys(e["user_id"] for e in events))
    rdkafka_users = set(users[::3])  # a third of the users through librdkafka's default partitioner: re-keyed
    old, new = model_names(names, trained_model), model_names(names, new_model)
    settings = settings_for()
    last_index = {e["user_id"]: i for i, e in enumerate(events)}
    sample = [u for u in users if last_index[u] < len(first)][:40]  # users whose history is complete early
    assert len(sample) >= 10 and any(u in rdkafka_users for u in sample)
    prefix = names.redis_prefix
    timeline: dict[str, float] = {}

    old_worker = start_worker(names, kafka_bootstrap, redis_url, trained_model, tmp_path / "old")
    new_worker = None
    feeder = MixedFeeder(kafka_bootstrap, names.input_topic, first, 0, rdkafka_users)
    feeder.run()
    assert feeder.error is None, feeder.error
    wait_for(lambda: applied_events(rclient, prefix, old.tag) == len(first), WAIT, "old applied the first part")
    reader = Reader(settings, sample, {old.version, new.version})
    reader.start()
    feeder = MixedFeeder(kafka_bootstrap, names.input_topic, rest, 800, rdkafka_users)
    feeder.start()  # events flow from here to the end
    try:
        wait_for(lambda: feeder.produced > 2000, 60, "events flowing")
        t0 = time.monotonic()
        done = cli(names, kafka_bootstrap, redis_url, "backfill", "--model", str(new_model), "--no-progress")
        timeline["backfill_s"] = time.monotonic() - t0
        assert done.returncode == 0, done.stdout + done.stderr
        assert f"backfilled {new.version}" in done.stdout
        # readers still see the old version only; the new one's states are there, invisible
        assert rclient.get(prefix + "promoted").decode() == old.version
        assert applied_events(rclient, prefix, new.tag) > len(first)
        # promoting before its worker runs: refused, with the lag in the message
        refused = cli(names, kafka_bootstrap, redis_url, "promote", "--model", str(new_model), "--max-lag", "0")
        assert refused.returncode == 2 and "not caught up: lag" in refused.stderr, refused.stderr
        assert len(refused.stderr.strip().splitlines()) == 1

        t1 = time.monotonic()
        new_worker = start_worker(names, kafka_bootstrap, redis_url, new_model, tmp_path / "new")
        feeder.join(WAIT)
        assert feeder.error is None and feeder.produced == len(rest), feeder.error
        for v in (old, new):
            wait_for(lambda v=v: applied_events(rclient, prefix, v.tag) == len(events), WAIT, f"{v.version} all")
        timeline["catch_up_s"] = time.monotonic() - t1
        status = cli(names, kafka_bootstrap, redis_url, "status", "--json")
        rows = {r["version"]: r for r in orjson.loads(status.stdout)}
        assert rows[old.version]["promoted"] and not rows[new.version]["promoted"], rows
        assert rows[new.version]["workers"] == 1 and rows[new.version]["states"]

        t2 = time.monotonic()
        promoted = wait_for(
            lambda: cli(names, kafka_bootstrap, redis_url, "promote", "--model", str(new_model)).returncode == 0,
            60,
            "promotion accepted (lag below the bound)",
        )
        assert promoted
        timeline["promote_s"] = time.monotonic() - t2
        assert rclient.get(prefix + "promoted").decode() == new.version
        # from the promotion on, the output topic carries the new version's records only
        after = ml_events(data_dir, 25_000)[24_000:]
        MixedFeeder(kafka_bootstrap, names.input_topic, after, 0, rdkafka_users).run()
        events = events + after
        for v in (old, new):
            wait_for(lambda v=v: applied_events(rclient, prefix, v.tag) == len(events), WAIT, f"{v.version} after")
        versions_out = output_versions(kafka_bootstrap, names.output_topic, {e["event_id"] for e in after})
        assert versions_out == {new.version}, versions_out
        assert old_worker.metric("interest_publishing") == 0 and new_worker.metric("interest_publishing") == 1
        assert old_worker.stop() == 0
        oracle(events, new_model, settings, rclient)
        oracle(events, trained_model, settings, rclient)

        # rollback: the old version's worker again (continues from its group's offsets), then promote it
        more = ml_events(data_dir, 26_000)[25_000:]
        old_worker = start_worker(names, kafka_bootstrap, redis_url, trained_model, tmp_path / "old2")
        feeder = MixedFeeder(kafka_bootstrap, names.input_topic, more, 0, rdkafka_users)
        feeder.run()
        everything = events + more
        for v in (old, new):
            wait_for(lambda v=v: applied_events(rclient, prefix, v.tag) == len(everything), WAIT, f"{v.version}")
        # promote once the old version's group has committed what its worker applied (the lag counts commits)
        promote = lambda v: cli(names, kafka_bootstrap, redis_url, "promote", "--version", v).returncode == 0  # noqa: E731
        wait_for(lambda: promote(old.version), 60, "the old version promoted again")
        assert rclient.get(prefix + "promoted").decode() == old.version
        oracle(everything, trained_model, settings, rclient)
        wait_for(lambda: promote(new.version), 60, "the new version promoted again")
        oracle(everything, new_model, settings, rclient)
        # what two versions cost: each user has one hash per version (MEMORY USAGE, bytes)
        for v in (old, new):
            keys = user_keys(rclient, prefix, v.tag)
            timeline[f"bytes_per_user_{v.tag}"] = sum(rclient.memory_usage(k) for k in keys) / len(keys)
    finally:
        reader.stopping.set()
        reader.join(10)
        for w in (old_worker, new_worker):
            if w is not None and w.alive():
                w.stop()
    assert reader.reads > 100 and reader.seen_versions == {old.version, new.version}, (
        reader.reads,
        reader.seen_versions,
    )
    assert not reader.problems, reader.problems[:10]
    print(f"\nrollout timeline (s): {timeline}; reader: {reader.reads} reads, no gap")
