"""The worker end to end: real broker, real Redis, real worker processes, judged by the offline replay oracle."""

from __future__ import annotations

import orjson
import pytest

from export.runtime import StepSession
from streams.core.state import promoted_key, user_key, versions_key
from streams.tools.verify import verify_events
from tests.harness import (
    applied_events,
    consume_all,
    ml_events,
    model_names,
    produce,
    start_worker,
    user_keys,
    wait_for,
)

pytestmark = pytest.mark.integration


def _oracle(events, trained_model, settings, rclient):
    session = StepSession(trained_model, device="cpu")
    report = verify_events(events, session, settings, rclient)
    assert report.ok, report.summary()
    assert report.max_dp <= 1e-5
    return report


def _apply_all(worker, names, kafka_bootstrap: str, rclient, events: list[dict]) -> None:
    """Produce ``events`` and wait until all are in Redis, as the worker's own applied counter says too."""
    produce(kafka_bootstrap, names.input_topic, events)
    wait_for(lambda: applied_events(rclient, names.redis_prefix) == len(events), 90, "all events applied")
    # counted after the Redis write (and relayed from the step process): wait, then the count must be exact
    wait_for(lambda: worker.metric("interest_events_applied_total") >= len(events), 10, "applied events counted")
    assert worker.metric("interest_events_applied_total") == len(events)


def test_many_users_match_offline_replay(
    names, kafka_bootstrap, redis_url, trained_model, data_dir, rclient, settings_for, tmp_path
):
    events = ml_events(data_dir, 6000)
    worker = start_worker(names, kafka_bootstrap, redis_url, trained_model, tmp_path, INTEREST_LOG_FORMAT="json")
    try:
        _apply_all(worker, names, kafka_bootstrap, rclient, events)
        # every batch is timed through its stages (the bench reports them); consume and collect only for batches
        # whose first event did not wait behind a full one
        stage = lambda name: worker.samples()[f'interest_batch_stage_seconds_count{{stage="{name}"}}']  # noqa: E731
        batches = worker.metric("interest_batch_size_count")
        wait_for(lambda: stage("write") == batches, 30, "every batch's write timed")
        assert stage("step") == batches and 1 <= stage("collect") <= batches and stage("consume") == stage("collect")
        # consumer lag, per owned input partition: zero once everything is applied
        lag = lambda: {k: v for k, v in worker.samples().items() if k.startswith("interest_consumer_lag{")}  # noqa: E731
        wait_for(lambda: sum(names.input_topic in k for k in lag()) == 4, 30, "the lag of the 4 input partitions")
        wait_for(lambda: not any(lag().values()), 30, "no lag left")
    finally:
        assert worker.stop() == 0, worker.output()[-3000:]
    # structured logs: one JSON object per line (Faust's own lines included)
    logs = [orjson.loads(line) for line in worker.output().splitlines() if line.startswith("{")]
    assert len(logs) >= 5 and {"ts", "level", "logger", "message"} <= set(logs[0])
    assert any(rec["logger"].startswith("faust") for rec in logs)
    assert '"message":"worker ready: consuming' in worker.output()  # the start-up hook ran
    version = model_names(names, trained_model)  # the consumer group and keys derive from the model version
    assert (names.data_dir / f"{version.group}-data").is_dir()  # Faust's data folder went to INTEREST_DATA_DIR
    users = {e["user_id"] for e in events}
    keys = {k.decode() for k in user_keys(rclient, names.redis_prefix)}
    assert keys == {user_key(names.redis_prefix, version.tag, u) for u in users}
    # a fresh deployment: the worker promoted its own version and listed it in the registry
    assert rclient.get(promoted_key(names.redis_prefix)).decode() == version.version
    entry = orjson.loads(rclient.hget(versions_key(names.redis_prefix), version.version))
    assert entry["group"] == version.group and entry["tag"] == version.tag
    report = _oracle(events, trained_model, settings_for(), rclient)
    assert report.users == len(users)

    # one output record per applied event, keyed by user id, with the documented fields
    out = consume_all(kafka_bootstrap, names.output_topic, len(events))
    assert len(out) == len(events)
    rec = orjson.loads(out[0].value)
    assert set(rec) >= {"user_id", "probs", "top", "model_version", "event_time", "processed_at", "events"}
    assert out[0].key == rec["user_id"].encode()
    assert abs(sum(rec["probs"]) - 1) < 1e-4
    stored = rclient.hgetall(user_key(names.redis_prefix, version.tag, rec["user_id"]))
    assert {b"probs", b"top", b"event_ts", b"updated_at", b"model_version", b"events", b"state", b"pos"} <= set(stored)


def test_user_order_kept_inside_big_batches_and_duplicates_skipped(
    names, kafka_bootstrap, redis_url, trained_model, data_dir, rclient, settings_for, tmp_path
):
    # one heavy user's 120 events interleaved with 3000 events of others, all inside few large batches
    events = [e for e in ml_events(data_dir, 3200) if e["user_id"] != "405"]
    heavy = [e for e in ml_events(data_dir, 100_000) if e["user_id"] == "405"][:120]
    mixed = []
    for i, e in enumerate(events):
        mixed.append(e)
        if i % 25 == 0 and heavy:
            mixed.append(heavy.pop(0))
    mixed += heavy
    # a producer retry storm: every chunk of 200 is sent, then its first half again (same event ids, new offsets)
    stream = []
    for i in range(0, len(mixed), 200):
        chunk = mixed[i : i + 200]
        stream += chunk + chunk[:100]
    resent = len(stream) - len(mixed)
    produce(kafka_bootstrap, names.input_topic, stream)
    worker = start_worker(names, kafka_bootstrap, redis_url, trained_model, tmp_path, INTEREST_MAX_BATCH="5000")
    try:
        wait_for(lambda: worker.metric("interest_events_in_total") == len(stream), 90, "all events taken")
        wait_for(lambda: applied_events(rclient, names.redis_prefix) == len(mixed), 30, "all events applied")
        counted = ("interest_duplicates_skipped_total", "interest_events_applied_total")
        wait_for(lambda: sum(worker.metric(m) for m in counted) >= len(stream), 10, "events counted")
        assert worker.metric("interest_duplicates_skipped_total") == resent
        assert worker.metric("interest_events_applied_total") == len(mixed)
    finally:
        assert worker.stop() == 0
    _oracle(mixed, trained_model, settings_for(), rclient)
    # the heavy user's output records count up 1..120 in order
    out = consume_all(kafka_bootstrap, names.output_topic, len(mixed))
    counts = [orjson.loads(r.value)["events"] for r in out if r.key == b"405"]
    assert counts == list(range(1, len(counts) + 1)) and len(counts) == 120


def test_bad_events_dead_lettered_good_ones_flow(
    names, kafka_bootstrap, redis_url, trained_model, data_dir, rclient, settings_for, tmp_path
):
    good = ml_events(data_dir, 800)
    bad: list[bytes | dict] = [
        b"\xff\xfe not utf-8",
        b"{not json",
        b"[1, 2]",
        {"user_id": "u1", "item_id": "1"},  # no ts
        {"user_id": "u 1", "item_id": "1", "ts": 1},
        {"user_id": "x" * 200, "item_id": "1", "ts": 1},
        {"user_id": "u1", "item_id": "no-such-item", "ts": 1},
        {"user_id": "u1", "category": "NoSuchGenre", "ts": 1},
        {"user_id": "u1", "item_id": "1", "ts": 1, "surprise": True},
        {"user_id": "u1", "item_id": "1", "ts": 4e12},
        b'{"user_id": "u1", "item_id": "1", "ts": ' + b"9" * 5000 + b"}",
    ]
    stream: list = []
    for i, e in enumerate(good):
        stream.append(e)
        if i % 70 == 0 and len(stream) // 70 < len(bad):
            stream.append(bad[i // 70])
    placed = sum(1 for x in stream if x in bad)
    produce(
        kafka_bootstrap,
        names.input_topic,
        stream,
        key=lambda ev: str(ev["user_id"]).encode() if isinstance(ev, dict) else b"u1",
        headers=[("trace-id", b"t-1")],
    )
    worker = start_worker(names, kafka_bootstrap, redis_url, trained_model, tmp_path)
    try:
        wait_for(lambda: applied_events(rclient, names.redis_prefix) == len(good), 90, "good events applied")
        dlq = consume_all(kafka_bootstrap, names.dlq_topic, placed)
        assert worker.alive()
    finally:
        assert worker.stop() == 0
    assert len(dlq) == placed
    reasons = {dict(r.headers)["dlq.reason"].decode() for r in dlq}
    assert all(dict(r.headers).get("trace-id") == b"t-1" for r in dlq), "a dead letter keeps the original headers"
    assert {"bad_json", "not_object", "missing_field", "bad_user_id", "unknown_item", "unknown_category"} <= reasons
    originals = {r.value for r in dlq}
    assert b"{not json" in originals and b"\xff\xfe not utf-8" in originals
    _oracle(good, trained_model, settings_for(), rclient)


def test_wrongly_keyed_events_are_rekeyed_and_applied_in_order(
    names, kafka_bootstrap, redis_url, trained_model, data_dir, rclient, settings_for, tmp_path
):
    events = ml_events(data_dir, 2000)
    # keyed by something else (one partition, so Kafka keeps their order; the worker must restore per-user routing)
    produce(kafka_bootstrap, names.input_topic, events, key=lambda ev: b"session-42", headers=[("trace-id", b"t-2")])
    worker = start_worker(names, kafka_bootstrap, redis_url, trained_model, tmp_path)
    try:
        wait_for(lambda: applied_events(rclient, names.redis_prefix) == len(events), 90, "events applied via re-key")
        # the counter is bumped after the Redis write (and relayed from the step process): wait for it too
        wait_for(lambda: worker.metric("interest_rekeyed_total") == len(events), 10, "re-keys counted")
    finally:
        assert worker.stop() == 0
    rekeyed = consume_all(kafka_bootstrap, model_names(names, trained_model).rekey_topic, len(events))
    assert sorted(r.value for r in rekeyed) == sorted(orjson.dumps(e) for e in events), "values forwarded unchanged"
    assert all(dict(r.headers) == {"trace-id": b"t-2"} for r in rekeyed), "re-keyed records keep their headers"
    _oracle(events, trained_model, settings_for(), rclient)


def test_worker_without_a_step_process_matches_offline_replay(
    names, kafka_bootstrap, redis_url, trained_model, data_dir, rclient, settings_for, tmp_path
):
    # INTEREST_STEP_PROCESS=false: the same batch step in the worker's own process
    events = ml_events(data_dir, 2000)
    worker = start_worker(names, kafka_bootstrap, redis_url, trained_model, tmp_path, INTEREST_STEP_PROCESS="false")
    try:
        _apply_all(worker, names, kafka_bootstrap, rclient, events)
        assert "batches stepped with model.seq.onnx (unpacked) in the worker's process" in worker.output()
    finally:
        assert worker.stop() == 0
    assert len(consume_all(kafka_bootstrap, names.output_topic, len(events))) == len(events)
    _oracle(events, trained_model, settings_for(), rclient)


def test_two_workers_split_partitions_and_match_replay(
    names, kafka_bootstrap, redis_url, trained_model, data_dir, rclient, settings_for, tmp_path
):
    events = ml_events(data_dir, 8000)
    w1 = start_worker(names, kafka_bootstrap, redis_url, trained_model, tmp_path)
    w2 = start_worker(names, kafka_bootstrap, redis_url, trained_model, tmp_path)
    try:
        # both in the group before any event: 4 input + 4 re-key partitions split between them
        owned = lambda w: w.metric("interest_partitions_assigned")  # noqa: E731
        wait_for(lambda: owned(w1) > 0 and owned(w2) > 0 and owned(w1) + owned(w2) == 8, 60, "both workers assigned")
        produce(kafka_bootstrap, names.input_topic, events)
        wait_for(lambda: applied_events(rclient, names.redis_prefix) == len(events), 120, "all events applied")
        a, b = w1.metric("interest_events_applied_total"), w2.metric("interest_events_applied_total")
        assert a > 0 and b > 0, f"both workers must take part (applied {a} and {b})"
        assert a + b == len(events)
    finally:
        assert w1.stop() == 0
        assert w2.stop() == 0
    _oracle(events, trained_model, settings_for(), rclient)


def test_worker_refuses_corrupt_model(names, kafka_bootstrap, redis_url, tmp_path):
    bad = tmp_path / "model.onnx"
    bad.write_bytes(b"this is not an onnx model")
    worker = start_worker(names, kafka_bootstrap, redis_url, bad, tmp_path, ready=False)
    assert worker.proc.wait(timeout=60) == 2
    out = worker.output()
    assert "not a loadable ONNX model" in out
    assert "Traceback" not in out
