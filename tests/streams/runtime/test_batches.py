"""The batch path (streams.runtime.batches): what it hooks into in Faust is still there, and both paths (whole fetches
handed to the pipeline, the default; Faust's per-event stream, ``INTEREST_BATCH_PATH=false``) are oracle-exact."""

from __future__ import annotations

import asyncio
import inspect
import re

import aiokafka
import faust
import pytest
from faust.transport import consumer as faust_consumer
from faust.transport.drivers import aiokafka as faust_aiokafka

from export.runtime import StepSession
from streams.runtime.batches import BatchApp, BatchConsumer, BatchTransport, WorkerConsumerThread
from streams.tools.verify import verify_events
from tests.conftest import REPO
from tests.harness import applied_events, ml_events, produce, start_worker, wait_for


def test_faust_is_the_pinned_version() -> None:
    pin = re.search(r'"faust-streaming==([^"]+)"', (REPO / "pyproject.toml").read_text())
    assert pin and faust.__version__ == pin.group(1), "the batch path is checked against the pinned faust-streaming"
    pin = re.search(r'"aiokafka==([^"]+)"', (REPO / "pyproject.toml").read_text())
    assert pin and aiokafka.__version__ == pin.group(1), "the fetch wait is checked against the pinned aiokafka"


def test_faust_still_has_what_the_batch_path_hooks_into() -> None:
    base = faust_consumer.Consumer
    # the fetch loop gets its records from getmany(), and waits on the flow events the batch path waits on
    drain = inspect.getsource(base._drain_messages)
    assert "self.getmany" in drain and "suspend_flow" in drain
    for name in ("_wait_next_records", "_new_offset", "wait_empty", "perform_seek", "_to_message", "getmany"):
        assert callable(getattr(base, name, None)), f"faust's Consumer lost {name}"
    assert list(inspect.signature(base._wait_next_records).parameters) == ["self", "timeout"]
    assert list(inspect.signature(base._new_offset).parameters) == ["self", "tp"]
    # commits take the offset of a partition from _new_offset, for the partitions in _acked
    assert "self._new_offset(tp)" in inspect.getsource(base._filter_committable_offsets)
    assert "self._acked" in inspect.getsource(base._filter_tps_with_pending_acks)
    # ... and the rebalance waits for the consumer to be empty before committing
    assert "wait_empty" in inspect.getsource(faust.App._consumer_wait_empty)
    init = inspect.getsource(base.__init__)
    for attr in ("_acked", "_committed_offset", "_buffered_partitions", "_waiting_for_ack", "suspend_flow"):
        assert f"self.{attr}" in init, f"faust's Consumer no longer sets {attr}"
    # the app builds its transport in _new_transport, and the transport its consumer from .Consumer
    assert "transport.by_url" in inspect.getsource(faust.App._new_transport)
    assert faust_aiokafka.Transport.Consumer is faust_aiokafka.Consumer
    assert "self.Consumer(" in inspect.getsource(faust.transport.base.Transport.create_consumer)
    assert issubclass(BatchTransport, faust_aiokafka.Transport) and BatchTransport.Consumer is BatchConsumer
    # the worker consumer comes from the consumer thread's _create_worker_consumer, built by _new_consumer_thread,
    # and aiokafka reads _fetch_max_wait_ms and _fetch_min_bytes when it starts
    # (test_the_fetch_settings_reach_aiokafkas_fetcher runs it)
    assert "AIOKafkaConsumerThread(self" in inspect.getsource(faust_aiokafka.Consumer._new_consumer_thread)
    thread = faust_aiokafka.AIOKafkaConsumerThread
    assert "self._create_worker_consumer(" in inspect.getsource(thread._create_consumer)
    assert list(inspect.signature(thread._create_worker_consumer).parameters) == ["self", "transport"]
    assert "self._fetch_max_wait_ms = fetch_max_wait_ms" in inspect.getsource(aiokafka.AIOKafkaConsumer.__init__)
    assert "fetch_max_wait_ms=self._fetch_max_wait_ms" in inspect.getsource(aiokafka.AIOKafkaConsumer.start)
    assert "self._fetch_min_bytes = fetch_min_bytes" in inspect.getsource(aiokafka.AIOKafkaConsumer.__init__)
    assert "fetch_min_bytes=self._fetch_min_bytes" in inspect.getsource(aiokafka.AIOKafkaConsumer.start)


def test_the_batch_app_gets_a_batch_consumer(tmp_path) -> None:
    app = BatchApp("t", broker="kafka://127.0.0.1:1", batch_topics=frozenset({"a"}), datadir=str(tmp_path))
    assert isinstance(app.consumer, BatchConsumer) and app.consumer.batch_topics == {"a"}


def test_the_fetch_settings_reach_aiokafkas_fetcher(kafka_bootstrap, tmp_path) -> None:
    """The worker consumer Faust starts asks the broker to hold a fetch for the app's fetch_max_wait_ms, until it
    has fetch_min_bytes."""
    app = BatchApp(
        "t-fetch-wait",
        broker=f"kafka://{kafka_bootstrap}",
        batch_topics=frozenset(),
        fetch_max_wait_ms=123,
        fetch_min_bytes=4567,
        datadir=str(tmp_path),
    )

    async def started() -> tuple[int, int]:
        thread = app.consumer._new_consumer_thread()
        assert isinstance(thread, WorkerConsumerThread)
        consumer = thread._create_worker_consumer(app.transport)
        await consumer.start()
        try:
            return consumer._fetcher._fetch_max_wait_ms, consumer._fetcher._fetch_min_bytes
        finally:
            await consumer.stop()

    assert asyncio.run(started()) == (123, 4567)


def _run(names, kafka_bootstrap, redis_url, trained_model, tmp_path, rclient, settings_for, events, **env):
    worker = start_worker(names, kafka_bootstrap, redis_url, trained_model, tmp_path, **env)
    try:
        produce(kafka_bootstrap, names.input_topic, events)
        wait_for(lambda: applied_events(rclient, names.redis_prefix) == len(events), 90, "all events applied")
        wait_for(lambda: worker.metric("interest_events_applied_total") >= len(events), 10, "applied events counted")
        assert worker.metric("interest_events_applied_total") == len(events)
        chunks = worker.metric("interest_fetch_chunks_total")
    finally:
        assert worker.stop() == 0, worker.output()[-3000:]
    report = verify_events(events, StepSession(trained_model, device="cpu"), settings_for(), rclient)
    assert report.ok and report.max_dp <= 1e-5, report.summary()
    assert report.users == len({e["user_id"] for e in events})
    return chunks


@pytest.mark.integration
@pytest.mark.parametrize("batch_path", ["true", "false"])
def test_both_paths_match_offline_replay(
    batch_path, names, kafka_bootstrap, redis_url, trained_model, data_dir, rclient, settings_for, tmp_path
):
    events = ml_events(data_dir, 5000)
    chunks = _run(
        names, kafka_bootstrap, redis_url, trained_model, tmp_path, rclient, settings_for, events,
        INTEREST_BATCH_PATH=batch_path,
    )  # fmt: skip
    if batch_path == "true":
        assert 0 < chunks <= len(events)  # the fetches went to the pipeline whole...
    else:
        assert chunks == 0  # ...or every event went through Faust's stream
