"""The whole product on one machine: local broker and Redis, a model trained on ML-100K, a worker, a replay.

    interest-stream demo                 # (make demo) runs until the replay is applied, then stops everything
    interest-stream demo --keep-running  # leaves the worker and services up until Ctrl-C

Steps: start Apache Kafka and redis-server on 127.0.0.1 (reused if already up), train and export the model if
``artifacts/models/movielens-100k/model.onnx`` is missing, start ``interest-stream worker``, replay MovieLens 100K
into the input topic, and print the event rate and live interest bars for a few users every two seconds.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import threading
import time
from collections import Counter
from pathlib import Path

from models.data import ML100K
from models.errors import ServiceError
from streams.local.services import (
    RUN_DIR,
    metric_total,
    pid_alive,
    read_pid_file,
    scrape_metrics,
    services_down,
    services_up,
    spawn_worker,
)


def scrape(port: int, name: str) -> float | None:
    """One metric's total from the worker's Prometheus endpoint (None while it is not up)."""
    try:
        return metric_total(scrape_metrics(port), name)
    except OSError:
        return None


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--data", type=Path, default=ML100K, help="MovieLens 100K folder")
    parser.add_argument("--rate", type=float, help="replay rate in events/s (default: as fast as possible)")
    parser.add_argument("--limit", type=int, help="replay only the first N events")
    parser.add_argument("--model", type=Path, help="use this exported model instead of training/reusing the default")
    parser.add_argument("--keep-running", action="store_true", help="keep worker and services up until Ctrl-C")


def run(args: argparse.Namespace) -> int:
    from export.onnx_export import build_default_model
    from models.data import load_dataset
    from streams.core.state import sync_client
    from streams.lookup import bar_chart, get_interests
    from streams.settings import load_settings
    from streams.tools.replay import produce, wire_events

    if not args.data.exists():
        raise ServiceError(f"MovieLens 100K not found at {args.data} (expected ../shared/data/ml-100k)")
    already_up = all(
        (known := read_pid_file(RUN_DIR / f"{n}.pid")) and pid_alive(known[0]) for n in ("broker", "redis")
    )
    print("== services")
    services_up()
    print("== model")
    model = args.model or build_default_model(data=args.data)
    print(f"model: {model}")
    settings = load_settings(model_path=model)
    env = {k: v for k, v in os.environ.items() if k.startswith("INTEREST_")}
    env["INTEREST_MODEL_PATH"] = str(model)
    env["INTEREST_METRICS_PORT"] = str(settings.metrics_port)
    RUN_DIR.mkdir(exist_ok=True)
    log_path = RUN_DIR / "worker.log"
    print(f"== worker (log: {log_path})")
    worker = spawn_worker(env, log_path)
    stop = threading.Event()
    try:
        ds = load_dataset("movielens-100k", args.data)
        total = min(args.limit or len(ds.events), len(ds.events))
        # the three most active users of what is replayed: their bars move most
        show = [u for u, _ in Counter(e.user_id for e in ds.events[:total]).most_common(3)]
        print(f"== replay: {total} events of {ds.name} into {settings.input_topic}")
        sent = [0]

        def replay() -> None:
            sent[0] = produce(settings, wire_events(ds, args.limit), total, args.rate, progress=False)

        producer = threading.Thread(target=replay, daemon=True)
        producer.start()
        client = sync_client(settings)
        last, last_t = 0.0, time.monotonic()
        while not stop.is_set():
            time.sleep(2)
            if not worker.alive():
                raise ServiceError(f"the worker exited with code {worker.proc.returncode}; see {log_path}")
            applied = scrape(worker.metrics_port, "interest_events_applied_total") or 0.0
            dead = scrape(worker.metrics_port, "interest_dead_letters_total") or 0.0
            now = time.monotonic()
            rate = (applied - last) / (now - last_t)
            last, last_t = applied, now
            print(f"\n-- {applied:,.0f}/{total:,} applied ({rate:,.0f} events/s), {dead:,.0f} dead-lettered")
            for u in show:
                interests = get_interests(u, settings, client)
                if interests:
                    print(bar_chart(interests, width=30))
            if not producer.is_alive() and applied + dead >= sent[0] and not args.keep_running:
                print(f"\n== done: {applied:,.0f} events applied")
                print("(--keep-running keeps worker and services up, for `interest-stream lookup USER`)")
                break
    except KeyboardInterrupt:
        print("\n== interrupted")
    finally:
        stop.set()
        print("== stopping worker")
        worker.stop(timeout=20)
        if not already_up:
            print("== stopping services")
            with contextlib.suppress(ServiceError):
                services_down()
    return 0
