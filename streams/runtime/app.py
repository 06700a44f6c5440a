"""The Faust app: :func:`make_app` declares it (app, topic, the agent that updates interests, the rebalance hooks,
the lag timer) around a batch step; nothing happens at import time. Reads top to bottom.

Started by ``interest-stream worker`` (:mod:`streams.runtime.worker`), which checks Redis, creates the topics and
starts the batch step (a :class:`~streams.runtime.stepper.StepperProcess` child, or an ``InterestProcessor`` in this
process) before it builds the app around it and runs it.

Per batch (events collected from ``stream.events()``, automatic acks off, while the previous batch was stepped, at
most max_batch):
    prepare (decode, dedup, step, hand output records, dead letters, re-keys to the producer)  ->  await their
    delivery  ->  write Redis (one pipeline)  ->  ack the batch's events; offsets are committed after that.
The stages overlap (:class:`BatchPipeline`): Faust collects while batch n+1 is stepped and batch n is written.
A crash anywhere before the ack leaves the batch uncommitted: it is redelivered and the duplicates are skipped.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import os
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import faust

from streams.core.metrics import BATCH_STAGES, Metrics
from streams.core.processor import BatchPlan, BatchStep, RawMessage
from streams.kafka import KafkaConnection
from streams.runtime.batches import BatchApp, BatchConsumer
from streams.settings import Settings

log = logging.getLogger("streams.runtime.app")

# Stepped batches that may wait for the write stage. With one, the step stage stopped handing batches to the step
# process while it finished the one before, and the step process's own stages ran dry; two lifted one worker's rate
# by 13-22 % in alternating A/Bs (docs/experiments.md, tenth pass), more did not add to it. Each batch is still acked
# in order and only once in Redis: a deeper queue only holds more of them in flight.
STEPPED_WAITING = 2


def faust_options(settings: Settings) -> dict[str, Any]:
    """The Faust app's configuration from the settings (the bench's no-op agent runs with the same)."""
    connection = KafkaConnection.from_settings(settings)
    return {
        "broker": connection.faust_broker(),
        "broker_credentials": connection.faust_credentials(),
        "store": "memory://",
        "datadir": str(settings.data_dir / "{conf.id}-data"),
        "topic_partitions": settings.partitions,
        "topic_disable_leader": True,
        # > 0 keeps Faust's own assignor (without tables Faust would fall back to round-robin): it co-partitions the
        # input and re-key topics, so one worker owns a user's partition in both.
        "table_standby_replicas": 1,
        "consumer_auto_offset_reset": "earliest",
        "broker_session_timeout": settings.session_timeout_s,
        "broker_heartbeat_interval": min(3.0, settings.session_timeout_s / 3),
        "broker_commit_interval": settings.commit_interval_s,
        "broker_max_poll_records": max(500, settings.max_batch),
        "stream_buffer_maxsize": max(4096, 2 * settings.max_batch),
        # output records wait for delivery at the end of each batch: a short linger keeps that wait short
        "producer_linger_ms": 1,
        "producer_max_batch_size": 256 * 1024,
        "web_enabled": settings.web_port > 0,
        "web_port": settings.web_port or 6066,
        "web_bind": "0.0.0.0",
        "key_serializer": "raw",
        "value_serializer": "raw",
    }


@dataclass
class Runtime:
    """What the agent, the hooks and the timer share: the batch step, the metrics, the app, and per partition the
    offset after the last event this worker applied (for the lag gauge)."""

    settings: Settings
    processor: BatchStep
    metrics: Metrics
    app: faust.App
    applied_to: dict = field(default_factory=dict)

    def producer(self) -> Any:
        """The aiokafka producer under Faust's: a batch's records are appended straight into its record batches."""
        return self.app.producer._ensure_producer()  # type: ignore[attr-defined]  # Faust's aiokafka driver (pinned)


def abandon(reason: str) -> None:
    """Exit at once without committing: the uncommitted batch is redelivered to whoever owns it next."""
    log.critical("abandoning the worker: %s (uncommitted events will be redelivered)", reason)
    logging.shutdown()
    os._exit(70)


def _stage_ended(task: asyncio.Task) -> None:
    """A pipeline stage may only end by cancellation (shutdown): any other end would leave its batches unacked and
    the worker hanging, so it abandons the worker."""
    if not task.cancelled() and task.exception() is not None:
        abandon(f"a batch stage ended: {task.exception()!r}")


class BatchPipeline:
    """Fetched records -> batches -> two stages: step (prepare, records handed to the producer), then write (await
    their delivery, Redis, ack), with up to STEPPED_WAITING stepped batches queued between them.

    Records come in per partition, as fetched (:meth:`add_records`, the batch path: the consumer hands over whole
    fetches) or one by one as Faust events (:meth:`add`, the per-event path). Batches form naturally: the step stage
    takes everything that arrived while it was busy (up to ``max_batch``), so batches grow under a backlog; only when
    it is idle does it wait, up to ``linger``, for a fuller batch. While batch n is delivered and written, batch n+1 is
    stepped (building on n's states, see ``InterestProcessor.inflight``) and the consumer keeps fetching. Each stage
    takes its batches in order, and records are acked only once their batch is in Redis, so committed offsets never
    pass an event that was not applied. A failure in either stage abandons the worker (nothing of its batch is acked).
    """

    def __init__(self, runtime: Runtime, ack: Callable[[dict, int, list], Awaitable[None]]) -> None:
        self.runtime = runtime
        self.ack = ack  # (offset after the last applied record per partition, records, Faust events) -> acked
        self.max_batch = runtime.settings.max_batch
        self.linger = runtime.settings.max_latency_ms / 1000.0
        self.chunks: collections.deque[tuple[Any, Sequence[Any]]] = collections.deque()  # (tp, records) not stepped
        self.events: list[faust.EventT] = []  # the per-event path: the Faust events of those records, to ack
        self.count = 0  # records in chunks
        self.first_at = 0.0  # loop time the oldest pending record arrived
        self.first_seen: float | None = None  # its arrival time (epoch s), unless it waited behind a full batch
        self.fetch_chunks = runtime.metrics.fetch_chunks
        self.stage = {s: runtime.metrics.batch_stage_seconds.labels(s) for s in BATCH_STAGES}
        self.arrived = asyncio.Event()  # chunks is not empty
        self.full = asyncio.Event()  # chunks hold max_batch records
        self.room = asyncio.Event()  # chunks hold fewer than max_batch records
        self.room.set()
        self.to_write: asyncio.Queue[tuple[list, list, BatchPlan, float]] = asyncio.Queue(maxsize=STEPPED_WAITING)
        self.busy = 0  # batches taken and not yet written
        self.idle = asyncio.Event()
        self.idle.set()
        self.tasks = [asyncio.ensure_future(self._step()), asyncio.ensure_future(self._write())]
        for task in self.tasks:
            task.add_done_callback(_stage_ended)

    def add_records(self, tp: Any, records: Sequence[Any]) -> None:
        """The batch path: take one partition's fetched records (aiokafka's ``ConsumerRecord``s); the consumer waits
        for ``room`` first."""
        if records:
            self.fetch_chunks.inc()
            self._append(tp, records)

    def _append(self, tp: Any, records: Sequence[Any]) -> None:
        if not self.count:
            self.first_at = asyncio.get_running_loop().time()
            self.first_seen = time.time()
            self.arrived.set()
            self.idle.clear()
        self.chunks.append((tp, records))
        self.count += len(records)
        if self.count >= self.max_batch:
            self.full.set()
            self.room.clear()

    async def add(self, event: faust.EventT) -> None:
        """The per-event path: collect one Faust event; waits while max_batch records are already waiting."""
        m = event.message
        ts = m.timestamp * 1000.0 if m.timestamp is not None and m.timestamp > 0 else -1.0  # Faust's are in seconds
        self.events.append(event)
        self._append(m.tp, [RawMessage(m.topic, m.partition, m.offset, m.key, m.value, ts, m.headers)])
        if not self.room.is_set():
            await self.room.wait()

    def _take(self) -> tuple[list, list]:
        """Up to max_batch records, oldest first, as (tp, records) chunks (the last one cut to fit)."""
        taken: list[tuple[Any, Sequence[Any]]] = []
        n, chunks = 0, self.chunks
        while chunks and n < self.max_batch:
            tp, records = chunks.popleft()
            room = self.max_batch - n
            if len(records) > room:
                chunks.appendleft((tp, records[room:]))
                records = records[:room]
            taken.append((tp, records))
            n += len(records)
        events = self.events[:n] if self.events else []
        if events:
            del self.events[:n]
        if self.first_seen is not None:
            produced = taken[0][1][0].timestamp / 1000.0
            if produced > 0:  # a record without a timestamp has -1
                self.stage["consume"].observe(max(0.0, self.first_seen - produced))
            self.stage["collect"].observe(time.time() - self.first_seen)
        self.first_seen = None  # the next batch's first record, if already waiting, arrived behind this one
        self.count -= n
        if not self.count:
            self.arrived.clear()
        if self.count < self.max_batch:
            self.full.clear()
            self.room.set()
        self.busy += 1
        return taken, events

    async def _step(self) -> None:
        processor, metrics, producer = self.runtime.processor, self.runtime.metrics, self.runtime.producer
        loop = asyncio.get_running_loop()
        while True:
            await self.arrived.wait()
            wait = self.first_at + self.linger - loop.time()
            if wait > 0 and not self.full.is_set():  # a fuller batch is worth a short wait
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self.full.wait(), wait)
            chunks, events = self._take()
            try:
                messages = chunks[0][1] if len(chunks) == 1 else [r for _, records in chunks for r in records]
                metrics.events_in.inc(len(messages))
                metrics.batch_size.observe(len(messages))
                taken = time.perf_counter()
                # the batch's records go to the producer at once: delivery overlaps the previous batch's Redis write
                plan = await processor.prepare(messages, producer())
                stepped = time.perf_counter()
                self.stage["step"].observe(stepped - taken)
            except Exception as exc:  # a bug: never ack what was not applied
                log.exception("batch failed")
                abandon(f"batch failed: {exc!r}")
            await self.to_write.put((chunks, events, plan, stepped))

    async def _write(self) -> None:
        processor, producer, applied_to = self.runtime.processor, self.runtime.producer, self.runtime.applied_to
        while True:
            chunks, events, plan, stepped = await self.to_write.get()
            try:
                await processor.finish(plan, producer())
                self.stage["write"].observe(time.perf_counter() - stepped)
                offsets = {tp: records[-1].offset + 1 for tp, records in chunks}  # chunks of a tp come in order
                await self.ack(offsets, sum(len(records) for _, records in chunks), events)
                applied_to.update(offsets)
            except Exception as exc:  # an unrecoverable broker or Redis error: never ack what was not applied
                log.exception("batch failed")
                abandon(f"batch failed: {exc!r}")
            self.busy -= 1
            if not self.busy and not self.count:
                self.idle.set()

    async def wait_idle(self) -> None:
        """Until every record handed over is applied and acked (a rebalance or a stop waits for this)."""
        await self.idle.wait()

    async def drain(self, timeout: float) -> None:
        """Finish every collected record (graceful stop); abandon the worker if that takes longer than ``timeout``."""
        try:
            await asyncio.wait_for(self.idle.wait(), timeout)
        except BaseException as exc:
            abandon(f"could not finish the collected batches during shutdown: {exc!r}")
        for task in self.tasks:
            task.cancel()


def make_app(settings: Settings, processor: BatchStep, metrics: Metrics) -> faust.App:
    """The worker's Faust app around its batch step (model session + state store, here or in the step process)."""
    topics = frozenset({settings.input_topic, settings.rekey_topic})
    # the per-event path is Faust's consumer unchanged but for its fetch wait (no batch topics), so the A/B of the
    # two paths compares the hand-over alone
    app = BatchApp(
        settings.app_id,
        batch_topics=topics if settings.batch_path else frozenset(),
        fetch_max_wait_ms=settings.fetch_max_wait_ms,
        fetch_min_bytes=settings.fetch_min_bytes,
        **faust_options(settings),
    )
    rt = Runtime(settings, processor, metrics, app)
    # Input: the clicks topic and the re-key topic, consumed by one agent, hence co-partitioned by Faust's assignor.
    clicks = app.topic(settings.input_topic, settings.rekey_topic, key_serializer="raw", value_serializer="raw")

    @app.agent(clicks, name="streams.runtime.app.update_interests")
    async def update_interests(stream: faust.StreamT) -> None:
        """Step batches of click events into the users' states and publish their new distributions."""
        if settings.batch_path:
            consumer = app.consumer
            assert isinstance(consumer, BatchConsumer)

            async def ack_batch(offsets: dict, count: int, events: list) -> None:
                consumer.ack_batch(offsets, count)

            pipeline = BatchPipeline(rt, ack_batch)
            consumer.attach(pipeline)  # the consumer hands its fetches to the pipeline: the stream stays empty
        else:
            ack = stream.ack

            async def ack_events(offsets: dict, count: int, events: list) -> None:
                for event in events:
                    await ack(event)

            pipeline = BatchPipeline(rt, ack_events)
        try:
            if settings.batch_path:
                await asyncio.Event().wait()  # until the worker stops
            else:
                # no automatic acks (Faust's would ack each event when the next arrives): the pipeline acks each
                # event once its batch is applied
                stream.enable_acks = False
                async for event in stream.events():
                    await pipeline.add(event)
        except asyncio.CancelledError:
            # graceful stop: finish what was collected before the consumer commits, or abandon it unacked
            await asyncio.shield(pipeline.drain(settings.session_timeout_s))
            raise

    @app.on_partitions_assigned.connect  # type: ignore[arg-type]  # Faust passes ``signal`` in **kwargs
    async def count_assigned(sender: faust.App, assigned: set, **kwargs: object) -> None:
        """The gauge of owned partitions (a rebalance assigns the whole new set)."""
        topics = {settings.input_topic, settings.rekey_topic}
        metrics.partitions_assigned.set(sum(1 for tp in assigned if tp.topic in topics))

    @app.on_partitions_revoked.connect  # type: ignore[arg-type]  # Faust passes ``signal`` in **kwargs
    async def drop_cached_states(sender: faust.App, revoked: set, **kwargs: object) -> None:
        """Partitions moved: forget cached states, the next batch reads them from Redis (never a stale cache)."""
        if isinstance(app.consumer, BatchConsumer):
            app.consumer.forget(revoked)
        for tp in revoked:
            rt.applied_to.pop(tp, None)
            with contextlib.suppress(KeyError):
                metrics.consumer_lag.remove(tp.topic, str(tp.partition))
        if revoked:
            processor.drop_cache()
            log.info("partitions revoked (%d): state cache dropped", len(revoked))

    @app.timer(5.0)
    async def report_lag() -> None:
        """Per owned partition: its high watermark (as of the last fetch) minus the next offset to apply, which is
        the offset after the last event this worker applied, or the group's committed offset before that."""
        consumer = app.consumer
        for tp in consumer.assignment():
            highwater = consumer.highwater(tp)
            if highwater is None or highwater < 0:
                continue
            committed = consumer._committed_offset.get(tp)  # type: ignore[attr-defined]  # Faust has no public getter
            next_offset = rt.applied_to.get(tp) or committed or 0
            metrics.consumer_lag.labels(tp.topic, str(tp.partition)).set(max(0, highwater - next_offset))

    return app
