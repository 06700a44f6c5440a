"""Run the stream worker.

    interest-stream worker                    # settings from INTEREST_* (see README)
    interest-stream worker --log-level DEBUG

Before Faust starts, the worker loads and checks the model (a wrong or corrupt file, or a catalog that does not
match its vocabulary, stops it here with a one-line message), reaches Redis and Kafka and creates missing topics.
"""

from __future__ import annotations

import argparse
import logging
import logging.config
import signal
import sys
import time

import faust
import orjson

from models.errors import ModelError
from streams.core.processor import BatchStep, InterestProcessor
from streams.core.versions import Version
from streams.logs import logging_config
from streams.runtime.app import make_app
from streams.runtime.stepper import StepperProcess, quiet_gc
from streams.settings import Settings, load_settings


def check_redis(settings: Settings, timeout: float = 30.0) -> None:
    """Fail with a clear message (password masked) if Redis does not answer within ``timeout``."""
    import redis

    from streams.core.state import startup_failure, sync_client

    deadline = time.monotonic() + timeout
    while True:
        try:
            client = sync_client(settings)  # a cluster client connects here already
            try:
                client.ping()
                return
            finally:
                client.close()
        except (redis.RedisError, redis.exceptions.RedisClusterException) as exc:
            failure = startup_failure(settings, exc, deadline)
            if failure is not None:
                raise failure from None
            time.sleep(0.5)


def register_version(settings: Settings, version: Version, log: logging.Logger) -> None:
    """List this version in the registry; on a fresh deployment (nothing promoted yet) promote it."""
    import redis

    from models.errors import ServiceError
    from streams.core import versions
    from streams.core.state import sync_client
    from streams.settings import redact_url

    client = sync_client(settings)
    try:
        versions.register(client, settings, version, settings.model_path)
        if versions.promote_if_none(client, settings, version.version):
            log.info("model %s promoted: no version was (a fresh deployment)", version.version)
        else:
            log.info("model %s registered; readers see %s", version.version, versions.promoted(client, settings))
    except redis.RedisError as exc:  # e.g. an ACL without the pointer's and registry's commands: one line
        where = redact_url(settings.redis_url)
        raise ServiceError(f"cannot register model {version.version} in Redis at {where}: {exc}") from None
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
    log = logging.getLogger("streams.runtime.worker")
    # Faust's consumer runs in a thread of its own: under load it waits for the GIL up to a switch interval per hand-off
    sys.setswitchinterval(settings.gil_switch_ms / 1000)

    if not settings.model_path.exists():
        raise ModelError(
            f"model file {settings.model_path} not found (train and export one: see README, or set INTEREST_MODEL_PATH)"
        )
    from streams.core import versions

    # each model version has its own consumer group and re-key topic, so versions can run side by side
    version = versions.Version.of(settings, versions.model_version(settings.model_path))
    settings = version.settings(settings)
    log.info("settings: %s", orjson.dumps(settings.redacted()).decode())
    check_redis(settings)
    register_version(settings, version, log)

    from streams.core.metrics import Metrics
    from streams.kafka import ensure_topics
    from streams.runtime.guard import skip_undecodable_batches

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

    processor: BatchStep
    stepper: StepperProcess | None = None
    if settings.step_process:
        processor = stepper = StepperProcess(settings, partitions, metrics)  # the child loads the model and Redis
    else:
        processor = InterestProcessor.from_settings(settings, partitions, metrics)
    info = processor.info
    log.info(
        "model %s: %d categories, %d items in catalog, provider %s, batches stepped with %s %s",
        info["version"],
        info["categories"],
        info["items"],
        info["provider"],
        info["sequence"],
        f"in process {stepper.proc.pid}" if stepper is not None else "in the worker's process",
    )
    app = make_app(settings, processor, metrics)
    metrics.serve(settings.metrics_port)
    settings.data_dir.mkdir(parents=True, exist_ok=True)  # Faust creates only the last level

    class Worker(faust.Worker):
        async def on_startup_finished(self) -> None:
            """Faust's 'app fully started' hook (faust.Worker takes the app's own ``on_startup_finished`` slot)."""
            await super().on_startup_finished()
            await processor.start()
            quiet_gc()
            log.info("worker ready: consuming %s and %s", settings.input_topic, settings.rekey_topic)

    worker = Worker(
        app,
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
        if stepper is not None:
            stepper.stop()
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(run(argparse.Namespace(log_level=None)))
