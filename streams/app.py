"""The Faust app: app, topics, the agent that updates interests, the rebalance hook. Reads top to bottom.

Started by ``interest-stream worker`` (:mod:`streams.worker`), which loads the model, connects Redis and creates
the topics before it hands the ready ``InterestProcessor`` to :func:`bind` and runs the app.

Per batch (events collected from ``stream.noack()`` while the previous batch was stepped, at most max_batch):
    prepare (decode, dedup, step)  ->  publish output records, dead letters, re-keys (all sends in flight at once,
    then awaited)  ->  write Redis (one pipeline)  ->  ack the batch's events; offsets are committed after that.
The stages overlap (:class:`BatchPipeline`): Faust collects while batch n+1 is stepped and batch n is written.
A crash anywhere before the ack leaves the batch uncommitted: it is redelivered and the duplicates are skipped.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time

import faust

from streams.kafka import RecordBatches, cap_fetch_wait
from streams.metrics import Metrics
from streams.processor import BatchPlan, InterestProcessor
from streams.settings import Settings, get_settings

log = logging.getLogger("streams.app")

settings: Settings = get_settings()


def broker_credentials(s: Settings) -> faust.types.auth.CredentialsT | None:
    """Faust credentials for SASL and/or SSL from the settings (None for PLAINTEXT)."""
    import ssl

    context = None
    if s.kafka_security_protocol in ("SSL", "SASL_SSL"):
        context = ssl.create_default_context(cafile=str(s.kafka_ssl_cafile) if s.kafka_ssl_cafile else None)
        if s.kafka_ssl_certfile:
            context.load_cert_chain(
                str(s.kafka_ssl_certfile), str(s.kafka_ssl_keyfile) if s.kafka_ssl_keyfile else None
            )
    if s.kafka_security_protocol.startswith("SASL"):
        password = s.kafka_sasl_password.get_secret_value() if s.kafka_sasl_password else ""
        if s.kafka_sasl_mechanism == "PLAIN":
            return faust.SASLCredentials(username=s.kafka_sasl_username, password=password, ssl_context=context)
        return faust.SASLCredentials(
            username=s.kafka_sasl_username,
            password=password,
            ssl_context=context,
            mechanism=s.kafka_sasl_mechanism,
        )
    if context is not None:
        return faust.SSLCredentials(context)
    return None


cap_fetch_wait(settings.fetch_max_wait_ms)

app = faust.App(
    settings.app_id,
    broker=[f"kafka://{b.strip()}" for b in settings.kafka_bootstrap.split(",")],
    broker_credentials=broker_credentials(settings),
    store="memory://",
    topic_partitions=settings.partitions,
    topic_disable_leader=True,
    # > 0 keeps Faust's own assignor (without tables Faust would fall back to round-robin): it co-partitions the
    # input and re-key topics, so one worker owns a user's partition in both.
    table_standby_replicas=1,
    consumer_auto_offset_reset="earliest",
    broker_session_timeout=settings.session_timeout_s,
    broker_heartbeat_interval=min(3.0, settings.session_timeout_s / 3),
    broker_commit_interval=settings.commit_interval_s,
    broker_max_poll_records=max(500, settings.max_batch),
    stream_buffer_maxsize=max(4096, 2 * settings.max_batch),
    # output records wait for delivery at the end of each batch: a short linger keeps that wait short
    producer_linger_ms=1,
    producer_max_batch_size=256 * 1024,
    web_enabled=settings.web_port > 0,
    web_port=settings.web_port or 6066,
    web_bind="0.0.0.0",
    key_serializer="raw",
    value_serializer="raw",
)

# Input: the clicks topic and the re-key topic, consumed by the same agent, hence co-partitioned by Faust's assignor.
clicks_topic = app.topic(settings.input_topic, settings.rekey_topic, key_serializer="raw", value_serializer="raw")

processor: InterestProcessor | None = None
metrics: Metrics = Metrics()


def bind(ready: InterestProcessor, worker_metrics: Metrics) -> None:
    """Hand the app its processor (model session + state store) before it starts."""
    global processor, metrics
    processor, metrics = ready, worker_metrics


async def publish(plan: BatchPlan) -> None:
    """Send the batch's output records, dead letters and re-keys, all in flight at once; wait for delivery."""
    assert processor is not None
    # straight into aiokafka's record batches under Faust's producer: send() would cost ~25 us a record
    batches = RecordBatches(app.producer._ensure_producer())
    add, partition_for = batches.add, processor.partition_for  # the default partitioner's choice, memoised
    out_topic, dlq_topic, rekey_topic = settings.output_topic, settings.dlq_topic, settings.rekey_topic
    for key, value in plan.outputs:
        add(out_topic, partition_for(out_topic, key), key, value)
    for msg, reason, detail in plan.dead:
        headers = [
            ("dlq.reason", reason.encode()),
            ("dlq.detail", detail.encode("utf-8", "replace")),
            ("dlq.source", f"{msg.topic}:{msg.partition}:{msg.offset}".encode()),
        ]
        # a message without a key is spread by its source offset
        add(dlq_topic, partition_for(dlq_topic, msg.key or b"%d" % msg.offset), msg.key, msg.value or b"", headers)
        metrics.dead_letters.labels(reason).inc()
    for key, msg in plan.rekey:
        add(rekey_topic, partition_for(rekey_topic, key), key, msg.value)
    await batches.flush()
    metrics.rekeyed.inc(len(plan.rekey))


async def write_batch(plan: BatchPlan, events: list) -> None:
    """The second half of a batch: publish, write Redis, count. Returns only when all of it is done."""
    assert processor is not None
    await publish(plan)
    await processor.write(plan)
    done = time.time()
    metrics.applied.inc(plan.applied)
    metrics.duplicates.inc(plan.duplicates)
    metrics.users_cached.set(len(processor.store.cache))
    # latency histograms: up to ~64 evenly spaced events per batch (an observation per event costs ~1 us each)
    lat_p, lat_e = metrics.latency_produce.observe, metrics.latency_event.observe
    every = max(1, len(plan.produce_ts) // 64)
    for t in plan.produce_ts[::every]:
        lat_p(done - t)
    for t in plan.event_ts[::every]:
        lat_e(max(0.0, done - t))
    if plan.dead or plan.duplicates or plan.rekey:
        log.info(
            "batch: %d in, %d applied, %d duplicates, %d dead-lettered, %d re-keyed",
            len(events),
            plan.applied,
            plan.duplicates,
            len(plan.dead),
            len(plan.rekey),
        )


def abandon(reason: str) -> None:
    """Exit at once without committing: the uncommitted batch is redelivered to whoever owns it next."""
    log.critical("abandoning the worker: %s (uncommitted events will be redelivered)", reason)
    logging.shutdown()
    os._exit(70)


class BatchPipeline:
    """Faust's events -> batches -> two stages, one batch in each: step (prepare), then write (publish, Redis, ack).

    Batches form naturally: the step stage takes every event that arrived while it was busy (up to ``max_batch``), so
    batches grow under a backlog; only when it is idle does it wait, up to ``linger``, for a fuller batch. While batch n
    is published and written, batch n+1 is stepped (building on n's states, see ``InterestProcessor.inflight``) and
    Faust keeps collecting. Each stage takes its batches in order, and events are acked only once their batch is in
    Redis, so committed offsets never pass an event that was not applied. A failure in either stage abandons the
    worker (nothing of its batch is acked).
    """

    def __init__(self, stream: faust.StreamT, max_batch: int, linger: float) -> None:
        self.stream = stream
        self.max_batch = max_batch
        self.linger = linger
        self.pending: list[faust.EventT] = []  # collected, not yet stepped
        self.first_at = 0.0  # loop time the oldest pending event arrived
        self.arrived = asyncio.Event()  # pending is not empty
        self.full = asyncio.Event()  # pending holds max_batch events
        self.room = asyncio.Event()  # pending is below max_batch
        self.room.set()
        self.to_write: asyncio.Queue[tuple[list, BatchPlan]] = asyncio.Queue(maxsize=1)
        self.busy = 0  # batches taken and not yet written
        self.idle = asyncio.Event()
        self.idle.set()
        self.tasks = [asyncio.ensure_future(self._step()), asyncio.ensure_future(self._write())]

    async def add(self, event: faust.EventT) -> None:
        """Collect one event; waits while max_batch events are already waiting for the step stage."""
        pending = self.pending
        pending.append(event)
        if len(pending) == 1:
            self.first_at = asyncio.get_running_loop().time()
            self.arrived.set()
            self.idle.clear()
        if len(pending) >= self.max_batch:
            self.full.set()
            self.room.clear()
            await self.room.wait()

    def _take(self) -> list:
        events = self.pending[: self.max_batch]
        del self.pending[: self.max_batch]
        if not self.pending:
            self.arrived.clear()
        if len(self.pending) < self.max_batch:
            self.full.clear()
            self.room.set()
        self.busy += 1
        return events

    async def _step(self) -> None:
        assert processor is not None, "streams.app.bind() was not called"
        loop = asyncio.get_running_loop()
        while True:
            await self.arrived.wait()
            wait = self.first_at + self.linger - loop.time()
            if wait > 0 and not self.full.is_set():  # a fuller batch is worth a short wait
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self.full.wait(), wait)
            events = self._take()
            try:
                messages = [e.message for e in events]
                metrics.events_in.inc(len(messages))
                metrics.batch_size.observe(len(messages))
                plan = await processor.prepare(messages)
            except Exception as exc:  # a bug: never ack what was not applied
                log.exception("batch failed")
                abandon(f"batch failed: {exc!r}")
            await self.to_write.put((events, plan))

    async def _write(self) -> None:
        ack = self.stream.ack
        while True:
            events, plan = await self.to_write.get()
            try:
                await write_batch(plan, events)
                for event in events:
                    await ack(event)
            except Exception as exc:  # an unrecoverable broker or Redis error: never ack what was not applied
                log.exception("batch failed")
                abandon(f"batch failed: {exc!r}")
            self.busy -= 1
            if not self.busy and not self.pending:
                self.idle.set()

    async def drain(self, timeout: float) -> None:
        """Finish every collected event (graceful stop); abandon the worker if that takes longer than ``timeout``."""
        try:
            await asyncio.wait_for(self.idle.wait(), timeout)
        except BaseException as exc:
            abandon(f"could not finish the collected batches during shutdown: {exc!r}")
        for task in self.tasks:
            task.cancel()


@app.agent(clicks_topic)
async def update_interests(stream: faust.StreamT) -> None:
    """Step batches of click events into the users' states and publish their new distributions."""
    pipeline = BatchPipeline(stream, settings.max_batch, settings.max_latency_ms / 1000.0)
    try:
        # no automatic acks (Faust's would ack each event when the next arrives): the pipeline acks each event
        # once its batch is applied
        stream.enable_acks = False
        async for event in stream.events():
            await pipeline.add(event)
    except asyncio.CancelledError:
        # graceful stop: finish what was collected before the consumer commits, or abandon it unacked
        await asyncio.shield(pipeline.drain(settings.session_timeout_s))
        raise


@app.on_partitions_revoked.connect
async def drop_cached_states(sender: faust.App, revoked: set, **kwargs: object) -> None:
    """Partitions moved: forget cached states, the next batch reads them from Redis (never a stale cache)."""
    if processor is not None and revoked:
        processor.store.drop_cache()
        log.info("partitions revoked (%d): state cache dropped", len(revoked))
