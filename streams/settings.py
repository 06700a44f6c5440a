"""Settings: one typed object read from environment variables prefixed ``INTEREST_``.

Every field is listed, with its default, in the README's "Settings" table; ``tests/streams/test_settings.py`` checks
that the two agree.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal
from urllib.parse import urlsplit, urlunsplit

from pydantic import Field, SecretStr, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from models.errors import ConfigError

LOCAL_KAFKA_PORT = 19092
LOCAL_REDIS_PORT = 16379
DEFAULT_MODEL_PATH = Path("artifacts/models/movielens-100k/model.onnx")


class Settings(BaseSettings):
    """Everything the worker, the producer tools and the lookup read; env prefix ``INTEREST_``."""

    model_config = SettingsConfigDict(env_prefix="INTEREST_", extra="ignore", frozen=True)

    # --- Kafka -------------------------------------------------------------------------------------------------
    kafka_bootstrap: str = f"127.0.0.1:{LOCAL_KAFKA_PORT}"
    """Comma-separated broker addresses (host:port)."""
    kafka_security_protocol: Literal["PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL"] = "PLAINTEXT"
    """Kafka security protocol."""
    kafka_sasl_mechanism: Literal["PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512"] = "PLAIN"
    """SASL mechanism when the protocol is SASL_*."""
    kafka_sasl_username: str | None = None
    """SASL user name."""
    kafka_sasl_password: SecretStr | None = None
    """SASL password (never logged)."""
    kafka_ssl_cafile: Path | None = None
    """CA bundle that signed the brokers' certificates (SSL, SASL_SSL)."""
    kafka_ssl_certfile: Path | None = None
    """Client certificate for mutual TLS."""
    kafka_ssl_keyfile: Path | None = None
    """Client private key for mutual TLS."""
    app_id: str = "interest-stream"
    """Base of the consumer group (Faust app id) ``<app_id>.<tag>`` of each model version."""
    input_topic: str = "clicks"
    """Topic the click events arrive on (JSON, keyed by user id)."""
    output_topic: str = "interests"
    """Topic the refreshed distributions go to (JSON, keyed by user id): one per applied event, or per user and batch
    (``output_mode``)."""
    output_mode: Literal["event", "user"] = "event"
    """``event``: one output record per applied event. ``user``: one per user and batch, its distribution after its last
    event of the batch; the user's intermediate ones are skipped, as Kafka Streams' record cache skips a key's
    intermediate updates. Redis gets the same in both."""
    output_compression: Literal["none", "gzip", "snappy", "lz4", "zstd"] = "none"
    """Codec of the worker's record batches (output, dead letters, re-keys), as Kafka's ``compression.type``."""
    dlq_topic: str = "clicks-dlq"
    """Dead-letter topic: original bytes of invalid events, reason in headers."""
    rekey_topic: str = "clicks-rekeyed"
    """Base of each model version's re-key topic ``<rekey_topic>.<tag>`` (events keyed by something other than their
    user id are re-keyed through it)."""
    partitions: int = Field(8, ge=1, le=1024)
    """Partitions of the topics the worker creates (input, re-key, output, DLQ)."""
    max_batch: int = Field(5000, ge=1, le=100_000)
    """Largest batch of events stepped together; also how many events may wait for the step stage. A batch's
    delivery and Redis write take a round trip or two whatever its size, one batch at a time, so under a backlog
    larger batches carry more events per round trip (one worker on the 2-core bench box: 5,000 gave 13-39 % more
    than 2,000 in two A/Bs of `python -m streams.bench ab product`; 10,000 no more than 5,000)."""
    max_latency_ms: float = Field(10.0, gt=0, le=60_000)
    """Longest the step stage, when idle, waits for a partial batch to fill (a busy one takes what has arrived)."""
    session_timeout_s: float = Field(10.0, gt=0)
    """Consumer group session timeout; a dead worker's partitions move after about this long."""
    commit_interval_s: float = Field(1.0, gt=0)
    """How often processed offsets are committed."""
    fetch_max_wait_ms: int = Field(100, ge=1, le=30_000)
    """Longest the broker holds the worker consumer's fetch request waiting for ``fetch_min_bytes`` (Kafka's
    ``fetch.max.wait.ms``; Faust's own is 1,500 ms). aiokafka keeps one fetch in flight per broker and leaves out
    partitions whose records are still buffered, so a fetch can ask only for empty partitions (the re-key topic's)
    while the input's next records wait behind it for this long; shorter, a backlogged worker sends that empty fetch
    more often (10 ms cost a median 23 % (2-34 %) of the throughput on the 1M-user stream)."""
    fetch_min_bytes: int = Field(1, ge=1, le=64 * 2**20)
    """Data the broker waits for, up to ``fetch_max_wait_ms``, before it answers the worker consumer's fetch (Kafka's
    ``fetch.min.bytes``). 1 answers at the first record: the lowest latency at low rates, and below the maximum rate a
    request for every few records. 1 MiB with a 10 ms wait makes the fetch a 10-ms cadence: about half the broker's
    CPU per event at middle rates and a lower p99 there, at the throughput cost above and ~8 % of a core per idle
    worker."""

    # --- Redis -------------------------------------------------------------------------------------------------
    redis_url: str = f"redis://127.0.0.1:{LOCAL_REDIS_PORT}/0"
    """Redis URL; ``rediss://`` for TLS. A password here is masked in every log line."""
    redis_username: str | None = None
    """Redis ACL user (overrides the URL's)."""
    redis_password: SecretStr | None = None
    """Redis password (overrides the URL's; never logged)."""
    redis_ssl_ca_certs: Path | None = None
    """CA bundle for ``rediss://``."""
    redis_prefix: str = "interest:"
    """Prefix of every key: ``<prefix><tag>:<user_id>``, ``<prefix>promoted``, ``<prefix>versions``."""
    redis_ttl_s: int = Field(0, ge=0)
    """Expire a user's key this many seconds after its last update; 0 keeps keys forever."""
    redis_retry_max_s: float = Field(30.0, gt=0)
    """Longest pause between retries while Redis is unreachable (the worker retries forever, backing off)."""
    redis_cluster: bool = False
    """The URL names one node of a Redis Cluster: keys are routed by hash slot (MOVED/ASK followed)."""
    redis_wait_replicas: int = Field(0, ge=0, le=16)
    """After a batch's writes, ``WAIT`` until this many replicas (of each master written) have them before the batch
    is acked; 0 acks once the master has them (a failover can then lose the last writes)."""
    redis_wait_timeout_ms: int = Field(1000, ge=1, le=4000)
    """How long one ``WAIT`` blocks (below the client's 5 s socket timeout); a shortfall is retried, never acked."""

    # --- Model -------------------------------------------------------------------------------------------------
    model_path: Path = DEFAULT_MODEL_PATH
    """The exported single-step ONNX model."""
    catalog_path: Path | None = None
    """Item catalog CSV (``item_id,categories``); default: ``catalog.csv`` beside the model."""
    device: Literal["auto", "cpu", "cuda"] = "auto"
    """ONNX Runtime device: ``auto`` uses CUDA when a GPU really is there."""
    ort_threads: int = Field(1, ge=0)
    """ONNX Runtime intra-op threads (0 = ORT's default)."""
    batch_path: bool = True
    """Faust's consumer hands whole fetches to the worker's batch pipeline (``streams.runtime.batches``); ``false``
    sends every event through Faust's per-event stream instead (the previous path, kept for one release)."""
    step_process: bool = True
    """Step batches (dedup, ONNX Runtime, output records, Redis) in a child process, beside Faust's interpreter."""
    gil_switch_ms: float = Field(1.0, gt=0, le=100)
    """Python's GIL switch interval in the worker and its step process (Python's default is 5 ms): how long Faust's
    consumer thread (or the ORT thread) can wait for the GIL while the event loop runs."""

    # --- Behaviour ---------------------------------------------------------------------------------------------
    top_n: int = Field(5, ge=1, le=100)
    """How many top categories are published beside the full distribution."""
    max_event_bytes: int = Field(4096, ge=64)
    """Events larger than this are dead-lettered unread."""
    max_user_id_len: int = Field(128, ge=1, le=1024)
    """Longest accepted user id (ids are also restricted to ``[A-Za-z0-9._@-]``)."""
    max_categories: int = Field(32, ge=1)
    """Most categories one event may carry."""
    max_future_s: float = Field(86_400.0, ge=0)
    """Events stamped further than this into the future are dead-lettered."""
    dedup_window: int = Field(256, ge=1, le=4096)
    """Per user, fingerprints of this many recent events are kept to drop producer re-sends (and re-keyed events
    forwarded again after a crash, which arrive at new offsets)."""
    cache_size: int = Field(200_000, ge=0)
    """Users whose state is cached in the worker process (dropped on partition revocation)."""

    # --- Operations --------------------------------------------------------------------------------------------
    metrics_port: int = Field(9108, ge=0, le=65535)
    """Prometheus metrics HTTP port (0 disables)."""
    web_port: int = Field(6066, ge=0, le=65535)
    """Faust's own web server port (stats); 0 disables."""
    data_dir: Path = Path(".run/faust")
    """Faust's data directory (``<app_id>-data`` inside it); it holds no state here, since state lives in Redis."""
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    """Log level."""
    log_format: Literal["json", "text"] = "text"
    """``json`` for one JSON object per log line."""

    @field_validator("redis_prefix")
    @classmethod
    def _prefix_is_safe(cls, v: str) -> str:
        if any(ch in v for ch in "*?[]{} \r\n\t") or len(v) > 64:
            raise ValueError("redis_prefix must be <= 64 chars without glob, brace or whitespace characters")
        return v

    @model_validator(mode="after")
    def _sasl_has_credentials(self) -> Settings:
        if self.kafka_security_protocol.startswith("SASL") and not (
            self.kafka_sasl_username and self.kafka_sasl_password
        ):
            raise ValueError(
                f"INTEREST_KAFKA_SECURITY_PROTOCOL={self.kafka_security_protocol} needs INTEREST_KAFKA_SASL_USERNAME "
                "and INTEREST_KAFKA_SASL_PASSWORD"
            )
        return self

    def redacted(self) -> dict[str, object]:
        """The settings as a dict safe to log: secrets masked, credentials stripped from URLs."""
        out: dict[str, object] = {}
        for name in type(self).model_fields:
            value = getattr(self, name)
            if isinstance(value, SecretStr):
                value = "***" if value.get_secret_value() else ""
            elif name == "redis_url":
                value = redact_url(str(value))
            elif isinstance(value, Path):
                value = str(value)
            out[name] = value
        return out


def redact_url(url: str) -> str:
    """``redis://user:secret@host`` -> ``redis://user:***@host``; a ``password=`` query value (which redis-py also
    accepts) is masked the same way."""
    parts = urlsplit(url)
    if parts.password is not None:
        netloc = parts.netloc.rsplit("@", 1)[1]
        user = parts.username or ""
        parts = parts._replace(netloc=f"{user}:***@{netloc}")
    if parts.query:
        query = [
            f"{k}=***" if k.lower() == "password" and sep else f"{k}{sep}{v}"
            for k, sep, v in (item.partition("=") for item in parts.query.split("&"))
        ]
        parts = parts._replace(query="&".join(query))
    return urlunsplit(parts)


def load_settings(**overrides: object) -> Settings:
    """The settings from the environment (keyword overrides win), or one ConfigError naming every bad variable."""
    try:
        return get_settings(**overrides)
    except ValidationError as exc:
        errs = "; ".join(
            f"INTEREST_{'_'.join(map(str, e['loc'])).upper()}: {e['msg']}" if e["loc"] else e["msg"]
            for e in exc.errors()
        )
        raise ConfigError(errs) from None


def get_settings(**overrides: object) -> Settings:
    """Read the settings from the environment; keyword overrides win (used by the CLI and tests)."""
    return Settings(**overrides)  # type: ignore[arg-type]  # pydantic validates the overrides, mypy cannot
