"""The product (2 and 5: workers over the pre-filled topic, users scale) and the naive design (3)."""

from __future__ import annotations

import asyncio
import contextlib
import time
from pathlib import Path

from models.errors import ServiceError
from streams.bench.common import log, start_store, stop_all
from streams.bench.cpu import CpuUse
from streams.bench.harness import BenchRun
from streams.bench.profile import start_py_spy, stop_py_spy
from streams.local.services import metric_total


def run_rate(n: int, a_first: float, t_zero: float, t_first: float, t_last: float) -> tuple[float, float, bool]:
    """Events/s of a run of ``n`` events from the harness's scrapes: ``t_zero`` the last that saw none applied,
    ``t_first`` the first that saw some (``a_first``), ``t_last`` the one that saw all. Returns (events/s, seconds,
    whether it was timed from ``t_zero``).

    Timed from ``t_first`` without the events it saw, so start-up is not charged; but where most of the run was
    applied by then (a short run, a fast machine: one or two fetches), that window is too short to time, so all ``n``
    are timed from ``t_zero``, a lower bound that includes up to one poll interval."""
    if n - a_first >= n / 2:
        seconds = max(t_last - t_first, 1e-9)
        return (n - a_first) / seconds, seconds, False
    seconds = max(t_last - t_zero, 1e-9)
    return n / seconds, seconds, True


class Products(BenchRun):
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
            t_zero = time.perf_counter()  # the last scrape that saw nothing applied
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
                    if applied == 0:
                        t_zero = now
                    elif t_first is None:
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
                    # before the first event, 20 Hz: a short run (the quick bench's 20,000 events on a fast machine)
                    # can otherwise be applied whole between two scrapes, leaving no window to time
                    time.sleep(min(1.0, max(0.05, (n - applied) / rate / 4)) if rate > 0 else 0.05)
            final = [w.samples() for w in procs]
        finally:
            stop_py_spy(spy)
            stop_all([w.proc for w in procs])
        assert t_first is not None and t_last is not None  # the loop ends only once both are set
        eps, seconds, from_zero = run_rate(n, a_first, t_zero, t_first, t_last)
        if from_zero:
            log(f"{name}: {a_first:,.0f} of {n:,} events applied by the first scrape: timed from the last empty one")
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
            from streams.core.processor import InterestProcessor, RawMessage
            from streams.core.state import StateStore

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
                    msg = RawMessage(rec.topic, rec.partition, rec.offset, rec.key, rec.value, rec.timestamp)
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
