"""The batch path: Faust's consumer hands whole fetches of the worker's topics to the batch pipeline.

Faust delivers a fetch one message at a time: a ``ConsumerMessage`` per record, the conductor's callback, an
``Event``, a channel queue put and get, the stream's iterator and its per-message ack bookkeeping. That costs tens of
microseconds per event, which caps a Faust agent far below what aiokafka fetches and what the worker steps. Here the
app keeps everything of Faust that matters to a consumer group (its worker and services, the subscription its agent
declares, its assignor that co-partitions the input and re-key topics, its rebalance protocol, its offset commits)
and changes one step: :meth:`BatchConsumer.getmany`, which Faust's fetch loop calls for each fetch, gives the records
of the batch topics, per partition and as aiokafka returned them, to a :class:`RecordSink` instead of yielding them
as messages. Other topics (none in the worker) still go Faust's way.

Offsets are acked per batch: :meth:`BatchConsumer.ack_batch` records the offset after a partition's last applied
record, and Faust's own commit (its timer, a rebalance, the stop) commits it. During a rebalance or a stop, Faust
waits for its streams to be empty before it commits (``Consumer.wait_empty``): here that also waits until the sink
has finished every batch it was handed, so nothing handed over is committed unapplied or lost.

The worker's aiokafka consumer also gets its own ``fetch_max_wait_ms`` (Faust hard-codes 1,500 ms): aiokafka keeps
one fetch request in flight per broker and leaves out of it the partitions whose records are still buffered, so a
request can ask only for partitions that have nothing (the re-key topic's), and the broker holds it for that long
while the input's next records wait. At 1,500 ms a worker at half its maximum rate fell seconds behind in most runs
(docs/experiments.md, seventh and eighth passes).

What it hooks into (``Consumer.getmany``, ``_wait_next_records``, ``_new_offset``, ``wait_empty``, the aiokafka
driver's ``Transport.Consumer``, ``Consumer._new_consumer_thread``, ``AIOKafkaConsumerThread._create_worker_consumer``,
aiokafka's ``AIOKafkaConsumer._fetch_max_wait_ms`` and ``_fetch_min_bytes``, ``App._new_transport``) is pinned with
faust-streaming's and aiokafka's versions in pyproject.toml; ``tests/streams/runtime/test_batches.py`` fails if an
upgrade moves any of it.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Mapping, Sequence
from typing import Any, Protocol

import faust
from faust.transport.drivers import aiokafka as faust_aiokafka
from faust.types import TP
from mode.utils.futures import notify

log = logging.getLogger(__name__)

REVOKE_COMMIT_TIMEOUT_S = 5.0


class RecordSink(Protocol):
    """Where the consumer hands fetched records: the worker's batch pipeline."""

    room: Any  # an asyncio.Event, set while the sink takes more records

    def add_records(self, tp: TP, records: Sequence[Any]) -> None:
        """Take one partition's fetched records (aiokafka ``ConsumerRecord``s, in offset order)."""

    async def wait_idle(self) -> None:
        """Return once every record handed over is applied and acked (or the worker is abandoned)."""


class WorkerConsumerThread(faust_aiokafka.AIOKafkaConsumerThread):
    """Faust's consumer thread; the aiokafka consumer it creates has the app's ``fetch_max_wait_ms`` and
    ``fetch_min_bytes`` (Faust sets neither: 1,500 ms and aiokafka's 1 byte)."""

    def _create_worker_consumer(self, transport: Any) -> Any:
        consumer = super()._create_worker_consumer(transport)
        # read once, by AIOKafkaConsumer.start(), when it builds its fetcher; the consumer starts after this returns
        wait_ms = getattr(self.app, "fetch_max_wait_ms", None)
        if wait_ms is not None:
            consumer._fetch_max_wait_ms = int(wait_ms)
        min_bytes = getattr(self.app, "fetch_min_bytes", None)
        if min_bytes is not None:
            consumer._fetch_min_bytes = int(min_bytes)
        return consumer


class BatchConsumer(faust_aiokafka.Consumer):
    """Faust's aiokafka consumer; the records of ``batch_topics`` go to a sink per fetch and are acked per batch."""

    sink: RecordSink | None = None

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.batch_topics: frozenset[str] = getattr(self.app, "batch_topics", frozenset())
        self._batch_next: dict[TP, int] = {}  # per partition: the offset after its last applied record, to commit
        self._attached = asyncio.Event()

    def _new_consumer_thread(self) -> WorkerConsumerThread:
        return WorkerConsumerThread(self, loop=self.loop, beacon=self.beacon)

    def attach(self, sink: RecordSink) -> None:
        """The agent's pipeline is there: records of the batch topics go to it from now on."""
        self.sink = sink
        self._attached.set()

    async def getmany(self, timeout: float) -> AsyncIterator[tuple[TP, Any]]:
        if not self.batch_topics:
            async for item in super().getmany(timeout):
                yield item
            return
        if self.sink is None:  # the agent has not started yet: nothing is fetched before it can take it
            await self.wait_first(self._attached.wait(), self.suspend_flow.wait())
            return
        records, active = await self._wait_next_records(timeout)
        if records is None or self.should_stop:
            return
        if not self.flow_active:  # a rebalance started meanwhile: as Faust, drop the fetch and seek back
            await self.perform_seek()
            return
        generation = self.app.consumer_generation_id
        sink, batch_topics, buffered = self.sink, self.batch_topics, self._buffered_partitions
        assert sink is not None
        others = {}
        for tp, recs in records.items():
            if active is not None and tp not in active and tp not in buffered:
                continue
            if tp.topic not in batch_topics:
                others[tp] = recs
                continue
            if not sink.room.is_set():  # back-pressure: fetching waits while the pipeline is full
                await self.wait_first(sink.room.wait(), self.suspend_flow.wait())
            # a rebalance while waiting: these records may belong to another worker now; Faust seeks back to the
            # committed offsets before the next fetch of the partitions it keeps
            if not self.flow_active or self.app.consumer_generation_id != generation or self.should_stop:
                return
            sink.add_records(tp, recs)
        if others:
            to_message = self._to_message
            for tp, record in self.scheduler.iterate(others):
                if not self.flow_active or self.app.consumer_generation_id != generation:
                    return
                yield tp, to_message(tp, record)

    def ack_batch(self, offsets: Mapping[TP, int], count: int) -> None:
        """A batch is applied: per partition, ``offsets`` is the offset after its last record in the batch."""
        batch_next, acked, committed = self._batch_next, self._acked, self._committed_offset
        for tp, offset in offsets.items():
            done = committed.get(tp)
            if done is None or offset > done:
                acked[tp]
                if offset > batch_next.get(tp, -1):
                    batch_next[tp] = offset
        self._n_acked += count
        notify(self._waiting_for_ack)

    def forget(self, revoked: set[TP]) -> None:
        """Partitions revoked: their acks are no longer ours to commit."""
        for tp in revoked:
            self._batch_next.pop(tp, None)

    def _new_offset(self, tp: TP) -> int | None:
        offset = self._batch_next.pop(tp, None)
        return offset if offset is not None else super()._new_offset(tp)

    async def on_partitions_revoked(self, revoked: set[TP]) -> None:
        """Before Faust forgets the revoked partitions' offsets, finish what the sink was handed and commit it: the
        new owner then starts where this worker stopped instead of applying the handed-over batches again (they
        would be skipped as duplicates, but only after being read and decoded a second time)."""
        if self.sink is not None and revoked and not self.should_stop:
            self.stop_flow()  # no more fetches go to the sink until the new assignment (Faust resumes the flow)
            await self.sink.wait_idle()
            # bounded: after a lost session (the broker went away) the coordinator may not take a commit until the
            # group is joined again, which waits for this callback; the new owner then skips what it finds applied
            try:
                await asyncio.wait_for(self.commit(), REVOKE_COMMIT_TIMEOUT_S)
            except Exception as exc:
                log.warning(
                    "commit before giving up partitions did not complete (%r); their new owner skips "
                    "the events this worker applied as duplicates",
                    exc,
                )
        await super().on_partitions_revoked(revoked)

    async def wait_empty(self) -> None:
        """Faust waits for this before it commits in a rebalance and at a stop: the sink's batches too."""
        if self.sink is not None:
            await self.sink.wait_idle()
        await super().wait_empty()


class BatchTransport(faust_aiokafka.Transport):
    Consumer = BatchConsumer


class BatchApp(faust.App):
    """A Faust app whose consumer is a :class:`BatchConsumer` (same broker URL, credentials and settings) that hands
    the records of ``batch_topics`` to the sink its agent attaches (none: every record goes Faust's way) and whose
    fetch requests wait at most ``fetch_max_wait_ms`` for ``fetch_min_bytes`` (None: Faust's and aiokafka's)."""

    def __init__(
        self,
        *args: Any,
        batch_topics: frozenset[str],
        fetch_max_wait_ms: int | None = None,
        fetch_min_bytes: int | None = None,
        **kwargs: Any,
    ) -> None:
        self.batch_topics = batch_topics
        self.fetch_max_wait_ms = fetch_max_wait_ms
        self.fetch_min_bytes = fetch_min_bytes
        super().__init__(*args, **kwargs)

    def _new_transport(self) -> Any:
        return BatchTransport(self.conf.broker_consumer, self)
