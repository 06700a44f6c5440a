"""``interest-stream bench --out DIR [--quick] [--model PATH] [--no-profile]``: the worker against its ceilings.

    interest-stream bench --out artifacts/bench                 # full run, ~6-8 min on 2 cores
    interest-stream bench --out artifacts/bench-quick --quick   # CI smoke, < 3 min (small event counts)

Everything runs in one go on one Apache Kafka broker (KRaft, one node) and one Redis, both started here on free ports
and stopped at the end,
with the model of ``--model`` (default: ``build_default_model()``; ``--quick``: a fast model in
``artifacts/models/bench-fast``). Figures (events/s unless said otherwise):

1. ceilings: (a) ``faust_noop_eps``: a Faust agent in its own process (``python -m streams.bench noop-worker``) that
   takes batches of 2000 with ``take_events`` from the pre-filled JSON topic and discards them (the issue's
   ceiling; the worker collects its batches itself, see ``streams.app.BatchPipeline``); (b) ``aiokafka_raw_eps``: a
   bare aiokafka consumer (``getmany``, no group) on the same topic; (c) ``ort_step_eps``: the worker's stepping alone
   (``BatchStepper``: grouped sequence-graph calls, 1 intra-op thread) on ML-100K batches of 2000 events, beside the
   round-by-round stepping it replaced (``round_by_round_eps``); (d) ``redis_pipeline_eps``: ``StateStore.write``
   (CAS script, one pipeline) of worker-shaped user records, 2000 per pipeline (writes/s: the worker writes at most
   one per user per batch).
2. the product: ``interest-stream worker`` processes over ML-100K replayed ``loops`` times with user ids distinct per
   loop, pre-filled, measured from the first to the last applied event by polling the workers'
   ``interest_events_applied_total``; one worker, then two (each run: fresh consumer group, output topics, Redis db
   and prefix; the read-only input topic is shared).
3. ``naive_eps``: the same decoder/encoder/session/state code, one event at a time: one ORT call, one Redis write and
   one awaited send per event (``async for`` over an aiokafka consumer, ``InterestProcessor.prepare([msg])``).
4. latency at an offered rate of half ``product_eps_1w`` (paced aiokafka producer, fresh topic, warm worker):
   ``latency_ms`` = produce -> Redis written, quantiles interpolated in the buckets of the worker's
   ``interest_latency_from_produce_seconds`` histogram (delta over the measured window; buckets 5-10 ms wide from
   10 to 60 ms, 20 ms to 100 ms, so a quantile is exact to its bucket); ``latency_output_ms`` = produce -> output
   record, exact per event: the output record's Kafka timestamp (set when the worker hands it to its producer) minus
   the time the bench sent the input;
   ``latency_transport_ms`` = the transport alone at the same rate: the same paced producer into a fresh topic, read
   by a bare aiokafka consumer in its own process (``python -m streams.bench floor-consumer``, the worker's fetch
   settings, no group), produce -> consumed. The worker cannot be faster than this floor. ``latency_faust_ms`` =
   Faust alone at the same rate: the no-op agent (``noop-worker --latency``) iterating ``stream.events()``,
   produce -> the agent has the event, where the worker's pipeline starts. ``latency_cpu_pct`` = CPU used during the
   latency run (``psutil``, % of one core): the machine, the worker with its step process (and each apart:
   ``worker_faust``, ``step_process``), the bench's producer, the broker and Redis.
   ``latency_stages_ms`` = where a batch's time went, per batch, from the worker's ``interest_batch_stage_seconds``
   (consume: its first event from produce to the agent; collect; step; write: delivered and in Redis).
   ``latency_output_ms_halves`` = produce -> output record in the run's first and second half (by send time), to
   show a tail that grows over the run.
5. scale in users: the same real event stream with every event given a synthetic id hashed into a space of 1,000 vs
   1,000,000 ids (with 200k events the 1M space touches ~180k distinct users, almost all cold and uncached: each
   costs a Redis read, a cold start and a new key); worker RSS (psutil, worker + step process, max during the run)
   and Redis bytes per user (``INFO memory`` used_memory delta / ``DBSIZE`` of the run's db).

With profiling on (default in the full run), an extra one-worker product run is sampled with ``py-spy record``
(the worker and its step process, raw, ``DIR/profile-1w.txt``) and the top functions land in ``bench.json["profile"]``.
Outputs: ``DIR/bench.json``, ``DIR/bench.md`` (table, targets, pass/fail), ``DIR/bench.png`` (throughput bars and
latency CDF); worker and service logs under ``DIR/logs``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hashlib
import itertools
import json
import os
import platform
import re
import shutil
import signal
import subprocess
import sys
import time
import uuid
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from models.data import ML100K
from models.errors import ServiceError
from streams.services import WorkerProcess, metric_total, spawn_worker, wait_until

REPO = Path(__file__).resolve().parents[1]
MAX_BATCH = 2000  # the worker's default take(max_batch)
SESSION_TIMEOUT_S = "6"  # Kafka's lowest (group.min.session.timeout.ms)

TARGETS = {
    "product_vs_noop": 0.70,
    "product_eps_1w": 8000.0,
    "product_vs_naive": 10.0,
    "latency_p99_ms": 50.0,
    "users_1m_vs_1k": 0.8,
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
            return cls(True, 10_000, 2, 1_500, 4.0, 200, 20_000, 0.5, 10_000)
        return cls(False, None, 2, 15_000, 20.0, 1_000, 200_000, 2.0, 40_000)


# ---------------------------------------------------------------------------------------------------------------
# small helpers


def log(msg: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def histogram_buckets(
    samples: dict[str, float], name: str, labels: dict[str, str] | None = None
) -> list[tuple[float, float]]:
    """[(upper edge, cumulative count)] of a histogram (of its series with ``labels``), +Inf last."""
    out = []
    prefix = name + "_bucket{"
    want = (labels or {}).items()
    for k, v in samples.items():
        if k.startswith(prefix):
            got = dict(re.findall(r'(\w+)="([^"]*)"', k[len(prefix) :]))
            if want <= got.items():
                edge = got["le"]
                out.append((float("inf") if edge == "+Inf" else float(edge), v))
    return sorted(out)


def histogram_quantile(buckets: list[tuple[float, float]], q: float) -> float:
    """Prometheus-style quantile: linear inside the bucket that holds it (lower edge 0 for the first)."""
    total = buckets[-1][1] if buckets else 0.0
    if total <= 0:
        return float("nan")
    rank = q * total
    prev_edge, prev_count = 0.0, 0.0
    for edge, count in buckets:
        if count >= rank:
            if edge == float("inf"):
                return prev_edge
            inside = count - prev_count
            return prev_edge + (edge - prev_edge) * ((rank - prev_count) / inside if inside else 1.0)
        prev_edge, prev_count = edge, count
    return prev_edge


def window_quantiles_ms(
    before: dict[str, float], after: dict[str, float], name: str, labels: dict[str, str] | None = None
) -> tuple[dict[str, float], list[tuple[float, float]]]:
    """p50/p95/p99 in ms of what a histogram (in seconds) observed between two scrapes, and that delta's buckets."""
    b0 = dict(histogram_buckets(before, name, labels))
    delta = [(edge, count - b0.get(edge, 0.0)) for edge, count in histogram_buckets(after, name, labels)]
    return {f"p{int(q * 100)}": round(histogram_quantile(delta, q) * 1e3, 2) for q in (0.5, 0.95, 0.99)}, delta


def quantiles_ms(values: list[float]) -> dict[str, float]:
    import numpy as np

    if not values:
        return {"p50": float("nan"), "p95": float("nan"), "p99": float("nan")}
    arr = np.asarray(values) * 1e3
    return {f"p{q}": round(float(np.percentile(arr, q)), 2) for q in (50, 95, 99)}


def looped_events(ds, limit: int | None = None, loops: int = 1) -> Iterator[dict[str, object]]:
    """``wire_events(ds, limit, loops)`` with the per-loop ids ``<user>~<loop>`` spelled ``<user>_<loop>``.

    The worker's validator (``streams.events.USER_ID_RE``) rejects ``~``, so replay's looped ids are dead-lettered.
    """
    from streams.replay import wire_events

    for ev in wire_events(ds, limit, loops):
        ev["user_id"] = str(ev["user_id"]).replace("~", "_")
        yield ev


def scale_events(ds, total: int, users: int) -> Iterator[dict[str, object]]:
    """The real ML-100K stream (looped, event ids distinct per loop) with each event's user id hashed into ``users``."""
    loops = -(-total // len(ds.events))
    for i, ev in enumerate(itertools.islice(looped_events(ds, loops=loops), total)):
        digest = hashlib.blake2b(f"{ev['user_id']}#{i}".encode(), digest_size=8).digest()
        ev["user_id"] = f"s{int.from_bytes(digest, 'little') % users}"
        yield ev


async def start_store(store) -> None:
    """``StateStore.start`` without its retries: ping, load the scripts."""
    await store.client.ping()
    await store.load_scripts()


def wait_for(predicate, timeout: float, what: str, interval: float = 0.1):
    return wait_until(predicate, timeout, interval, f"bench: {what}")


def stop_all(procs: Iterable[subprocess.Popen], timeout: float = 15.0) -> None:
    """SIGTERM every process first, then wait for each (SIGKILL after ``timeout``)."""
    from streams.services import stop_pid

    procs = list(procs)
    for p in procs:
        if p.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                p.send_signal(signal.SIGTERM)
    for p in procs:
        stop_pid(p.pid, signal.SIGTERM, timeout)
        with contextlib.suppress(Exception):
            p.wait(timeout=5)


# ---------------------------------------------------------------------------------------------------------------
# the harness


@dataclass
class Bench:
    out: Path
    plan: Plan
    model: Path
    data: Path
    bootstrap: str = ""
    redis_base: str = ""
    service_pids: dict[str, int] = field(default_factory=dict)  # the broker's and Redis', for CpuUse
    run_id: str = field(default_factory=lambda: uuid.uuid4().hex[:6])
    procs: list[subprocess.Popen] = field(default_factory=list)
    _db: int = 0
    _runs: int = 0

    @property
    def logs(self) -> Path:
        return self.out / "logs"

    # ---- names and settings -----------------------------------------------------------------------------------
    def names(self, tag: str, input_topic: str | None = None) -> dict[str, str]:
        """INTEREST_* variables of one run: its own group, output topics, Redis db and prefix."""
        self._db = self._db % 15 + 1
        self._runs += 1
        base = f"bench-{self.run_id}-{tag}{self._runs}"  # never two runs on one set of topics
        return {
            "INTEREST_KAFKA_BOOTSTRAP": self.bootstrap,
            "INTEREST_REDIS_URL": f"{self.redis_base}/{self._db}",
            "INTEREST_INPUT_TOPIC": input_topic or f"{base}-clicks",
            "INTEREST_OUTPUT_TOPIC": f"{base}-interests",
            "INTEREST_DLQ_TOPIC": f"{base}-dlq",
            "INTEREST_REKEY_TOPIC": f"{base}-rekeyed",
            "INTEREST_APP_ID": base,
            "INTEREST_REDIS_PREFIX": f"b{self.run_id}{tag}{self._runs}:",
            "INTEREST_MODEL_PATH": str(self.model),
            "INTEREST_PARTITIONS": "8",
            "INTEREST_SESSION_TIMEOUT_S": SESSION_TIMEOUT_S,
            "INTEREST_WEB_PORT": "0",
            "INTEREST_DEVICE": "cpu",
            "INTEREST_DATA_DIR": str((self.logs / "faust").resolve()),
        }

    @staticmethod
    def settings(env: dict[str, str]):
        from streams.settings import get_settings

        return get_settings(**{k[len("INTEREST_") :].lower(): v for k, v in env.items()})

    # ---- processes ----------------------------------------------------------------------------------------------
    def start_worker(self, env: dict[str, str], name: str) -> WorkerProcess:
        w = spawn_worker(env, self.logs / f"{name}.log", cwd=REPO)
        self.procs.append(w.proc)
        return w

    def wait_ready(self, workers: list[WorkerProcess]) -> None:
        for w in workers:

            def up(w=w) -> bool:
                if not w.alive():
                    tail = w.log.read_text(errors="replace")[-2000:]
                    raise ServiceError(f"worker exited with {w.proc.returncode}: {tail}")
                return metric_total(w.samples(), "interest_events_in_total") >= 0

            wait_for(up, 120, f"worker metrics ({w.log})", 0.2)

    def prefill(self, env: dict[str, str], events: Iterable[dict[str, object]], total: int) -> float:
        """Produce ``events`` into the run's input topic (creating its topics); returns events/s of the producer."""
        from streams.replay import produce

        t0 = time.perf_counter()
        sent = produce(self.settings(env), iter(events), total, None, False)
        eps = sent / (time.perf_counter() - t0)
        log(f"pre-filled {env['INTEREST_INPUT_TOPIC']} with {sent:,} events ({eps:,.0f}/s)")
        return eps

    def spawn(self, command: str, *args: str) -> subprocess.Popen:
        """``python -m streams.bench COMMAND --bootstrap <broker> ARGS`` (a hidden subcommand) in its own process,
        output to ``DIR/logs/COMMAND.log``; stopped with the others at the end."""
        with open(self.logs / f"{command}.log", "wb") as out:
            proc = subprocess.Popen(
                [sys.executable, "-m", "streams.bench", command, "--bootstrap", self.bootstrap, *args],
                cwd=REPO,
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
            )
        self.procs.append(proc)
        return proc

    # ---- 1a: Faust no-op -------------------------------------------------------------------------------------------
    def faust_noop(self, topic: str, n: int) -> dict:
        result = self.logs / "noop-result.json"
        result.unlink(missing_ok=True)
        args = ("--topic", topic, "--group", f"bench-{self.run_id}-noop", "--expect", str(n), "--result", str(result))
        proc = self.spawn("noop-worker", *args)
        try:
            wait_for(lambda: result.is_file() or proc.poll() is not None, 60 + n / 2000, "the Faust no-op agent", 0.2)
        finally:
            stop_all([proc], 10)
        if not result.is_file():
            raise ServiceError(f"noop worker failed; see {self.logs / 'noop-worker.log'}")
        r = json.loads(result.read_text())
        eps = (r["events"] - r["first_batch"]) / max(r["last"] - r["first"], 1e-9)
        return {"eps": eps, "events": r["events"], "seconds": r["last"] - r["first"], "batches": r["batches"]}

    # ---- 1b: aiokafka raw -------------------------------------------------------------------------------------------
    def aiokafka_raw(self, topic: str, n: int) -> dict:
        async def go() -> dict:
            from aiokafka import AIOKafkaConsumer

            c = AIOKafkaConsumer(
                topic,
                bootstrap_servers=self.bootstrap,
                group_id=None,
                auto_offset_reset="earliest",
                enable_auto_commit=False,
                max_poll_records=MAX_BATCH,
            )
            await c.start()
            try:  # timed from start(): aiokafka prefetches in the background, the first getmany may find it all
                got, t0 = 0, time.perf_counter()
                while got < n:
                    batch = await c.getmany(timeout_ms=1000, max_records=MAX_BATCH)
                    got += sum(len(v) for v in batch.values())
                t1 = time.perf_counter()
            finally:
                await c.stop()
            return {"eps": got / max(t1 - t0, 1e-9), "events": got, "seconds": t1 - t0}

        return asyncio.run(go())

    # ---- 1c: ORT step alone -----------------------------------------------------------------------------------------
    def ort_step(self, events: list[dict], seconds: float) -> dict:
        """The worker's stepping alone (step_groups + sequence graph) on ML-100K's batches of MAX_BATCH events, and
        the round-by-round stepping it replaced (one step call per round), in the same run."""
        import numpy as np

        from export.runtime import StepSession, bench
        from streams.processor import BatchStepper

        session = StepSession(self.model, device="cpu", intra_op_threads=1)
        stepper = BatchStepper(session, intra_op_threads=1)
        rng = np.random.default_rng(0)
        x = rng.random((MAX_BATCH, session.n_features), dtype=np.float32)
        chunks = []  # (n users, slot of each event, its round), per batch of MAX_BATCH events
        for s in range(0, len(events) - MAX_BATCH + 1, MAX_BATCH):
            users = [str(e["user_id"]) for e in events[s : s + MAX_BATCH]]
            slot_of = {u: i for i, u in enumerate(dict.fromkeys(users))}
            seen: Counter = Counter()
            rounds = []
            for u in users:
                rounds.append(seen[u])
                seen[u] += 1
            chunks.append((len(slot_of), np.array([slot_of[u] for u in users]), np.array(rounds)))

        def timed(step_batch) -> tuple[float, float]:
            """-> events/s, ORT calls per batch."""
            done, elapsed, calls, batches = 0, 0.0, 0, 0
            while elapsed < seconds:
                for n_users, slots, rounds in chunks:
                    H, C = session.initial_state(n_users)
                    P = np.empty((len(slots), len(session.meta.categories)), dtype=np.float32)
                    t0 = time.perf_counter()
                    calls += step_batch(H, C, P, rounds, slots)
                    elapsed += time.perf_counter() - t0
                    done += len(slots)
                    batches += 1
            return done / elapsed, calls / batches

        def grouped(H, C, P, rounds, slots) -> int:
            return stepper(x[: len(slots)], H, C, P, rounds, slots)

        def by_round(H, C, P, rounds, slots) -> int:
            run = session.session.run
            for r in range(int(rounds.max()) + 1):
                idx = np.flatnonzero(rounds == r)
                s = slots[idx]
                P[idx], H[s], C[s] = run(None, {"features": x[idx], "h": H[s], "c": C[s]})
            return int(rounds.max()) + 1

        eps, calls = timed(grouped)
        rounds_eps, rounds_calls = timed(by_round)
        by_batch = {str(b): round(v) for b, v in bench(session, [1, 64, 256, 1024, MAX_BATCH], 0.2).items()}
        return {
            "eps": eps,
            "calls_per_batch": calls,
            "round_by_round_eps": rounds_eps,
            "rounds_per_batch": rounds_calls,
            "by_batch_eps": by_batch,
            "hidden": session.hidden_size,
        }

    # ---- 1d: Redis pipelined writes ---------------------------------------------------------------------------------
    def redis_pipeline(self, total: int) -> dict:
        import numpy as np
        import orjson

        from streams.state import StateStore, UserState, UserWrite, encode_state

        env = self.names("redis")
        settings = self.settings(env)

        async def go() -> dict:
            from export.runtime import StepSession

            meta = StepSession(self.model, device="cpu").meta
            store = StateStore(settings, meta.version, meta.hidden_size)
            await start_store(store)
            k = len(meta.categories)
            st = UserState(
                h=np.full(meta.hidden_size, 0.1, np.float32),
                c=np.full(meta.hidden_size, 0.2, np.float32),
                events=1,
                last_ts=893286638.0,
                positions={"clicks:3": 123456},
                recent=os.urandom(8 * 100),
            )
            fields = encode_state(st)
            probs = np.full(k, 1.0 / k, dtype=np.float32)
            fields["probs"] = orjson.dumps(probs, option=orjson.OPT_SERIALIZE_NUMPY)
            fields["top"] = orjson.dumps([{"category": c, "p": 1.0 / k} for c in meta.categories[:5]])
            fields["model_version"] = meta.version
            fields["updated_at"] = repr(time.time())
            done, t0 = 0, time.perf_counter()
            while done < total:
                users = [f"u{done + i}" for i in range(MAX_BATCH)]
                writes = [UserWrite(store.key(u), fields, 1) for u in users]
                await store.write(writes, dict.fromkeys(users, st))
                done += len(users)
            elapsed = time.perf_counter() - t0
            await store.close()
            return {"eps": done / elapsed, "writes": done, "per_pipeline": MAX_BATCH}

        return asyncio.run(go())

    # ---- 2 and 5: the product ---------------------------------------------------------------------------------------
    def product(self, env: dict[str, str], n: int, workers: int, name: str, profile: Path | None = None) -> dict:
        import psutil
        import redis

        rclient = redis.Redis.from_url(env["INTEREST_REDIS_URL"])
        mem0 = int(rclient.info("memory")["used_memory"])
        procs = [self.start_worker(env, f"{name}-{i}") for i in range(workers)]
        spy = None
        try:
            self.wait_ready(procs)
            if profile is not None:
                spy = start_py_spy(procs[0].pid, profile, self.logs / f"{name}-py-spy.log")
            ps = [psutil.Process(w.pid) for w in procs]
            rss = [0] * workers
            t_first: float | None = None
            a_first = 0.0
            t_last: float | None = None
            deadline = time.monotonic() + 120 + n / 500
            with CpuUse([w.pid for w in procs], self.service_pids) as cpu:
                while True:
                    applied = sum(metric_total(w.samples(), "interest_events_applied_total") for w in procs)
                    now = time.perf_counter()
                    for i, p in enumerate(ps):
                        with contextlib.suppress(psutil.Error):  # the worker and its step process
                            rss[i] = max(rss[i], sum(q.memory_info().rss for q in (p, *p.children())))
                    if applied > 0 and t_first is None:
                        t_first, a_first = now, applied
                    if applied >= n:
                        t_last = now
                        break
                    for w in procs:
                        if not w.alive():
                            raise ServiceError(f"worker died: see {w.log}")
                    if t_first is None and any(metric_total(w.samples(), "interest_dead_letters_total") for w in procs):
                        raise ServiceError(f"{name}: events dead-lettered instead of applied; see {procs[0].log}")
                    if time.monotonic() > deadline:
                        raise ServiceError(f"{name}: only {applied:.0f}/{n} events applied before the deadline")
                    # each scrape costs the worker (~2 % of its main thread at 4 Hz in py-spy), and the no-op agent is
                    # not scraped at all: poll about four times over the time left, down to 20 Hz at the very end
                    rate = (applied - a_first) / (now - t_first) if t_first is not None and now > t_first else 0.0
                    time.sleep(min(1.0, max(0.05, (n - applied) / rate / 4)) if rate > 0 else 0.25)
            final = [w.samples() for w in procs]
        finally:
            if spy is not None:
                with contextlib.suppress(ProcessLookupError):
                    spy.send_signal(signal.SIGINT)
                with contextlib.suppress(subprocess.TimeoutExpired):
                    spy.wait(timeout=30)
            stop_all([w.proc for w in procs])
        assert t_first is not None and t_last is not None  # the loop ends only once both are set
        seconds = max(t_last - t_first, 1e-9)
        eps = (n - a_first) / seconds
        batches = sum(metric_total(s, "interest_batch_size_count") for s in final)
        ort_s = sum(metric_total(s, "interest_ort_step_seconds_sum") for s in final)
        redis_s = sum(metric_total(s, "interest_redis_write_seconds_sum") for s in final)
        keys = int(rclient.dbsize())
        mem1 = int(rclient.info("memory")["used_memory"])
        rclient.close()
        log(f"{name}: {n:,} events, {workers} worker(s): {eps:,.0f} ev/s over {seconds:.1f}s")
        return {
            "eps": eps,
            "events": n,
            "workers": workers,
            "seconds": seconds,
            "mean_batch": n / max(batches, 1),
            "ort_share": ort_s / (seconds * workers),
            "redis_write_share": redis_s / (seconds * workers),
            "rss_mb": [round(r / 2**20, 1) for r in rss],
            "redis_keys": keys,
            "redis_used_delta_bytes": mem1 - mem0,
            "redis_bytes_per_user": (mem1 - mem0) / keys if keys else float("nan"),
            # from the workers' start-up to the last applied event: the workers (with their step processes), the
            # broker and Redis, % of one core; and events per CPU-second of the workers' processes
            "cpu_pct": cpu.result,
            "worker_events_per_cpu_s": n / max(cpu.result.get("worker", 0.0) / 100 * cpu.result["seconds"], 1e-9),
        }

    # ---- 3: naive -------------------------------------------------------------------------------------------------
    def naive(self, topic: str, n: int) -> dict:
        env = self.names("naive", topic)
        settings = self.settings(env)
        from streams.kafka import ensure_topics

        ensure_topics(settings)

        async def go() -> dict:
            from aiokafka import AIOKafkaConsumer, AIOKafkaProducer

            from export.runtime import StepSession
            from streams.processor import InterestProcessor, RawMessage
            from streams.state import StateStore

            session = StepSession(self.model, device="cpu", intra_op_threads=1)
            store = StateStore(settings, session.meta.version, session.meta.hidden_size)
            await start_store(store)
            # ORT called inline, as a first implementation would
            processor = InterestProcessor(session, store, settings, session.load_catalog(), step_in_thread=False)
            consumer = AIOKafkaConsumer(
                topic, bootstrap_servers=self.bootstrap, group_id=None, auto_offset_reset="earliest"
            )
            producer = AIOKafkaProducer(bootstrap_servers=self.bootstrap, acks=1)
            await consumer.start()
            await producer.start()
            done, t0 = 0, 0.0
            try:
                async for rec in consumer:  # one event at a time, end to end
                    if not done:  # timed from the first event
                        t0 = time.perf_counter()
                    msg = RawMessage(rec.topic, rec.partition, rec.offset, rec.key, rec.value, rec.timestamp / 1e3)
                    plan = await processor.prepare([msg])  # one ORT call
                    for key, value in plan.outputs:
                        await producer.send_and_wait(settings.output_topic, value, key=key)  # one awaited send
                    await processor.write(plan)  # one Redis write
                    done += 1
                    if done >= n:
                        break
                t1 = time.perf_counter()
            finally:
                await consumer.stop()
                await producer.stop()
                await store.close()
            return {"eps": (done - 1) / max(t1 - t0, 1e-9), "events": done, "seconds": t1 - t0}

        r = asyncio.run(go())
        log(f"naive: {r['events']:,} events: {r['eps']:,.0f} ev/s")
        return r

    # ---- 4: latency ------------------------------------------------------------------------------------------------
    def latency(self, ds, rate: float, seconds: float, warmup: int, tag: str = "lat", **worker_env: str) -> dict:
        import orjson
        from kafka import KafkaConsumer

        from streams.kafka import ensure_topics
        from streams.metrics import BATCH_STAGES

        env = self.names(tag) | worker_env
        settings = self.settings(env)
        ensure_topics(settings)
        n = max(500, int(rate * seconds))
        events = looped_events(ds, loops=2 + (n + warmup) // len(ds.events))
        worker = self.start_worker(env, f"latency-{tag}")
        topic = settings.input_topic
        sent_at: dict[str, float] = {}
        try:
            self.wait_ready([worker])
            # warm: group joined, model and caches warm
            paced_send(self.bootstrap, topic, itertools.islice(events, warmup), None)
            applied = lambda: metric_total(worker.samples(), "interest_events_applied_total")  # noqa: E731
            wait_for(lambda: applied() >= warmup, 120, "the latency warm-up")
            before = worker.samples()
            with CpuUse([worker.proc.pid], self.service_pids) as cpu:
                offered = paced_send(self.bootstrap, topic, itertools.islice(events, n), rate, sent_at)
                wait_for(lambda: applied() >= warmup + n, 120 + n / 1000, "the latency run")
            after = worker.samples()
        finally:
            stop_all([worker.proc])
        redis_q, delta = window_quantiles_ms(before, after, "interest_latency_from_produce_seconds")
        stages = {
            stage: window_quantiles_ms(before, after, "interest_batch_stage_seconds", {"stage": stage})[0]
            for stage in BATCH_STAGES
        }

        consumer = KafkaConsumer(
            settings.output_topic,
            bootstrap_servers=self.bootstrap,
            auto_offset_reset="earliest",
            enable_auto_commit=False,
            max_poll_records=5000,
        )
        out_lat: list[float] = []
        proc_lat: list[float] = []
        halves: tuple[list[float], list[float]] = ([], [])  # by send time: the run's first and second half
        mid = (min(sent_at.values()) + max(sent_at.values())) / 2 if sent_at else 0.0
        seen = 0
        try:
            deadline = time.monotonic() + 60 + n / 2000
            while seen < warmup + n and time.monotonic() < deadline:
                for records in consumer.poll(timeout_ms=500).values():
                    seen += len(records)
                    for rec in records:
                        obj = orjson.loads(rec.value)
                        t = sent_at.get(obj.get("event_id"))
                        if t is not None:
                            out_lat.append(rec.timestamp / 1e3 - t)
                            proc_lat.append(obj["processed_at"] - t)
                            halves[t > mid].append(out_lat[-1])
        finally:
            consumer.close()
        out_lat.sort()
        result = {
            "offered_eps": rate,
            "achieved_eps": offered,
            "events": n,
            "redis_ms": redis_q,
            "stages_ms": stages,
            "output_ms_halves": [quantiles_ms(h) for h in halves],
            "redis_cdf": [(e, c / delta[-1][1]) for e, c in delta if e != float("inf")] if delta else [],
            "output_ms": quantiles_ms(out_lat),
            "processed_ms": quantiles_ms(proc_lat),
            "output_samples": len(out_lat),
            "cpu_pct": cpu.result,
            "output_cdf_ms": [round(out_lat[int(i * (len(out_lat) - 1) / 200)] * 1e3, 3) for i in range(201)]
            if out_lat
            else [],
        }
        log(f"latency at {offered:,.0f} ev/s: to Redis {redis_q}, to output {result['output_ms']}; CPU {cpu.result}")
        log("  per batch: " + ", ".join(f"{k} p50 {v['p50']} p99 {v['p99']} ms" for k, v in stages.items()))
        return result

    def latency_floor(self, ds, rate: float, seconds: float, warmup: int) -> dict:
        """The transport alone at the latency run's rate: a bare aiokafka consumer in its own process
        (``floor-consumer``: the worker's fetch settings, no group); produce -> consumed."""
        r, offered, cpu = self.paced_probe(ds, "floor", "floor-consumer", (), rate, seconds, warmup)
        log(f"transport floor at {offered:,.0f} ev/s: {r['latency_ms']}; CPU {cpu}")
        return {"offered_eps": offered, "events": r["events"], "consumed_ms": r["latency_ms"], "cpu_pct": cpu}

    def latency_faust(self, ds, rate: float, seconds: float, warmup: int) -> dict:
        """Faust alone at the latency run's rate: the no-op agent iterating ``stream.events()`` (``noop-worker
        --latency``, its own process, the worker's Faust settings); produce -> the agent has the event. The worker's
        pipeline starts where this ends."""
        group = ("--group", f"bench-{self.run_id}-noop-latency", "--latency")
        r, offered, cpu = self.paced_probe(ds, "faustlat", "noop-worker", group, rate, seconds, warmup)
        log(f"Faust alone at {offered:,.0f} ev/s: {r['latency_ms']}; CPU {cpu}")
        return {"offered_eps": offered, "events": r["events"], "agent_ms": r["latency_ms"], "cpu_pct": cpu}

    def paced_probe(
        self, ds, tag: str, command: str, args: Iterable[str], rate: float, seconds: float, warmup: int
    ) -> tuple[dict, float, dict]:
        """A consumer subcommand (``command ARGS``, its own process) timed on a fresh topic: ``warmup`` events sent
        at once until it says it has them (its ``.ready`` file), then ``rate * seconds`` paced by
        :func:`paced_send` while the CPU is sampled, until it writes its result. Returns (its result, the rate
        achieved, the CPU use)."""
        from streams.kafka import ensure_topics

        settings = self.settings(self.names(tag))
        ensure_topics(settings)
        topic = settings.input_topic
        n = max(500, int(rate * seconds))
        warmup = max(1, warmup)  # the command says it is ready once it has them
        result = self.logs / f"{command}-result.json"
        ready = result.with_suffix(".ready")
        result.unlink(missing_ok=True)
        ready.unlink(missing_ok=True)
        counts = ("--expect", str(warmup + n), "--skip", str(warmup))
        proc = self.spawn(command, "--topic", topic, "--result", str(result), *counts, *args)
        events = looped_events(ds, loops=2 + (n + warmup) // len(ds.events))
        try:
            paced_send(self.bootstrap, topic, itertools.islice(events, warmup), None)
            wait_for(lambda: ready.exists() or proc.poll() is not None, 120, f"the {command}'s warm-up", 0.2)
            with CpuUse([proc.pid], self.service_pids) as cpu:
                offered = paced_send(self.bootstrap, topic, itertools.islice(events, n), rate)
                wait_for(lambda: result.exists() or proc.poll() is not None, 60 + n / 1000, f"the {command}")
        finally:
            stop_all([proc], 10)
        if not result.exists():
            raise ServiceError(f"{command} failed; see {self.logs / f'{command}.log'}")
        return json.loads(result.read_text()), offered, cpu.result


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


class CpuUse:
    """CPU used over a window (a ``with`` block), in % of one core (so up to 100 x cores): the whole machine, this
    process (the load generator) and the given processes with their children (a worker and its step process); with
    one worker, also its own process (Faust) apart from its step process; and each of ``services`` (name -> pid)."""

    def __init__(self, pids: Iterable[int] = (), services: dict[str, int] | None = None) -> None:
        import psutil

        self.services: dict[str, list] = {}
        for name, pid in (services or {}).items():
            with contextlib.suppress(psutil.Error):
                self.services[name] = [psutil.Process(pid)]
        self.mains: list = []
        self.children: list = []
        for pid in pids:
            with contextlib.suppress(psutil.Error):
                p = psutil.Process(pid)
                self.mains.append(p)
                self.children += p.children(recursive=True)
        self.me = psutil.Process()
        self.result: dict[str, float] = {}

    def _busy(self) -> tuple[float, ...]:
        import psutil

        def used(procs: list) -> float:
            total = 0.0
            for p in procs:
                with contextlib.suppress(psutil.Error):
                    total += sum(p.cpu_times()[:2])
            return total

        t = psutil.cpu_times()
        machine = sum(t) - t.idle - getattr(t, "iowait", 0.0)
        services = (used(procs) for procs in self.services.values())
        return time.perf_counter(), machine, used([self.me]), used(self.mains), used(self.children), *services

    def __enter__(self) -> CpuUse:
        self._start = self._busy()
        return self

    def __exit__(self, *exc: object) -> None:
        end = self._busy()
        wall = max(end[0] - self._start[0], 1e-9)
        machine, mine, mains, children, *services = (
            100 * (b - a) / wall for a, b in zip(self._start[1:], end[1:], strict=True)
        )
        self.result = {"machine": round(machine, 1), "load_generator": round(mine, 1), "cores": os.cpu_count() or 1}
        self.result["seconds"] = round(wall, 2)
        self.result |= {name: round(pct, 1) for name, pct in zip(self.services, services, strict=True)}
        if self.mains:
            self.result["worker"] = round(mains + children, 1)
            if len(self.mains) == 1 and self.children:
                self.result["worker_faust"] = round(mains, 1)
                self.result["step_process"] = round(children, 1)


# ---------------------------------------------------------------------------------------------------------------
# profiling


def py_spy_binary() -> str | None:
    local = Path(sys.executable).with_name("py-spy")
    return str(local) if local.exists() else shutil.which("py-spy")


def start_py_spy(pid: int, out: Path, log_path: Path) -> subprocess.Popen | None:
    exe = py_spy_binary()
    if exe is None:
        log("py-spy not installed (pip install py-spy): no profile")
        return None
    with open(log_path, "wb") as f:
        return subprocess.Popen(
            [
                exe,
                "record",
                "--pid",
                str(pid),
                "--rate",
                "100",
                "--format",
                "raw",
                "--function",
                "--nonblocking",
                "--subprocesses",  # the worker's step process too
                "-o",
                str(out),
            ],
            stdout=f,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
        )


def summarize_profile(path: Path, top: int = 15) -> dict:
    """Top functions by self and inclusive share of samples, and self share by area, from py-spy's raw output."""
    self_c: Counter = Counter()
    incl: Counter = Counter()
    area: Counter = Counter()
    total = 0
    for line in path.read_text(errors="replace").splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        n = int(count)
        frames = [_no_line(f) for f in stack.split(";") if f and not f.startswith(("process ", "thread "))]
        if not frames:
            continue
        total += n
        self_c[frames[-1]] += n
        for f in set(frames):
            incl[f] += n
        area[_area(frames[-1])] += n
    if not total:
        return {"samples": 0}

    def pct(c: Counter) -> list[list]:
        return [[name, round(100 * v / total, 1)] for name, v in c.most_common(top)]

    return {"samples": total, "self_pct": pct(self_c), "inclusive_pct": pct(incl), "self_pct_by_area": pct(area)}


def _no_line(frame: str) -> str:
    """``func (path/file.py:123)`` -> ``func (path/file.py)``: one entry per function."""
    head, sep, tail = frame.rpartition(":")
    return f"{head})" if sep and tail.rstrip(")").isdigit() else frame


def _area(frame: str) -> str:
    path = frame[frame.rfind("(") + 1 :]
    for key, name in (
        ("onnxruntime", "onnxruntime"),
        ("aiokafka", "aiokafka"),
        ("kafka/", "kafka-python"),
        ("faust", "faust"),
        ("mode/", "mode"),
        ("redis", "redis-py"),
        ("prometheus_client", "prometheus"),
        ("asyncio", "asyncio"),
        ("numpy", "numpy"),
        ("streams/", "streams (ours)"),
        ("export/", "export (ours)"),
    ):
        if key in path:
            return name
    return "other"


# ---------------------------------------------------------------------------------------------------------------
# report


def ratio(a: float, b: float) -> float:
    return round(a / b, 3) if b else float("nan")


def build_result(r: dict, plan: Plan, meta: dict) -> dict:
    lat = r["latency"]
    out = {
        "faust_noop_eps": round(r["noop"]["eps"]),
        "aiokafka_raw_eps": round(r["raw"]["eps"]),
        "ort_step_eps": round(r["ort"]["eps"]),
        "redis_pipeline_eps": round(r["redis"]["eps"]),
        "product_eps_1w": round(r["p1"]["eps"]),
        "product_eps_2w": round(r["p2"]["eps"]),
        "naive_eps": round(r["naive"]["eps"], 1),
        "latency_ms": lat["redis_ms"],
        "latency_output_ms": lat["output_ms"],
        "latency_offered_eps": round(lat["offered_eps"]),
        "latency_transport_ms": r["floor"]["consumed_ms"],
        "latency_faust_ms": r["faust_latency"]["agent_ms"],
        "latency_cpu_pct": lat["cpu_pct"],
        "latency_stages_ms": lat["stages_ms"],
        "latency_output_ms_halves": lat["output_ms_halves"],
        "product_cpu_pct_1w": r["p1"]["cpu_pct"],
        "worker_events_per_cpu_s": round(r["p1"]["worker_events_per_cpu_s"]),
        "users_1k_eps": round(r["u1k"]["eps"]),
        "users_1m_eps": round(r["u1m"]["eps"]),
        "rss_mb": max(r["u1m"]["rss_mb"]),
        "redis_bytes_per_user": round(r["u1m"]["redis_bytes_per_user"]),
        "ratios": {
            "product_vs_noop": ratio(r["p1"]["eps"], r["noop"]["eps"]),
            "product_vs_naive": ratio(r["p1"]["eps"], r["naive"]["eps"]),
            "users_1m_vs_1k": ratio(r["u1m"]["eps"], r["u1k"]["eps"]),
            "product_2w_vs_1w": ratio(r["p2"]["eps"], r["p1"]["eps"]),
            "product_vs_aiokafka_raw": ratio(r["p1"]["eps"], r["raw"]["eps"]),
        },
    }
    ratios = out["ratios"]
    out["targets"] = {
        "product_vs_noop >= 0.70": ratios["product_vs_noop"] >= TARGETS["product_vs_noop"],
        "product_eps_1w >= 8000": out["product_eps_1w"] >= TARGETS["product_eps_1w"],
        "product_vs_naive >= 10": ratios["product_vs_naive"] >= TARGETS["product_vs_naive"],
        "latency p99 produce->Redis <= 50 ms": lat["redis_ms"]["p99"] <= TARGETS["latency_p99_ms"],
        "users_1m_vs_1k >= 0.8": ratios["users_1m_vs_1k"] >= TARGETS["users_1m_vs_1k"],
    }
    out["details"] = {
        k: {kk: vv for kk, vv in v.items() if not kk.endswith("cdf") and kk != "output_cdf_ms"}
        for k, v in r.items()
        if isinstance(v, dict) and k != "profile"
    }
    out["profile"] = r.get("profile") or {}
    out["meta"] = meta | {"quick": plan.quick, "plan": plan.__dict__}
    return out


def write_markdown(path: Path, res: dict) -> None:
    d = res["details"]
    lat, lo, tr, fa = res["latency_ms"], res["latency_output_ms"], res["latency_transport_ms"], res["latency_faust_ms"]
    cpu, pcpu = res["latency_cpu_pct"], res["product_cpu_pct_1w"]
    rows = [
        ("Faust no-op agent, take_events(2000)", f"{res['faust_noop_eps']:,}", f"{d['noop']['events']:,} events"),
        ("aiokafka raw consumer (getmany)", f"{res['aiokafka_raw_eps']:,}", f"{d['raw']['events']:,} events"),
        (
            "ORT step alone, the worker's grouped calls",
            f"{res['ort_step_eps']:,}",
            f"{d['ort']['calls_per_batch']:.1f} calls per {MAX_BATCH}-event batch; round by round "
            f"{d['ort']['round_by_round_eps']:,.0f} ({d['ort']['rounds_per_batch']:.0f} calls)",
        ),
        ("Redis CAS pipeline, 2000 users/pipeline", f"{res['redis_pipeline_eps']:,}", "writes/s"),
        ("**product, 1 worker**", f"**{res['product_eps_1w']:,}**", f"{d['p1']['events']:,} events"),
        ("product, 2 workers", f"{res['product_eps_2w']:,}", f"{d['p2']['events']:,} events"),
        ("naive (per event ORT + Redis + awaited send)", f"{res['naive_eps']:,}", f"{d['naive']['events']:,} events"),
        ("product, 1,000 users", f"{res['users_1k_eps']:,}", f"{d['u1k']['redis_keys']:,} keys"),
        ("product, 1,000,000-id space", f"{res['users_1m_eps']:,}", f"{d['u1m']['redis_keys']:,} distinct users"),
    ]
    t = res["targets"]
    r = res["ratios"]
    mark = {True: "PASS", False: "FAIL"}
    lines = [
        f"# interest-stream bench ({'quick' if res['meta']['quick'] else 'full'} run)",
        "",
        f"{res['meta']['when']}, {res['meta']['cpus']} CPUs, load average at start {res['meta']['loadavg']}, "
        f"model `{res['meta']['model']}`, broker {res['meta']['broker']}. Shared machine: absolute rates are noisy, "
        "ratios of one run are what count.",
        "",
        "| what | events/s | notes |",
        "|---|---:|---|",
        *[f"| {a} | {b} | {c} |" for a, b, c in rows],
        "",
        f"Latency at an offered {res['latency_offered_eps']:,} ev/s (half the 1-worker max): produce -> Redis "
        f"p50 {lat['p50']} ms, p95 {lat['p95']} ms, p99 {lat['p99']} ms (interpolated in the worker's histogram "
        f"buckets); produce -> output record p50 {lo['p50']} ms, p95 {lo['p95']} ms, p99 {lo['p99']} ms (exact).",
        "",
        f"The transport alone at the same rate (the same producer into a fresh topic, a bare aiokafka consumer with "
        f"the worker's fetch settings, no worker): produce -> consumed p50 {tr['p50']} ms, p95 {tr['p95']} ms, "
        f"p99 {tr['p99']} ms. Faust alone at the same rate (the no-op agent iterating `stream.events()`): produce -> "
        f"agent p50 {fa['p50']} ms, p95 {fa['p95']} ms, p99 {fa['p99']} ms.",
        "",
        "Where a batch's time went in the latency run (per batch, the worker's `interest_batch_stage_seconds`: "
        "consume = its first event from produce to the agent, collect = until the step stage took the batch, step = "
        "until stepped and its records were with the producer, write = until delivered and in Redis): "
        + ", ".join(f"{k} p50 {v['p50']} / p99 {v['p99']} ms" for k, v in res["latency_stages_ms"].items())
        + ".",
        "",
        f"CPU during the latency run (% of one core, {cpu['cores']} cores): machine {cpu['machine']}, worker and step "
        f"process {cpu.get('worker')} (Faust's process {cpu.get('worker_faust')}, the step process "
        f"{cpu.get('step_process')}), the bench's paced producer {cpu['load_generator']}, the broker "
        f"{cpu.get('broker')}, Redis {cpu.get('redis')}. Produce -> output record p99 in the run's first half "
        f"{res['latency_output_ms_halves'][0]['p99']} ms, second half {res['latency_output_ms_halves'][1]['p99']} ms.",
        "",
        f"CPU during the 1-worker product run (from its start to the last applied event, % of one core): worker and "
        f"step process {pcpu.get('worker')}, the broker {pcpu.get('broker')}, Redis {pcpu.get('redis')}: "
        f"{res['worker_events_per_cpu_s']:,} events per CPU-second of the worker's processes.",
        "",
        f"Memory at the 1M-id run: worker RSS (with its step process) {res['rss_mb']} MB, "
        f"Redis {res['redis_bytes_per_user']:,} B/user "
        f"(~{res['redis_bytes_per_user'] * 1e6 / 2**30:.1f} GiB for 1M users).",
        "",
        "## Targets",
        "",
        "| target | measured | result |",
        "|---|---:|---|",
        f"| product_eps_1w >= 70% of faust_noop_eps | {r['product_vs_noop']:.0%} | "
        f"{mark[t['product_vs_noop >= 0.70']]} |",
        f"| product_eps_1w >= 8,000 ev/s | {res['product_eps_1w']:,} | {mark[t['product_eps_1w >= 8000']]} |",
        f"| product / naive >= 10 | {r['product_vs_naive']:.1f}x | {mark[t['product_vs_naive >= 10']]} |",
        f"| p99 produce->Redis <= 50 ms at half max | {lat['p99']} ms (transport alone {tr['p99']} ms, "
        f"Faust alone {fa['p99']} ms) | "
        f"{mark[t['latency p99 produce->Redis <= 50 ms']]} |",
        f"| users_1m / users_1k >= 0.8 | {r['users_1m_vs_1k']:.2f} | {mark[t['users_1m_vs_1k >= 0.8']]} |",
        "",
    ]
    prof = res.get("profile") or {}
    if prof.get("samples"):
        lines += ["## Profile (py-spy, 1 worker and its step process, % of samples)", "", "| self | % |", "|---|---:|"]
        lines += [f"| `{n}` | {p} |" for n, p in prof["self_pct"][:12]]
        lines += ["", "| area (self) | % |", "|---|---:|"]
        lines += [f"| {n} | {p} |" for n, p in prof["self_pct_by_area"]]
        lines += [""]
    path.write_text("\n".join(lines))


def write_plot(path: Path, res: dict, lat: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    bars = [
        ("Faust no-op", res["faust_noop_eps"]),
        ("aiokafka raw", res["aiokafka_raw_eps"]),
        ("ORT step", res["ort_step_eps"]),
        ("Redis pipeline", res["redis_pipeline_eps"]),
        ("product 1w", res["product_eps_1w"]),
        ("product 2w", res["product_eps_2w"]),
        ("naive", res["naive_eps"]),
        ("1k users", res["users_1k_eps"]),
        ("1M-id users", res["users_1m_eps"]),
    ]
    fig, (a, b) = plt.subplots(1, 2, figsize=(13, 5))
    colors = ["#999"] * 4 + ["#1f77b4"] * 2 + ["#d62728"] + ["#2ca02c"] * 2
    a.barh([n for n, _ in bars][::-1], [v for _, v in bars][::-1], color=colors[::-1])
    a.set_xscale("log")
    a.set_xlabel("events/s (log)")
    a.set_title("throughput")
    for i, (_, v) in enumerate(bars[::-1]):
        a.text(v, i, f" {v:,.0f}", va="center", fontsize=8)
    if lat.get("output_cdf_ms"):
        xs = lat["output_cdf_ms"]
        b.plot(xs, [i / (len(xs) - 1) for i in range(len(xs))], label="produce -> output record (exact)")
    cdf = lat.get("redis_cdf") or []
    full = next((i for i, (_, c) in enumerate(cdf) if c >= 1.0), len(cdf) - 1)
    lat = lat | {"redis_cdf": cdf[: full + 1]}  # stop at the bucket that holds every event (buckets run to 1 h)
    if lat.get("redis_cdf"):
        b.plot(
            [0.0] + [e * 1e3 for e, _ in lat["redis_cdf"]],
            [0.0] + [c for _, c in lat["redis_cdf"]],
            "o-",
            label="produce -> Redis (histogram buckets)",
        )
    b.axvline(50, color="#d62728", ls="--", lw=1, label="50 ms target")
    b.set_xscale("log")
    b.set_xlabel("ms (log)")
    b.set_ylabel("fraction of events")
    b.set_title(f"latency CDF at {res['latency_offered_eps']:,} ev/s offered")
    b.legend(loc="lower right", fontsize=8)
    b.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ---------------------------------------------------------------------------------------------------------------
# the command


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", type=Path, required=True, help="folder for bench.json, bench.md, bench.png, logs")
    parser.add_argument("--quick", action="store_true", help="small event counts: a smoke run in < 3 minutes")
    parser.add_argument("--model", type=Path, help="model.onnx (default: build_default_model(), trained if absent)")
    parser.add_argument("--data", type=Path, default=ML100K, help="ML-100K folder (default ../shared/data)")
    parser.add_argument("--profile", dest="profile", action="store_true", default=None, help="py-spy a 1-worker run")
    parser.add_argument("--no-profile", dest="profile", action="store_false", help="skip the profiled run")


def run(args: argparse.Namespace) -> int:
    from export.onnx_export import build_default_model
    from models.data import load_dataset
    from streams.services import KAFKA_HEAP, free_port, kafka_version, start_broker, start_redis

    t_start = time.perf_counter()
    plan = Plan.make(args.quick)
    profile = (not plan.quick) if args.profile is None else args.profile
    out: Path = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    if args.model:
        model = args.model.resolve()
    elif plan.quick:
        model = build_default_model(out_dir="artifacts/models/bench-fast", fast=True)
    else:
        log("model: build_default_model() (trains once if absent)")
        model = build_default_model()
    ds = load_dataset("movielens-100k", args.data)
    bench = Bench(out=out, plan=plan, model=Path(model), data=args.data)
    run_dir = out / "logs" / "services"
    broker = start_broker(port=free_port(), run_dir=run_dir)
    rsvc = start_redis(port=free_port(), run_dir=run_dir)
    bench.bootstrap, bench.redis_base = broker.address, f"redis://{rsvc.address}"
    bench.service_pids = {"broker": broker.pid, "redis": rsvc.pid}
    meta: dict[str, Any] = {
        "when": time.strftime("%Y-%m-%d %H:%M:%S"),
        "cpus": os.cpu_count(),
        "loadavg": [round(x, 2) for x in os.getloadavg()],
        "python": platform.python_version(),
        "model": str(model),
        "broker": f"apache-kafka {kafka_version()} (KRaft, one node, heap {KAFKA_HEAP})",
        "producer_linger_ms": PRODUCER_LINGER_MS,
    }
    r: dict = {}
    try:
        product_events = list(looped_events(ds, plan.product_limit, plan.loops))
        n = len(product_events)
        env_src = bench.names("src")
        topic = env_src["INTEREST_INPUT_TOPIC"]
        meta["producer_eps"] = round(bench.prefill(env_src, product_events, n))

        r["noop"] = bench.faust_noop(topic, n)
        log(f"faust no-op: {r['noop']['eps']:,.0f} ev/s")
        r["raw"] = bench.aiokafka_raw(topic, n)
        log(f"aiokafka raw: {r['raw']['eps']:,.0f} ev/s")
        r["ort"] = bench.ort_step(product_events[: min(n, 40_000)], plan.ort_seconds)
        log(f"ORT step: {r['ort']['eps']:,.0f} ev/s")
        r["redis"] = bench.redis_pipeline(plan.redis_writes)
        log(f"Redis pipeline: {r['redis']['eps']:,.0f} writes/s")

        r["p1"] = bench.product(bench.names("p1", topic), n, 1, "product-1w")
        r["p2"] = bench.product(bench.names("p2", topic), n, 2, "product-2w")
        r["naive"] = bench.naive(topic, plan.naive_events)
        r["latency"] = bench.latency(ds, r["p1"]["eps"] / 2, plan.latency_seconds, plan.latency_warmup)
        r["floor"] = bench.latency_floor(ds, r["p1"]["eps"] / 2, plan.latency_seconds, plan.latency_warmup)
        r["faust_latency"] = bench.latency_faust(ds, r["p1"]["eps"] / 2, plan.latency_seconds, plan.latency_warmup)

        for tag, users in (("u1k", 1000), ("u1m", 1_000_000)):
            env = bench.names(tag)
            bench.prefill(env, scale_events(ds, plan.scale_events, users), plan.scale_events)
            r[tag] = bench.product(env, plan.scale_events, 1, f"users-{tag}")
        if profile:
            prof_path = out / "profile-1w.txt"
            prof_path.unlink(missing_ok=True)
            r["p1_profiled"] = bench.product(bench.names("prof", topic), n, 1, "product-1w-profiled", prof_path)
            if prof_path.is_file():
                r["profile"] = summarize_profile(prof_path) | {"file": prof_path.name}
    finally:
        stop_all(bench.procs, 10)
        broker.stop()
        rsvc.stop()

    meta["seconds"] = round(time.perf_counter() - t_start, 1)
    res = build_result(r, plan, meta)
    (out / "bench.json").write_text(json.dumps(res, indent=2, default=float))
    write_markdown(out / "bench.md", res)
    write_plot(out / "bench.png", res, r["latency"])
    log(f"done in {meta['seconds']:.0f}s: {out / 'bench.json'}, bench.md, bench.png")
    print(json.dumps({k: v for k, v in res.items() if k not in ("details", "profile", "meta")}, indent=2))
    return 0


def write_result(path: Path, out: dict) -> None:
    """A hidden subcommand's result, written whole (the bench waits for the file to appear)."""
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(out))
    tmp.replace(path)


# ---------------------------------------------------------------------------------------------------------------
# hidden subcommand: the Faust no-op agent (its own process, like the worker)


def noop_worker(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(prog="python -m streams.bench noop-worker")
    ap.add_argument("--bootstrap", required=True)
    ap.add_argument("--topic", required=True)
    ap.add_argument("--group", required=True)
    ap.add_argument("--expect", type=int, required=True)
    ap.add_argument("--result", type=Path, required=True)
    ap.add_argument("--max-batch", type=int, default=MAX_BATCH)
    ap.add_argument("--skip", type=int, default=0, help="with --latency: events not timed (the warm-up)")
    ap.add_argument("--latency", action="store_true", help="iterate stream.events() and time produce -> agent")
    a = ap.parse_args(argv)

    import faust

    from streams.app import faust_options
    from streams.settings import Settings

    defaults = Settings(
        kafka_bootstrap=a.bootstrap,
        app_id=a.group,
        max_batch=a.max_batch,
        session_timeout_s=float(SESSION_TIMEOUT_S),
        web_port=0,
        data_dir=a.result.parent,
    )
    sys.setswitchinterval(defaults.gil_switch_ms / 1000)  # as the worker
    app = faust.App(a.group, **faust_options(defaults))  # the worker's Faust configuration
    topic = app.topic(a.topic, key_serializer="raw", value_serializer="raw")
    state = {"n": 0, "batches": 0, "first": None, "first_batch": 0, "done": False}

    async def timed(stream):
        lat: list[float] = []
        seen = 0
        async for event in stream.events():
            seen += 1
            if seen > a.skip:
                lat.append(time.time() - event.message.timestamp)  # Faust's timestamp is in seconds
            if seen == a.skip:
                a.result.with_suffix(".ready").touch()
            if seen == a.expect:
                write_result(a.result, {"events": len(lat), "latency_ms": quantiles_ms(lat)})

    async def sink(stream):
        async for events in stream.take_events(a.max_batch, within=defaults.max_latency_ms / 1000):
            now = time.time()
            k = len(events)
            if state["first"] is None:
                state["first"], state["first_batch"] = now, k
            state["n"] += k
            state["batches"] += 1
            if state["n"] >= a.expect and not state["done"]:
                state["done"] = True
                out = {
                    "events": state["n"],
                    "batches": state["batches"],
                    "first": state["first"],
                    "first_batch": state["first_batch"],
                    "last": now,
                }
                write_result(a.result, out)

    app.agent(topic, name="sink")(timed if a.latency else sink)

    worker = faust.Worker(app, loglevel="warning", quiet=True, redirect_stdouts=False, override_logging=False)
    try:
        worker.execute_from_commandline()
    except SystemExit as exc:
        return int(exc.code or 0)
    return 0


# ---------------------------------------------------------------------------------------------------------------
# hidden subcommand: the transport floor's consumer (its own process, like the worker)


def floor_consumer(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(prog="python -m streams.bench floor-consumer")
    ap.add_argument("--bootstrap", required=True)
    ap.add_argument("--topic", required=True)
    ap.add_argument("--expect", type=int, required=True)
    ap.add_argument("--skip", type=int, default=0, help="events not timed (the warm-up)")
    ap.add_argument("--result", type=Path, required=True)
    a = ap.parse_args(argv)

    from aiokafka import AIOKafkaConsumer

    async def go() -> dict:
        c = AIOKafkaConsumer(
            a.topic,
            bootstrap_servers=a.bootstrap,
            auto_offset_reset="earliest",
            enable_auto_commit=False,
            fetch_max_wait_ms=1500,  # as the worker's consumer (Faust's)
            max_poll_records=MAX_BATCH,
        )
        await c.start()
        lat: list[float] = []
        seen = 0
        try:
            while seen < a.expect:
                for records in (await c.getmany(timeout_ms=1000)).values():
                    now = time.time()
                    lat.extend(now - rec.timestamp / 1e3 for rec in records[max(0, a.skip - seen) :])
                    seen += len(records)
                    if seen >= a.skip and not a.result.with_suffix(".ready").exists():
                        a.result.with_suffix(".ready").touch()
        finally:
            await c.stop()
        return {"events": len(lat), "latency_ms": quantiles_ms(lat)}

    write_result(a.result, asyncio.run(go()))
    return 0


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "noop-worker":
        sys.exit(noop_worker(sys.argv[2:]))
    if len(sys.argv) > 1 and sys.argv[1] == "floor-consumer":
        sys.exit(floor_consumer(sys.argv[2:]))
    from streams.cli import main

    sys.exit(main(["bench", *sys.argv[1:]]))
