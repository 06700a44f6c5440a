"""The bench's event streams: ML-100K looped with distinct ids, the users-scale stream, the paced producer."""

from __future__ import annotations

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
# batch; it counts in every latency the bench measures (see paced_send).
PRODUCER_LINGER_MS = 5


def paced_send(
    bootstrap: str,
    topic: str,
    events: Iterable[dict[str, object]],
    rate: float | None,
    sent_at: dict | None = None,
    acked: list[float] | None = None,
) -> float:
    """Send ``events`` keyed by user id at ``rate`` per second (paced every 10; None: as fast as they go), noting each
    event's send time in ``sent_at`` and the seconds until the broker acknowledged it in ``acked``; flush; return the
    rate achieved. Raises ServiceError if any is not delivered.

    A librdkafka producer (confluent-kafka; acks 1, linger PRODUCER_LINGER_MS), as many of our users' producers are,
    with Java's partitioner (librdkafka's own would put most events on a partition the worker re-keys them from). The
    load generator shares the small box with the worker under test, so its CPU counts: at 19,000 events/s it takes
    ~25 % of a core where aiokafka's ``send()`` took 38-49 % (docs/experiments.md, seventh pass). One request in flight
    and no Nagle delay, so that its own requests wait as little as they can on the loaded broker. An event's produce
    time (its record's CreateTime, set by ``produce()``) is taken when it is handed to the producer, so the linger and
    its delivery count in every latency the bench measures; ``acked`` shows how much of it is the generator's.
    """
    import orjson
    from confluent_kafka import KafkaException, Producer

    from models.errors import ServiceError

    failed: list[str] = []
    now = time.time

    def delivered(err, msg) -> None:
        if err is not None:
            failed.append(str(err))
        elif acked is not None:  # its CreateTime, set by produce(), in ms
            acked.append(now() - msg.timestamp()[1] / 1e3)

    producer = Producer(
        {
            "bootstrap.servers": bootstrap,
            "linger.ms": PRODUCER_LINGER_MS,
            "acks": 1,
            "partitioner": "murmur2_random",  # Java's: the worker re-keys events on any other partition
            "max.in.flight.requests.per.connection": 1,
            "socket.nagle.disable": True,
            "on_delivery": delivered,
        }
    )
    produce, poll = producer.produce, producer.poll
    t0 = time.perf_counter()
    n = 0
    for n, ev in enumerate(events, 1):
        if n % 10 == 1:  # pace, and serve the delivery reports
            if rate:
                wait = t0 + (n - 1) / rate - time.perf_counter()
                if wait > 0:
                    time.sleep(wait)
            poll(0)
        if sent_at is not None:
            sent_at[str(ev["event_id"])] = now()
        key, value = str(ev["user_id"]).encode(), orjson.dumps(ev)
        while True:
            try:
                produce(topic, value, key)
                break
            except BufferError:  # librdkafka's queue is full (an unpaced send): let it drain
                poll(0.05)
            except KafkaException as exc:
                raise ServiceError(f"the load generator could not produce to {topic}: {exc}") from exc
    left = producer.flush(60)
    elapsed = time.perf_counter() - t0
    if left or failed:
        raise ServiceError(f"the load generator lost {left + len(failed)} events to {topic}: {failed[:3]}")
    return n / max(elapsed, 1e-9)
