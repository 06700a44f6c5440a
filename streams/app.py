"""The Faust app: app, topics, the agent that updates interests, the rebalance hook. Reads top to bottom.

Started by ``interest-stream worker`` (:mod:`streams.worker`), which loads the model, connects Redis and creates
the topics before it hands the ready ``InterestProcessor`` to :func:`bind` and runs the app.

Per batch (``stream.take_events(max_batch, within=max_latency)``):
    prepare (decode, dedup, step)  ->  publish output records, dead letters, re-keys (all sends in flight at once,
    then awaited)  ->  write Redis (one pipeline)  ->  Faust acks the batch; offsets are committed after that.
A crash anywhere before the ack leaves the batch uncommitted: it is redelivered and the duplicates are skipped.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time

import faust

from streams.kafka import cap_fetch_wait
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
    producer = app.producer
    send = producer.send
    partition_for = processor.partition_for  # the default partitioner's choice, memoised per user
    out_topic = settings.output_topic
    pending = []
    for key, value in plan.outputs:
        pending.append(await send(out_topic, key, value, partition_for(out_topic, key), None, None))
    for msg, reason, detail in plan.dead:
        headers = [
            ("dlq.reason", reason.encode()),
            ("dlq.detail", detail.encode("utf-8", "replace")),
            ("dlq.source", f"{msg.topic}:{msg.partition}:{msg.offset}".encode()),
        ]
        pending.append(await send(settings.dlq_topic, msg.key, msg.value or b"", None, None, headers))
        metrics.dead_letters.labels(reason).inc()
    for key, msg in plan.rekey:
        pending.append(
            await send(settings.rekey_topic, key, msg.value, partition_for(settings.rekey_topic, key), None, None)
        )
    if pending:
        await asyncio.gather(*pending)
    metrics.rekeyed.inc(len(plan.rekey))


async def handle_batch(events: list) -> None:
    """One batch: prepare, publish, write Redis. Returns only when all of it is done."""
    assert processor is not None, "streams.app.bind() was not called"
    messages = [e.message for e in events]
    metrics.events_in.inc(len(messages))
    metrics.batch_size.observe(len(messages))
    plan = await processor.prepare(messages)
    await publish(plan)
    await processor.store.write(plan.writes, plan.states)
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
            len(messages),
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


@app.agent(clicks_topic)
async def update_interests(stream: faust.StreamT) -> None:
    """Step each batch of click events into the users' states and publish their new distributions."""
    within = settings.max_latency_ms / 1000.0
    async for events in stream.take_events(settings.max_batch, within=within):
        task = asyncio.ensure_future(handle_batch(list(events)))
        try:
            await asyncio.shield(task)
        except asyncio.CancelledError:
            # Graceful stop mid-batch: finish this batch before the stream acks it, or abandon it unacked.
            try:
                await asyncio.wait_for(task, timeout=settings.session_timeout_s)
            except BaseException as exc:
                abandon(f"could not finish the batch during shutdown: {exc!r}")
            raise
        except Exception as exc:  # a bug or an unrecoverable broker error: never ack what was not applied
            log.exception("batch failed")
            abandon(f"batch failed: {exc!r}")


@app.on_partitions_revoked.connect
async def drop_cached_states(sender: faust.App, revoked: set, **kwargs: object) -> None:
    """Partitions moved: forget cached states, the next batch reads them from Redis (never a stale cache)."""
    if processor is not None and revoked:
        processor.store.drop_cache()
        log.info("partitions revoked (%d): state cache dropped", len(revoked))
