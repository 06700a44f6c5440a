"""The bench's hidden subcommands, each in its own process like the worker: the Faust no-op agent, the Quix Streams
no-op application (the peer framework), and the transport floor's consumer
(``python -m streams.bench noop-worker|quix-noop|floor-consumer``)."""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from pathlib import Path

from streams.bench.common import MAX_BATCH, SESSION_TIMEOUT_S, write_result
from streams.bench.histograms import quantiles_ms


def _parser(command: str, group: bool = True) -> argparse.ArgumentParser:
    """The options every hidden subcommand takes: where to read, how many events, where to write the result."""
    ap = argparse.ArgumentParser(prog=f"python -m streams.bench {command}")
    ap.add_argument("--bootstrap", required=True)
    ap.add_argument("--topic", required=True)
    if group:
        ap.add_argument("--group", required=True)
    ap.add_argument("--expect", type=int, required=True)
    ap.add_argument("--result", type=Path, required=True)
    return ap


def noop_worker(argv: list[str]) -> int:
    ap = _parser("noop-worker")
    ap.add_argument("--max-batch", type=int, default=MAX_BATCH)
    ap.add_argument("--skip", type=int, default=0, help="with --latency: events not timed (the warm-up)")
    ap.add_argument("--latency", action="store_true", help="iterate stream.events() and time produce -> agent")
    a = ap.parse_args(argv)

    import faust

    from streams.runtime.app import faust_options
    from streams.settings import Settings

    defaults = Settings(
        kafka_bootstrap=a.bootstrap,
        app_id=a.group,
        max_batch=a.max_batch,
        session_timeout_s=float(SESSION_TIMEOUT_S),
        web_port=0,
        data_dir=a.result.parent,
    )
    sys.setswitchinterval(defaults.gil_switch_ms / 1000)  # as the worker
    # the worker's Faust configuration, on Faust's own consumer (its 1,500 ms fetch wait too): Faust as shipped
    app = faust.App(a.group, **faust_options(defaults))
    topic = app.topic(a.topic, key_serializer="raw", value_serializer="raw")
    state = {"n": 0, "batches": 0, "first": None, "first_batch": 0, "done": False}

    async def timed(stream):
        lat: list[float] = []
        seen = 0
        async for event in stream.events():
            seen += 1
            if seen > a.skip:
                lat.append(time.time() - event.message.timestamp)  # Faust's timestamp is in seconds
            if seen == a.skip:
                a.result.with_suffix(".ready").touch()
            if seen == a.expect:
                write_result(a.result, {"events": len(lat), "latency_ms": quantiles_ms(lat)})

    async def sink(stream):
        async for events in stream.take_events(a.max_batch, within=defaults.max_latency_ms / 1000):
            now = time.time()
            k = len(events)
            if state["first"] is None:
                state["first"], state["first_batch"] = now, k
            state["n"] += k
            state["batches"] += 1
            if state["n"] >= a.expect and not state["done"]:
                state["done"] = True
                out = {
                    "events": state["n"],
                    "batches": state["batches"],
                    "first": state["first"],
                    "first_batch": state["first_batch"],
                    "last": now,
                }
                write_result(a.result, out)

    app.agent(topic, name="sink")(timed if a.latency else sink)

    worker = faust.Worker(app, loglevel="warning", quiet=True, redirect_stdouts=False, override_logging=False)
    try:
        worker.execute_from_commandline()
    except SystemExit as exc:
        return int(exc.code or 0)
    return 0


def floor_consumer(argv: list[str]) -> int:
    ap = _parser("floor-consumer", group=False)
    ap.add_argument("--skip", type=int, default=0, help="events not timed (the warm-up)")
    a = ap.parse_args(argv)

    from aiokafka import AIOKafkaConsumer

    from streams.settings import Settings

    async def go() -> dict:
        c = AIOKafkaConsumer(
            a.topic,
            bootstrap_servers=a.bootstrap,
            auto_offset_reset="earliest",
            enable_auto_commit=False,
            # as the worker's consumer
            fetch_max_wait_ms=Settings.model_fields["fetch_max_wait_ms"].default,
            fetch_min_bytes=Settings.model_fields["fetch_min_bytes"].default,
            max_poll_records=MAX_BATCH,
        )
        await c.start()
        lat: list[float] = []
        seen = 0
        try:
            while seen < a.expect:
                for records in (await c.getmany(timeout_ms=1000)).values():
                    now = time.time()
                    lat.extend(now - rec.timestamp / 1e3 for rec in records[max(0, a.skip - seen) :])
                    seen += len(records)
                    if seen >= a.skip and not a.result.with_suffix(".ready").exists():
                        a.result.with_suffix(".ready").touch()
        finally:
            await c.stop()
        return {"events": len(lat), "latency_ms": quantiles_ms(lat)}

    write_result(a.result, asyncio.run(go()))
    return 0


def quix_noop(argv: list[str]) -> int:
    """A Quix Streams application (librdkafka underneath) that reads the topic and does nothing with each record: the
    peer framework's ceiling, beside Faust's, on the same broker and topic."""
    ap = _parser("quix-noop")
    a = ap.parse_args(argv)

    from quixstreams import Application

    app = Application(
        broker_address=a.bootstrap,
        consumer_group=a.group,
        auto_offset_reset="earliest",
        auto_create_topics=False,
        loglevel="WARNING",
        state_dir=str(a.result.parent / "quix-state"),
    )
    topic = app.topic(a.topic, key_deserializer="bytes", value_deserializer="bytes")
    state = {"n": 0, "first": 0.0}

    def count(value: object) -> None:
        n = state["n"] = state["n"] + 1
        if n == 1:
            state["first"] = time.time()
        if n == a.expect:
            write_result(a.result, {"events": n, "first": state["first"], "last": time.time()})
            app.stop()

    app.dataframe(topic).update(count)
    app.run()
    return 0
