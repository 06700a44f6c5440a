"""Produce a real data set into the input topic, in time order, with kafka-python's producer.

    interest-stream replay --dataset movielens-100k --data ../shared/data/ml-100k            # as fast as possible
    interest-stream replay --dataset taobao --data ../shared/data/taobao-userbehavior-sample --rate 2000
    interest-stream replay --dataset csv --data events.csv --items items.csv
    interest-stream replay --dataset movielens-100k --data ../shared/data/ml-100k --loops 3 --users 1000000
    interest-stream replay --dataset movielens-100k --data ../shared/data/ml-100k --compression zstd

Each event goes out keyed by its user id as ``{"user_id", "item_id", "ts", "action", "event_id"}`` with
``event_id = "<dataset>:<line>[:<loop>]"``. ``--loops N`` replays the log N times with user ids made distinct per loop
(``<user>@<loop>``), so state keeps growing; ``--users N`` maps every (user, loop) onto a space of N synthetic ids
(``s<n>``) for scale tests. ``interest-stream verify`` takes the same options and rebuilds exactly the same stream.
"""

from __future__ import annotations

import argparse
import hashlib
import time
from collections.abc import Iterator

from models.data import Dataset, add_dataset_arguments, load_dataset
from models.errors import ConfigError
from streams.core.events import encode_event

COMPRESSIONS = ("none", "gzip", "snappy", "lz4", "zstd")  # kafka-python's codecs ("none": uncompressed)


def add_source_arguments(parser: argparse.ArgumentParser) -> None:
    """The options that pick and reshape the event log (shared by replay and verify)."""
    add_dataset_arguments(parser)
    parser.add_argument("--limit", type=int, help="only the first N events of the log")
    parser.add_argument("--loops", type=int, default=1, help="replay the log N times, user ids distinct per loop")
    parser.add_argument("--users", type=int, help="map users onto N synthetic ids (scale tests)")


def synthetic_id(key: str, space: int) -> str:
    """A stable synthetic user id in ``s0 .. s<space-1>`` for ``key`` (replay: user and loop; the bench: user and
    event), the one place that spells them."""
    digest = hashlib.blake2b(key.encode(), digest_size=8).digest()
    return f"s{int.from_bytes(digest, 'little') % space}"


def wire_events(
    ds: Dataset, limit: int | None = None, loops: int = 1, users: int | None = None
) -> Iterator[dict[str, object]]:
    """The events exactly as produced to the input topic, in produce order."""
    if loops < 1:
        raise ConfigError("--loops must be >= 1")
    if users is not None and users < 1:
        raise ConfigError("--users must be >= 1")
    events = ds.events if limit is None else ds.events[:limit]
    name = ds.name
    for loop in range(loops):
        for e in events:
            if users:
                uid = synthetic_id(f"{e.user_id}~{loop}", users)
            else:
                uid = e.user_id if loops == 1 else f"{e.user_id}@{loop}"
            event: dict[str, object] = {"user_id": uid, "item_id": e.item_id, "ts": e.ts}
            if e.action:
                event["action"] = e.action
            event["event_id"] = f"{name}:{e.line}" if loops == 1 else f"{name}:{e.line}:{loop}"
            yield event


def produce(
    settings,
    events: Iterator[dict[str, object]],
    total: int,
    rate: float | None,
    progress: bool,
    compression: str = "none",
) -> int:
    """Send ``events`` keyed by user id; ``rate`` events/s or as fast as possible; record batches compressed with
    ``compression`` (one of :data:`COMPRESSIONS`). Returns the count sent."""
    from kafka import KafkaProducer
    from tqdm import tqdm

    from streams.kafka import client_config, ensure_topics

    if compression not in COMPRESSIONS:
        raise ConfigError(f"--compression must be one of {', '.join(COMPRESSIONS)}, not {compression!r}")
    ensure_topics(settings)
    codec = None if compression == "none" else compression
    # kafka-python's defaults otherwise: idempotent with acks=all, so a retry neither duplicates nor reorders events
    producer = KafkaProducer(
        **client_config(settings),
        linger_ms=5,
        batch_size=256 * 1024,
        compression_type=codec,
        reconnect_backoff_max_ms=1000,  # Java's default: back within a second of a broker's return (not 30 s)
    )
    topic = settings.input_topic
    sent = 0
    t0 = time.monotonic()
    bar = tqdm(total=total, unit="ev", disable=not progress, smoothing=0.1)
    try:
        for ev in events:
            producer.send(topic, key=str(ev["user_id"]).encode(), value=encode_event(ev))
            sent += 1
            if sent % 1000 == 0:
                bar.update(1000)
                if rate:
                    ahead = sent / rate - (time.monotonic() - t0)
                    if ahead > 0:
                        time.sleep(ahead)
        producer.flush()
    finally:
        producer.close()
        bar.update(sent % 1000)
        bar.close()
    return sent


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_source_arguments(parser)
    parser.add_argument("--rate", type=float, help="events per second (default: as fast as possible)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.add_argument(
        "--compression",
        choices=COMPRESSIONS,
        default="none",
        help="the producer's compression codec (default: none)",
    )


def run(args: argparse.Namespace) -> int:
    from streams.settings import load_settings

    settings = load_settings()
    ds = load_dataset(args.dataset, args.data, args.items)
    total = min(args.limit or len(ds.events), len(ds.events)) * args.loops
    t0 = time.monotonic()
    events = wire_events(ds, args.limit, args.loops, args.users)
    sent = produce(settings, events, total, args.rate, not args.no_progress, compression=args.compression)
    elapsed = time.monotonic() - t0
    print(f"produced {sent} events to {settings.input_topic} in {elapsed:.1f}s ({sent / max(elapsed, 1e-9):,.0f}/s)")
    return 0
