"""Write the retained input log as the generic CSV, so that a new model trains on what the stream saw.

    interest-stream dump --out artifacts/dump                 # events.csv + items.csv
    interest-stream train --dataset csv --data artifacts/dump/events.csv --items artifacts/dump/items.csv --out NEW

Reads the input topic from its start to its end offsets (as of the start of the dump) and keeps the events the
service applies: those the model's validation accepts (``--model``, default ``INTEREST_MODEL_PATH``), without
producer re-sends (the worker's fingerprint rule, per user). ``events.csv`` has ``user_id,item_id,ts,action`` in log
order; ``items.csv`` is the model's catalog. An event that names categories instead of an item has no row in the
generic format: it is counted and reported, not written.
"""

from __future__ import annotations

import argparse
import asyncio
import csv
import shutil
from collections import Counter
from pathlib import Path

import orjson

from models.errors import ServiceError
from streams.core.events import Rejected
from streams.core.processor import decoder_for
from streams.core.state import fingerprint_in
from streams.settings import Settings


async def dump(settings: Settings, session, out: Path) -> Counter:
    """events.csv and items.csv in ``out``; returns counts (written, rejected by reason, category-only)."""
    from aiokafka import AIOKafkaConsumer, TopicPartition

    from streams.kafka import KafkaConnection
    from streams.tools.backfill import _read
    from streams.tools.groups import partitions_of

    catalog_path = settings.catalog_path or session.path.with_name("catalog.csv")
    catalog = session.load_catalog(settings.catalog_path)
    decoder = decoder_for(session, settings, catalog)
    window = 8 * settings.dedup_window
    recent: dict[str, bytes] = {}
    counts: Counter = Counter()
    out.mkdir(parents=True, exist_ok=True)
    consumer = AIOKafkaConsumer(**KafkaConnection.from_settings(settings).aiokafka(), enable_auto_commit=False)
    await consumer.start()
    try:
        numbers = partitions_of(settings, [settings.input_topic])
        if not numbers:
            raise ServiceError(f"topic {settings.input_topic} not found in Kafka")
        tps = [TopicPartition(t, p) for t, p in numbers]
        consumer.assign(tps)
        await consumer.seek_to_beginning(*tps)
        ends = await consumer.end_offsets(tps)
        with (out / "events.csv").open("w", newline="", encoding="utf-8") as f:
            writer = csv.writer(f)
            writer.writerow(["user_id", "item_id", "ts", "action"])

            def on_batch(msgs) -> None:
                for msg in msgs:
                    on_message(msg)

            def on_message(msg) -> None:
                try:
                    click = decoder.decode(msg.value)
                except Rejected as rej:
                    counts[f"rejected_{rej.reason}"] += 1
                    return
                mine = recent.get(click.user_id, b"")
                if fingerprint_in(mine, click.fingerprint):
                    counts["resent"] += 1
                    return
                recent[click.user_id] = (mine + click.fingerprint)[-window:]
                event = orjson.loads(msg.value)
                if event.get("item_id") is None:
                    counts["category_only"] += 1
                    return
                writer.writerow([click.user_id, str(event["item_id"]), repr(click.ts), event.get("action") or ""])
                counts["written"] += 1

            await _read(consumer, {(tp.topic, tp.partition): e for tp, e in ends.items()}, on_batch)
    finally:
        await consumer.stop()
    shutil.copyfile(catalog_path, out / "items.csv")
    return counts


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", type=Path, required=True, help="folder for events.csv and items.csv")
    parser.add_argument(
        "--model", type=Path, help="the model whose validation and catalog apply (default: the setting)"
    )


def run(args: argparse.Namespace) -> int:
    from export.runtime import StepSession
    from streams.settings import load_settings

    settings = load_settings(**({"model_path": args.model} if args.model else {}))
    session = StepSession(settings.model_path, device="cpu")
    counts = asyncio.run(dump(settings, session, args.out))
    other = ", ".join(f"{k} {v}" for k, v in sorted(counts.items()) if k != "written") or "nothing else"
    print(f"dumped {counts['written']} events of {settings.input_topic} to {args.out}/events.csv ({other}); items.csv")
    return 0
