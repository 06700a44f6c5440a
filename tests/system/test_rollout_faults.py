"""Faults and bad use during a rollout: the backfill killed (kill -9, and at the worst point: states and re-keys
written, offsets not committed) and run again, the new worker killed mid catch-up; promoting a version that is not
caught up or has no states, backfilling with a catalog that does not match the topic's items, or twice."""

from __future__ import annotations

import time

import pytest
from kafka import KafkaConsumer, TopicPartition

from export.runtime import StepSession
from streams.tools.verify import verify_events
from tests.harness import applied_events, ml_events, model_names, start_worker, wait_for
from tests.system.rollout_kit import MixedFeeder, cli, spawn_cli

pytestmark = pytest.mark.integration

WAIT = 180


def rekey_records(kafka_bootstrap: str, topic: str) -> int:
    consumer = KafkaConsumer(bootstrap_servers=kafka_bootstrap)
    try:
        tps = [TopicPartition(topic, p) for p in sorted(consumer.partitions_for_topic(topic) or ())]
        return sum(consumer.end_offsets(tps).values())
    finally:
        consumer.close()


def topic_exists(kafka_bootstrap: str, topic: str) -> bool:
    consumer = KafkaConsumer(bootstrap_servers=kafka_bootstrap)
    try:
        return bool(consumer.partitions_for_topic(topic))
    finally:
        consumer.close()


def one_error_line(done, text: str) -> None:
    assert done.returncode == 2, (done.stdout, done.stderr)
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and text in lines[0] and "Traceback" not in done.stderr, done.stderr


def test_backfill_killed_and_run_again_new_worker_killed_mid_catch_up_still_exact(
    names,
    kafka_bootstrap,
    redis_url,
    new_model,
    data_dir,
    rclient,
    settings_for,
    tmp_path,
):
    events = ml_events(data_dir, 12_000)
    users = list(dict.fromkeys(e["user_id"] for e in events))
    rdkafka_users = set(users[::3])
    feeder = MixedFeeder(kafka_bootstrap, names.input_topic, events[:9000], 0, rdkafka_users)
    feeder.run()
    assert feeder.error is None, feeder.error
    new = model_names(names, new_model)
    args = ("backfill", "--model", str(new_model), "--no-progress")
    # kill -9 while it reads: soon after it created the version's re-key topic (its first step)
    proc = spawn_cli(names, kafka_bootstrap, redis_url, tmp_path / "killed.log", *args)
    wait_for(lambda: topic_exists(kafka_bootstrap, new.rekey_topic), 60, "the backfill under way")
    time.sleep(0.5)
    assert proc.poll() is None, f"the backfill ended before it could be killed: {(tmp_path / 'killed.log').read_text()}"
    proc.kill()
    proc.wait(10)
    # the worst point: a run that wrote its states and re-keys, killed before the offset commit (= its group deleted)
    first = cli(names, kafka_bootstrap, redis_url, *args)
    assert first.returncode == 0, first.stdout + first.stderr
    misrouted = sum(1 for e in events[:9000] if e["user_id"] in rdkafka_users)
    rekeyed = rekey_records(kafka_bootstrap, new.rekey_topic)
    assert 0 < rekeyed <= misrouted  # CRC32 and murmur2 agree for some users
    from streams.tools.groups import delete_group

    assert delete_group(settings_for(), new.group)
    again = cli(names, kafka_bootstrap, redis_url, *args)
    assert again.returncode == 0, again.stdout + again.stderr
    assert f"(+{rekeyed} by an earlier run)" in again.stdout, again.stdout
    assert rekey_records(kafka_bootstrap, new.rekey_topic) == rekeyed, "no misrouted event forwarded twice"
    # a third time: refused, its workers continue from the committed offsets
    one_error_line(cli(names, kafka_bootstrap, redis_url, *args), "has committed offsets already")

    # the new worker killed mid catch-up, started again
    worker = start_worker(names, kafka_bootstrap, redis_url, new_model, tmp_path / "w1")
    feeder = MixedFeeder(kafka_bootstrap, names.input_topic, events[9000:], 1500, rdkafka_users)
    feeder.start()
    wait_for(lambda: applied_events(rclient, names.redis_prefix, new.tag) > 9500, WAIT, "catch-up under way")
    worker.kill()
    feeder.join(WAIT)
    assert feeder.error is None, feeder.error
    worker = start_worker(names, kafka_bootstrap, redis_url, new_model, tmp_path / "w2")
    try:
        wait_for(lambda: applied_events(rclient, names.redis_prefix, new.tag) == len(events), WAIT, "all applied")
    finally:
        assert worker.stop() == 0
    report = verify_events(events, StepSession(new_model, device="cpu"), settings_for(), rclient)
    assert report.ok and report.max_dp <= 1e-5, report.summary()


def test_bad_use_gets_one_clear_line(
    names, kafka_bootstrap, redis_url, trained_model, new_model, data_dir, rclient, settings_for, tmp_path
):
    events = ml_events(data_dir, 3000)
    MixedFeeder(kafka_bootstrap, names.input_topic, events, 0, set()).run()
    new = model_names(names, new_model)
    # promoting a version with no states, or one never registered
    one_error_line(cli(names, kafka_bootstrap, redis_url, "promote", "--model", str(new_model)), "has no states")
    one_error_line(cli(names, kafka_bootstrap, redis_url, "promote", "--version", "nope"), "is not registered")
    # a catalog that does not match the topic's items: the events this model would dead-letter are counted, and
    # nothing is written or committed
    small = tmp_path / "small.csv"
    small.write_text("item_id,categories\n1,Drama\n2,Comedy\n")
    args = ("backfill", "--model", str(new_model), "--no-progress")
    done = cli(names, kafka_bootstrap, redis_url, *args, INTEREST_CATALOG_PATH=str(small))
    one_error_line(done, "catalog does not match the topic's items")
    assert "unknown_item" in done.stderr
    assert applied_events(rclient, names.redis_prefix, new.tag) == 0
    # promoting a version whose worker is not caught up: the lag is in the message
    worker = start_worker(names, kafka_bootstrap, redis_url, trained_model, tmp_path / "old")
    try:
        old = model_names(names, trained_model)
        wait_for(lambda: applied_events(rclient, names.redis_prefix, old.tag) == len(events), WAIT, "old applied")
        assert cli(names, kafka_bootstrap, redis_url, "backfill", "--model", str(new_model)).returncode == 0
        MixedFeeder(kafka_bootstrap, names.input_topic, ml_events(data_dir, 4500)[3000:], 0, set()).run()
        refused = cli(names, kafka_bootstrap, redis_url, "promote", "--model", str(new_model))
        one_error_line(refused, "not caught up: lag 1500 events > 1000")
        # retiring the promoted version is refused; the other one can go
        one_error_line(
            cli(names, kafka_bootstrap, redis_url, "retire", "--version", old.version), "is the promoted version"
        )
        retired = cli(names, kafka_bootstrap, redis_url, "retire", "--version", new.version)
        assert retired.returncode == 0 and "retired" in retired.stdout, retired.stderr
        assert applied_events(rclient, names.redis_prefix, new.tag) == 0
    finally:
        assert worker.stop() == 0


def test_backfill_split_across_two_processes_by_partition_is_exact(
    names, kafka_bootstrap, redis_url, new_model, data_dir, rclient, settings_for, tmp_path
):
    events = ml_events(data_dir, 8000)
    users = list(dict.fromkeys(e["user_id"] for e in events))
    MixedFeeder(kafka_bootstrap, names.input_topic, events, 0, set(users[::3])).run()
    new = model_names(names, new_model)
    # at once: each forwards its misrouted events to re-key partitions the other may own
    procs = [
        spawn_cli(names, kafka_bootstrap, redis_url, tmp_path / f"bf{i}.log", "backfill", "--model", str(new_model),
                  "--no-progress", "--partitions", part)
        for i, part in enumerate(("0-1", "2,3"))
    ]  # fmt: skip
    for i, p in enumerate(procs):
        assert p.wait(300) == 0, (tmp_path / f"bf{i}.log").read_text()[-2000:]
    worker = start_worker(names, kafka_bootstrap, redis_url, new_model, tmp_path / "w")
    try:
        wait_for(lambda: applied_events(rclient, names.redis_prefix, new.tag) == len(events), WAIT, "all applied")
    finally:
        assert worker.stop() == 0
    report = verify_events(events, StepSession(new_model, device="cpu"), settings_for(), rclient)
    assert report.ok and report.max_dp <= 1e-5, report.summary()
