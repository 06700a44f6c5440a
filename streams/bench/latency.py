"""Latency (4) at an offered rate: the worker, the transport floor, Faust alone; produce -> Redis and -> output."""

from __future__ import annotations

import itertools
import json
import subprocess
import time
from collections.abc import Iterable
from pathlib import Path

from models.errors import ServiceError
from streams.bench.common import log, stop_all, wait_for
from streams.bench.cpu import CpuUse
from streams.bench.harness import BenchRun
from streams.bench.histograms import quantiles_ms, window_quantiles_ms
from streams.bench.profile import start_py_spy, stop_py_spy
from streams.bench.workloads import looped_events, paced_send
from streams.local.services import metric_total


class Latencies(BenchRun):
    # ---- 4: latency ------------------------------------------------------------------------------------------------
    def latency(
        self,
        ds,
        rate: float,
        seconds: float,
        warmup: int,
        tag: str = "lat",
        profile: Path | None = None,
        **worker_env: str,
    ) -> dict:
        import orjson
        from kafka import KafkaConsumer

        from streams.core.metrics import BATCH_STAGES
        from streams.kafka import ensure_topics

        env = self.names(tag) | worker_env
        settings = self.settings(env)
        ensure_topics(settings)
        n = max(500, int(rate * seconds))
        events = looped_events(ds, loops=2 + (n + warmup) // len(ds.events))
        worker = self.start_worker(env, f"latency-{tag}")
        topic = settings.input_topic
        sent_at: dict[str, float] = {}
        spy: subprocess.Popen | None = None
        acked: list[float] = []  # send -> the broker's acknowledgement, seconds: the load generator's own delay
        try:
            self.wait_ready([worker])
            # warm: group joined, model and caches warm
            paced_send(self.bootstrap, topic, itertools.islice(events, warmup), None)
            applied = lambda: metric_total(worker.samples(), "interest_events_applied_total")  # noqa: E731
            wait_for(lambda: applied() >= warmup, 120, "the latency warm-up")
            before = worker.samples()
            if profile is not None:  # the paced window only: the warm-up's burst is another workload
                spy = start_py_spy(worker.proc.pid, profile, self.logs / f"latency-{tag}-py-spy.log")
            with CpuUse([worker.proc.pid], self.service_pids) as cpu:
                offered = paced_send(self.bootstrap, topic, itertools.islice(events, n), rate, sent_at, acked)
                wait_for(lambda: applied() >= warmup + n, 120 + n / 1000, "the latency run")
            after = worker.samples()
        finally:
            stop_py_spy(spy)
            stop_all([worker.proc])
        rekeyed = metric_total(after, "interest_rekeyed_total")
        if rekeyed:  # the generator partitions as Java does: a re-keyed event means it did not, and doubles the work
            raise ServiceError(f"the latency run's worker re-keyed {rekeyed:.0f} events: check the load generator")
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
            "generator_ack_ms": quantiles_ms(acked),
            "output_samples": len(out_lat),
            "cpu_pct": cpu.result,
            "output_cdf_ms": [round(out_lat[int(i * (len(out_lat) - 1) / 200)] * 1e3, 3) for i in range(201)]
            if out_lat
            else [],
        }
        log(f"latency at {offered:,.0f} ev/s: to Redis {redis_q}, to output {result['output_ms']}; CPU {cpu.result}")
        log(f"  the load generator's send -> acknowledgement: {result['generator_ack_ms']}")
        log("  per batch: " + ", ".join(f"{k} p50 {v['p50']} p99 {v['p99']} ms" for k, v in stages.items()))
        return result

    def idle(self, env: dict[str, str], seconds: float, name: str) -> dict:
        """A worker that owns its partitions and gets no events: its fetch loop's cost alone, over ``seconds``
        (the worker, its step process, the broker and Redis, in % of one core)."""
        worker = self.start_worker(env, name)
        try:
            self.wait_ready([worker])
            owned = lambda: metric_total(worker.samples(), "interest_partitions_assigned")  # noqa: E731
            wait_for(lambda: owned() > 0, 120, f"{name}: partitions assigned")
            with CpuUse([worker.proc.pid], self.service_pids) as cpu:
                time.sleep(seconds)  # the window measured: nothing is waited for
        finally:
            stop_all([worker.proc])
        log(f"{name}: idle for {seconds:.0f}s: CPU {cpu.result}")
        return {"seconds": seconds, "cpu_pct": cpu.result}

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
