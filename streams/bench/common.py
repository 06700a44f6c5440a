"""What every bench job shares: the plan of a run (event counts, targets), logging, waiting and stopping."""

from __future__ import annotations

import contextlib
import json
import signal
import subprocess
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from streams.local.services import wait_until
from streams.settings import Settings

REPO = Path(__file__).resolve().parents[2]
MAX_BATCH: int = Settings.model_fields["max_batch"].default  # the worker's default batch
SESSION_TIMEOUT_S = "6"  # Kafka's lowest (group.min.session.timeout.ms)

TARGETS = {
    "product_vs_noop": 3.0,  # the worker on the batch path vs a no-op Faust agent on Faust's per-event path
    "product_vs_quix": 0.5,  # vs a no-op Quix Streams application (the peer framework)
    "product_vs_naive": 30.0,
    "latency_p99_ms": 50.0,
    "users_1m_vs_1k": 0.8,
    "backfill_vs_product": 10.0,
}


@dataclass(frozen=True)
class Plan:
    """Event counts and durations of one bench run."""

    quick: bool
    product_limit: int | None  # events of ML-100K per loop (None: all 100k)
    loops: int
    naive_events: int
    latency_seconds: float
    latency_warmup: int
    scale_events: int
    ort_seconds: float
    redis_writes: int

    @classmethod
    def make(cls, quick: bool) -> Plan:
        if quick:
            return cls(True, 10_000, 5, 1_500, 4.0, 200, 20_000, 0.5, 10_000)  # 50k events: a product run of 2-3 s
        return cls(False, None, 2, 15_000, 20.0, 1_000, 200_000, 2.0, 40_000)


def log(msg: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", flush=True)


async def start_store(store) -> None:
    """``StateStore.start`` without its retries: ping, load the scripts."""
    await store.client.ping()
    await store.load_scripts()


def wait_for(predicate, timeout: float, what: str, interval: float = 0.1):
    return wait_until(predicate, timeout, interval, f"bench: {what}")


def stop_all(procs: Iterable[subprocess.Popen], timeout: float = 15.0) -> None:
    """SIGTERM every process first, then wait for each (SIGKILL after ``timeout``)."""
    from streams.local.services import stop_pid

    procs = list(procs)
    for p in procs:
        if p.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                p.send_signal(signal.SIGTERM)
    for p in procs:
        stop_pid(p.pid, signal.SIGTERM, timeout)
        with contextlib.suppress(Exception):
            p.wait(timeout=5)


def write_result(path: Path, out: dict) -> None:
    """A hidden subcommand's result, written whole (the bench waits for the file to appear)."""
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(out))
    tmp.replace(path)
