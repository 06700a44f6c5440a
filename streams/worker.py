"""Run the stream worker.

    interest-stream worker                    # settings from INTEREST_* (see README)
    interest-stream worker --log-level DEBUG

Before Faust starts, the worker loads and checks the model (a wrong or corrupt file, or a catalog that does not
match its vocabulary, stops it here with a one-line message), reaches Redis and Kafka and creates missing topics.
"""

from __future__ import annotations

import argparse
import gc
import logging
import logging.config
import signal
import sys
import time

import orjson
from pydantic import ValidationError

from models.errors import ConfigError, ModelError, ServiceError
from streams.settings import Settings, get_settings


class JsonFormatter(logging.Formatter):
    """One JSON object per line: ts, level, logger, message (and exc when there is one)."""

    def format(self, record: logging.LogRecord) -> str:
        out = {
            "ts": round(record.created, 3),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return orjson.dumps(out).decode()


class RepeatFilter(logging.Filter):
    """Lets one record of each (logger, message template) through per ``interval`` seconds, and says how many it
    held back: while a broker is down, aiokafka logs every failed connect, fetch and metadata request, some ten lines
    a second."""

    def __init__(self, interval: float = 10.0) -> None:
        super().__init__()
        self.interval = interval
        self.last: dict[tuple[str, object], tuple[float, int]] = {}  # -> (when let through, held back since)

    def filter(self, record: logging.LogRecord) -> bool:
        key = (record.name, record.msg)
        seen = self.last.get(key)
        if seen is not None and record.created - seen[0] < self.interval:
            self.last[key] = (seen[0], seen[1] + 1)
            return False
        if seen is not None and seen[1]:
            record.msg = f"{record.msg} ({seen[1]} more like it in the last {record.created - seen[0]:.0f}s)"
        self.last[key] = (record.created, 0)
        return True


def logging_config(settings: Settings) -> dict:
    formatter = (
        {"()": JsonFormatter}
        if settings.log_format == "json"
        else {"format": "%(asctime)s %(levelname)s %(name)s: %(message)s"}
    )
    return {
        "version": 1,
        "disable_existing_loggers": False,
        "formatters": {"main": formatter},
        "filters": {"repeats": {"()": RepeatFilter}},
        "handlers": {
            "stderr": {"class": "logging.StreamHandler", "formatter": "main", "stream": "ext://sys.stderr"},
            "clients": {
                "class": "logging.StreamHandler",
                "formatter": "main",
                "stream": "ext://sys.stderr",
                "filters": ["repeats"],
            },
        },
        "root": {"level": settings.log_level, "handlers": ["stderr"]},
        "loggers": {
            name: {"level": "WARNING", "handlers": ["clients"], "propagate": False} for name in ("aiokafka", "kafka")
        },
    }


def load_settings(**overrides: object) -> Settings:
    try:
        return get_settings(**overrides)
    except ValidationError as exc:
        errs = "; ".join(
            f"INTEREST_{'_'.join(map(str, e['loc'])).upper()}: {e['msg']}" if e["loc"] else e["msg"]
            for e in exc.errors()
        )
        raise ConfigError(errs) from None


def check_redis(settings: Settings, timeout: float = 30.0) -> None:
    """Fail with a clear message (password masked) if Redis does not answer within ``timeout``."""
    import redis

    from streams.lookup import sync_client
    from streams.settings import redact_url

    client = sync_client(settings)
    deadline = time.monotonic() + timeout
    try:
        while True:
            try:
                client.ping()
                return
            except redis.RedisError as exc:
                # a wrong password or a missing permission will not fix itself: say so now, not after the timeout
                denied = isinstance(exc, redis.AuthenticationError | redis.exceptions.NoPermissionError)
                if denied or time.monotonic() > deadline:
                    raise ServiceError(
                        f"cannot reach Redis at {redact_url(settings.redis_url)}: {type(exc).__name__}: {exc}"
                    ) from None
                time.sleep(0.5)
    finally:
        client.close()


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--log-level", choices=["DEBUG", "INFO", "WARNING", "ERROR"], help="override INTEREST_LOG_LEVEL"
    )


def _stop_during_startup(signum: int, frame: object) -> None:
    raise SystemExit(0)


def run(args: argparse.Namespace) -> int:
    # a SIGTERM before Faust installs its own handler (model loading, topic creation) is a clean exit: nothing has
    # been consumed yet
    signal.signal(signal.SIGTERM, _stop_during_startup)
    overrides = {"log_level": args.log_level} if args.log_level else {}
    settings = load_settings(**overrides)
    logging.config.dictConfig(logging_config(settings))
    log = logging.getLogger("streams.worker")
    log.info("settings: %s", orjson.dumps(settings.redacted()).decode())
    # Faust's consumer runs in a thread of its own: under load it waits for the GIL up to a switch interval per hand-off
    sys.setswitchinterval(settings.gil_switch_ms / 1000)

    if not settings.model_path.exists():
        raise ModelError(
            f"model file {settings.model_path} not found (train and export one: see README, or set INTEREST_MODEL_PATH)"
        )
    check_redis(settings)

    from streams.kafka import ensure_topics, skip_undecodable_batches
    from streams.metrics import Metrics

    partitions = ensure_topics(settings)
    metrics = Metrics()

    def skipped(topic: str, partition: int, first: int, last: int, error: Exception) -> None:
        log.error(
            "skipped a record batch that cannot be decoded: %s[%d] offsets %d-%d (%s: %s); the events stay in the "
            "topic at those offsets",
            topic,
            partition,
            first,
            last,
            type(error).__name__,
            error,
        )
        metrics.undecodable_batches.labels(type(error).__name__).inc()
        metrics.undecodable_events.inc(last - first + 1)

    skip_undecodable_batches(skipped)

    # import the app only now: it reads the same settings at import time
    from streams import app as faust_app

    if settings.step_process:
        from streams.stepper import StepperProcess

        processor = StepperProcess(settings, partitions, metrics)  # the child loads the model and reaches Redis
    else:
        from streams.processor import InterestProcessor

        processor = InterestProcessor.from_settings(settings, partitions, metrics)
    info = processor.info
    log.info(
        "model %s: %d categories, %d items in catalog, provider %s, batches stepped with %s %s",
        info["version"],
        info["categories"],
        info["items"],
        info["provider"],
        info["sequence"],
        f"in process {processor.proc.pid}" if settings.step_process else "in the worker's process",
    )
    faust_app.bind(processor, metrics)
    metrics.serve(settings.metrics_port)
    settings.data_dir.mkdir(parents=True, exist_ok=True)  # Faust creates only the last level

    import faust

    class Worker(faust.Worker):
        async def on_startup_finished(self) -> None:
            """Faust's 'app fully started' hook (faust.Worker takes the app's own ``on_startup_finished`` slot)."""
            await super().on_startup_finished()
            await processor.start()
            quiet_gc()
            log.info("worker ready: consuming %s and %s", settings.input_topic, settings.rekey_topic)

    worker = Worker(
        faust_app.app,
        loglevel=settings.log_level.lower(),
        logging_config=logging_config(settings),
        quiet=True,
        redirect_stdouts=False,
        override_logging=False,
    )
    try:
        worker.execute_from_commandline()
    except SystemExit as exc:
        return int(exc.code or 0)
    finally:
        if settings.step_process:
            processor.stop()
    return 0


def quiet_gc() -> None:
    """Keep what start-up built (modules, the model, Faust's app) out of the cyclic GC's full collections.

    A full collection walks every tracked object; with start-up's hundreds of thousands of them it paused the worker
    for 60-80 ms a few times a minute, the largest part of its p99 latency. Frozen objects are still freed by
    reference counting; only start-up's cyclic garbage, collected first, would escape the GC.
    """
    gc.collect()
    gc.freeze()


if __name__ == "__main__":  # pragma: no cover
    sys.exit(run(argparse.Namespace(log_level=None)))
