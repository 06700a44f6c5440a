"""Prometheus metrics of the worker, served on ``INTEREST_METRICS_PORT`` at ``/metrics``.

| metric                                   | type      | what                                                 |
|------------------------------------------|-----------|------------------------------------------------------|
| `interest_events_in_total`               | counter   | messages taken from the input and re-key topics      |
| `interest_events_applied_total`          | counter   | events stepped into a user's state                   |
| `interest_duplicates_skipped_total`      | counter   | redelivered or re-sent events not applied again      |
| `interest_dead_letters_total{reason}`    | counter   | events sent to the dead-letter topic, by reason      |
| `interest_rekeyed_total`                 | counter   | events forwarded to the re-key topic                 |
| `interest_stale_writes_total`            | counter   | writes refused because Redis held a newer state      |
| `interest_redis_retries_total`           | counter   | Redis operations retried while it was unreachable    |
| `interest_corrupt_states_total`          | counter   | damaged user states read from Redis (logged)         |
| `interest_undecodable_batches_total{reason}` | counter | input record batches skipped undecoded (logged)    |
| `interest_undecodable_events_total`      | counter   | offsets those skipped batches covered                |
| `interest_batch_size`                    | histogram | events per batch                                     |
| `interest_fetch_chunks_total`            | counter   | partition fetches handed whole to the batch pipeline |
| `interest_ort_step_seconds`              | histogram | one ONNX Runtime step call                           |
| `interest_redis_write_seconds`           | histogram | one batch's Redis pipeline                           |
| `interest_latency_from_produce_seconds`  | histogram | produce time (Kafka timestamp) -> Redis written (*) |
| `interest_latency_from_event_seconds`    | histogram | event time (`ts`) -> Redis written (*)              |
| `interest_batch_stage_seconds{stage}`    | histogram | where a batch's time goes (**)                       |
| `interest_users_cached`                  | gauge     | user states in the in-process cache                  |
| `interest_partitions_assigned`           | gauge     | input and re-key partitions this worker owns         |
| `interest_consumer_lag{topic,partition}` | gauge     | records in an owned partition not yet applied        |
| `interest_publishing`                    | gauge     | 1 while this version is promoted and publishes (***) |

(*) sampled: 16 to 31 evenly spaced events of each batch (all of a smaller one).
(**) one observation per batch and stage, timed in the agent's process: ``consume`` the batch's first event from
produce (Kafka timestamp) to the agent, ``collect`` from then until the step stage takes the batch (the linger, or
the previous batch's step), ``step`` until it is stepped and its records are with the producer (with the step
process: until that process has decoded it; it steps the batch while the worker takes the next), ``write`` until its
records are delivered and its states are in Redis. ``consume`` and ``collect`` are left out for a batch whose first
event arrived behind a full one (a backlog, where arrival times are not latency).
(***) only the promoted version's workers publish to the output topic; the others keep their states live and check
the pointer about once a second (:mod:`streams.core.versions`).
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

BATCH_STAGES = ("consume", "collect", "step", "write")  # the stage label of interest_batch_stage_seconds, in order

LATENCY_BUCKETS = (
    0.001, 0.0025, 0.005, 0.0075, 0.01, 0.015, 0.02, 0.025, 0.03, 0.04, 0.05, 0.06, 0.08, 0.1, 0.15, 0.2, 0.3, 0.5,
    0.75, 1, 2.5, 5, 10, 30, 60, 300, 3600,
)  # fmt: skip


class Metrics:
    """The worker's metrics, in their own registry (several workers can live in one test process)."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        r = self.registry = registry or CollectorRegistry()
        self.events_in = Counter("interest_events_in", "Messages taken from the input topics", registry=r)
        self.applied = Counter("interest_events_applied", "Events stepped into a user's state", registry=r)
        self.duplicates = Counter("interest_duplicates_skipped", "Duplicate events not applied again", registry=r)
        self.dead_letters = Counter(
            "interest_dead_letters", "Events sent to the dead-letter topic", ["reason"], registry=r
        )
        self.rekeyed = Counter("interest_rekeyed", "Events forwarded to the re-key topic", registry=r)
        self.stale_writes = Counter("interest_stale_writes", "Writes refused: Redis held newer state", registry=r)
        self.redis_retries = Counter("interest_redis_retries", "Redis operations retried", registry=r)
        self.corrupt_states = Counter("interest_corrupt_states", "Damaged user states read from Redis", registry=r)
        self.undecodable_batches = Counter(
            "interest_undecodable_batches",
            "Input record batches skipped because they could not be decoded",
            ["reason"],
            registry=r,
        )
        self.undecodable_events = Counter(
            "interest_undecodable_events", "Offsets covered by skipped undecodable batches", registry=r
        )
        self.fetch_chunks = Counter(
            "interest_fetch_chunks", "Partition fetches the consumer handed whole to the batch pipeline", registry=r
        )
        self.batch_size = Histogram(
            "interest_batch_size",
            "Events per batch",
            buckets=(1, 10, 50, 100, 250, 500, 1000, 2000, 5000),
            registry=r,
        )
        self.ort_step_seconds = Histogram(
            "interest_ort_step_seconds", "ONNX Runtime step call", buckets=LATENCY_BUCKETS, registry=r
        )
        self.redis_write_seconds = Histogram(
            "interest_redis_write_seconds", "Redis pipeline per batch", buckets=LATENCY_BUCKETS, registry=r
        )
        self.latency_produce = Histogram(
            "interest_latency_from_produce_seconds",
            "Produce time to Redis written",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.latency_event = Histogram(
            "interest_latency_from_event_seconds",
            "Event time to Redis written",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.batch_stage_seconds = Histogram(
            "interest_batch_stage_seconds",
            "Per batch: consume (produce -> agent), collect, step, write",
            ["stage"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.users_cached = Gauge("interest_users_cached", "User states in the in-process cache", registry=r)
        self.partitions_assigned = Gauge(
            "interest_partitions_assigned", "Input and re-key partitions this worker owns", registry=r
        )
        self.publishing = Gauge(
            "interest_publishing", "1 while this worker's model version is promoted and publishes", registry=r
        )
        self.consumer_lag = Gauge(
            "interest_consumer_lag",
            "Records in an owned partition not yet applied (high watermark - next offset to apply)",
            ["topic", "partition"],
            registry=r,
        )

    def observe_latencies(self, from_produce: list[float], from_event: list[float]) -> None:
        """Observe one batch's sampled latencies, in seconds (event-time ones below zero count as zero)."""
        for v in from_produce:
            self.latency_produce.observe(v)
        for v in from_event:
            self.latency_event.observe(max(0.0, v))

    def serve(self, port: int) -> None:
        """Serve ``/metrics`` on 0.0.0.0:port (no-op for port 0)."""
        if port:
            start_http_server(port, registry=self.registry)
