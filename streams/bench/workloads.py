"""The bench's event streams: ML-100K looped with distinct ids, the users-scale stream, the paced producer."""

from __future__ import annotations

import asyncio
import itertools
import time
from collections.abc import Iterable, Iterator


def looped_events(ds, limit: int | None = None, loops: int = 1) -> Iterator[dict[str, object]]:
    """``wire_events(ds, limit, loops)``: replay's events, user ids ``<user>@<loop>`` distinct per loop."""
    from streams.tools.replay import wire_events

    return wire_events(ds, limit, loops)


def scale_events(ds, total: int, users: int) -> Iterator[dict[str, object]]:
    """The real ML-100K stream (looped, event ids distinct per loop) with each event's user id hashed into ``users``."""
    loops = -(-total // len(ds.events))
    from streams.tools.replay import synthetic_id

    for i, ev in enumerate(itertools.islice(looped_events(ds, loops=loops), total)):
        ev["user_id"] = synthetic_id(f"{ev['user_id']}#{i}", users)
        yield ev


# The load generator's producer linger: Kafka's own producer default since 4.0 (KIP-1030), as a click producer would
# batch. Each produce request is a batch the local broker's memory engine keeps, and its cost per fetch presumably
# grows with them (it grows through a run): at 5,400 events/s (2 interleaved pairs), 1 ms instead of 5 put the
# machine at 160-171 % instead of 152-154 %, and the worker's consume stage p99 at 34-41 ms instead of 24, produce ->
# Redis p99 56-68 ms instead of 46-47.
PRODUCER_LINGER_MS = 5


def paced_send(
    bootstrap: str, topic: str, events: Iterable[dict[str, object]], rate: float | None, sent_at: dict | None = None
) -> float:
    """Send ``events`` keyed by user id at ``rate`` per second (paced every 10; None: as fast as they go), noting each
    event's send time in ``sent_at``; flush; return the rate achieved.

    An aiokafka producer (acks 1, linger PRODUCER_LINGER_MS), not kafka-python's: at 3,000 events/s kafka-python
    costs the bench ~60 % of a core against aiokafka's ~30 %, CPU the worker under test shares on a small box. An
    event's produce time (its record's CreateTime) is taken when it is handed to the producer, so the linger counts
    in every latency the bench measures.
    """
    import orjson
    from aiokafka import AIOKafkaProducer

    async def go() -> float:
        producer = AIOKafkaProducer(bootstrap_servers=bootstrap, linger_ms=PRODUCER_LINGER_MS, acks=1)
        await producer.start()
        try:
            t0 = time.perf_counter()
            n = 0
            for n, ev in enumerate(events, 1):
                if n % 10 == 1:  # pace (or, unpaced, let the sender run)
                    await asyncio.sleep(max(0.0, t0 + (n - 1) / rate - time.perf_counter()) if rate else 0)
                if sent_at is not None:
                    sent_at[str(ev["event_id"])] = time.time()
                await producer.send(topic, key=str(ev["user_id"]).encode(), value=orjson.dumps(ev))
            await producer.flush()
            return n / (time.perf_counter() - t0)
        finally:
            await producer.stop()

    return asyncio.run(go())
