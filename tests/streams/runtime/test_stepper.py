"""The step process (streams.runtime.stepper) against the real broker and Redis: it applies, publishes and counts
exactly what the worker's own process would; a failing child reaches the worker as one clear error; it never
outlives it."""

from __future__ import annotations

import asyncio
import os
import pickle
import signal

import orjson
import psutil
import pytest

from export.runtime import StepSession
from models.errors import ModelError, ServiceError
from streams.core.events import Click
from streams.core.metrics import Metrics
from streams.core.processor import RawMessage
from streams.kafka import ensure_topics
from streams.runtime.stepper import MetricsRelay, StepperProcess, _columns, _unpack, apply_metrics
from streams.tools.verify import verify_events
from tests.harness import consume_all, ml_events, raw_messages, start_worker, wait_for

pytestmark = pytest.mark.integration


def test_step_process_applies_publishes_and_relays_metrics(settings_for, trained_model, data_dir, rclient):
    settings = settings_for(device="cpu", partitions=4)
    partitions = ensure_topics(settings)
    events = ml_events(data_dir, 1200)
    messages = raw_messages(settings, events)
    messages.insert(700, RawMessage(settings.input_topic, 0, 10_000, b"u1", b"{not json", 0.0))
    metrics = Metrics()
    stepper = StepperProcess(settings, partitions, metrics)

    async def run() -> None:
        await stepper.start()
        first = await stepper.prepare(messages[:500])
        # as in the worker's pipeline: the next batch is stepped while the previous one is published and written
        second, _ = await asyncio.gather(stepper.prepare(messages[500:]), stepper.finish(first))
        await stepper.finish(second)

    try:
        asyncio.run(run())
    finally:
        stepper.stop()
    assert stepper.proc.returncode == 0

    # Redis holds exactly the offline replay's states; the output topic one record per event; the DLQ the bad one
    report = verify_events(events, StepSession(trained_model, device="cpu"), settings, rclient)
    assert report.ok and report.max_dp <= 1e-5, report.summary()
    out = consume_all(settings.kafka_bootstrap, settings.output_topic, len(events))
    assert len(out) == len(events)
    assert {orjson.loads(r.value)["event_id"] for r in out} == {str(e["event_id"]) for e in events}
    (dead,) = consume_all(settings.kafka_bootstrap, settings.dlq_topic, 1)
    assert dead.value == b"{not json" and dict(dead.headers)["dlq.reason"] == b"bad_json"

    # the child's counts arrive in the worker's own metrics
    sample = metrics.registry.get_sample_value
    assert sample("interest_events_applied_total") == len(events)
    assert sample("interest_dead_letters_total", {"reason": "bad_json"}) == 1
    assert sample("interest_users_cached") == len({e["user_id"] for e in events})
    assert 16 <= sample("interest_latency_from_produce_seconds_count") <= len(events)
    assert sample("interest_ort_step_seconds_count") == 2


def test_a_dead_step_process_fails_every_call_with_one_clear_error(settings_for):
    settings = settings_for(device="cpu", partitions=4)
    partitions = ensure_topics(settings)
    stepper = StepperProcess(settings, partitions, Metrics())
    msgs = raw_messages(settings, [{"user_id": "a", "item_id": "1", "ts": 1}])

    async def run() -> None:
        await stepper.start()
        stepper.proc.kill()
        with pytest.raises(ServiceError, match=r"step process (exited|closed)"):
            await asyncio.wait_for(stepper.prepare(msgs), 30)
        with pytest.raises(ServiceError, match="step process"):
            await asyncio.wait_for(stepper.prepare(msgs), 30)

    try:
        asyncio.run(run())
    finally:
        stepper.stop()


def test_step_process_start_failure_is_the_childs_one_line_error(settings_for, tmp_path):
    bad = tmp_path / "model.onnx"
    bad.write_bytes(b"this is not an onnx model")
    settings = settings_for(device="cpu", model_path=bad)
    with pytest.raises(ModelError, match="not a loadable ONNX model"):
        StepperProcess(settings, {}, Metrics())


def test_step_process_dies_with_a_killed_worker(names, kafka_bootstrap, redis_url, trained_model, tmp_path):
    worker = start_worker(names, kafka_bootstrap, redis_url, trained_model, tmp_path)
    try:
        (child,) = [
            p for p in psutil.Process(worker.proc.pid).children() if "streams.runtime.stepper" in " ".join(p.cmdline())
        ]
        os.kill(worker.proc.pid, signal.SIGKILL)
        worker.proc.wait(timeout=30)
        wait_for(lambda: not child.is_running() or child.status() == psutil.STATUS_ZOMBIE, 10, "the child gone")
    finally:
        worker.stop()


def test_metrics_relay_replays_every_call():
    frames: list[tuple] = []
    metrics = Metrics()

    async def record() -> None:
        relay = MetricsRelay(frames.append)
        relay.applied.inc(3)
        relay.dead_letters.labels("bad_json").inc()
        relay.users_cached.set(7)
        relay.redis_write_seconds.observe(0.01)
        relay.observe_latencies([0.02, 0.03], [-1.0])
        await asyncio.sleep(0)  # one frame per event-loop turn

    asyncio.run(record())
    assert len(frames) == 1 and frames[0][0] == "metrics"
    apply_metrics(metrics, frames[0][1])
    sample = metrics.registry.get_sample_value
    assert sample("interest_events_applied_total") == 3
    assert sample("interest_dead_letters_total", {"reason": "bad_json"}) == 1
    assert sample("interest_users_cached") == 7
    assert sample("interest_redis_write_seconds_count") == 1
    assert sample("interest_latency_from_produce_seconds_count") == 2
    assert sample("interest_latency_from_event_seconds_bucket", {"le": "0.001"}) == 1  # negative counts as zero


def test_a_prepare_frame_carries_every_field_of_every_event() -> None:
    """The worker sends a batch's events as columns; the child rebuilds the same clicks and messages from them."""
    users = ["a", "\u00e9l\u00e8ve", "u-3@x.y", "a"]
    clicks = [
        Click(u, (i % 3, 7)[: 1 + i % 2], i % 4, 1_700_000_000.125 + i, bytes([i]) * 8, None if i % 2 else f"e\n{i}")
        for i, u in enumerate(users)
    ]
    msgs = [
        RawMessage(("clicks", "clicks-rekeyed.v1")[i % 2], 3 * i, 2**40 + i, b"k", b"v", 1.7e9 + i / 7)
        for i in range(4)
    ]
    plan, accepted = _unpack(*pickle.loads(pickle.dumps((_columns(list(zip(clicks, msgs, strict=True))), [], []))))
    assert [c for c, _ in accepted] == clicks
    assert [(m.topic, m.partition, m.offset, m.timestamp) for _, m in accepted] == [
        (m.topic, m.partition, m.offset, m.timestamp) for m in msgs
    ]
    assert not plan.dead and not plan.rekey and _unpack(_columns([]), [], [])[1] == []
