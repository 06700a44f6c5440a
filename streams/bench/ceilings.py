"""Ceilings (1a-1d): the Faust no-op agent, a raw aiokafka consumer, the ONNX step alone, Redis pipelined writes."""

from __future__ import annotations

import asyncio
import json
import os
import time
from collections import Counter

from models.errors import ServiceError
from streams.bench.common import MAX_BATCH, start_store, stop_all, wait_for
from streams.bench.harness import BenchRun


class Ceilings(BenchRun):
    def no_op(self, command: str, tag: str, topic: str, n: int, what: str) -> dict:
        """Run a hidden no-op subcommand (``python -m streams.bench COMMAND``) over ``n`` events; its result file."""
        result = self.logs / f"{tag}-result.json"
        result.unlink(missing_ok=True)
        args = ("--topic", topic, "--group", f"bench-{self.run_id}-{tag}", "--expect", str(n), "--result", str(result))
        proc = self.spawn(command, *args)
        try:
            wait_for(lambda: result.is_file() or proc.poll() is not None, 60 + n / 2000, what, 0.2)
        finally:
            stop_all([proc], 10)
        if not result.is_file():
            raise ServiceError(f"{what} failed; see {self.logs / f'{command}.log'}")
        return json.loads(result.read_text())

    # ---- 1a: Faust no-op -------------------------------------------------------------------------------------------
    def faust_noop(self, topic: str, n: int) -> dict:
        r = self.no_op("noop-worker", "noop", topic, n, "the Faust no-op agent")
        eps = (r["events"] - r["first_batch"]) / max(r["last"] - r["first"], 1e-9)
        return {"eps": eps, "events": r["events"], "seconds": r["last"] - r["first"], "batches": r["batches"]}

    # ---- 1a': the peer framework: a Quix Streams no-op application --------------------------------------------------
    def quix_noop(self, topic: str, n: int) -> dict:
        r = self.no_op("quix-noop", "quix", topic, n, "the Quix Streams no-op")
        return {"eps": (r["events"] - 1) / max(r["last"] - r["first"], 1e-9), "events": r["events"]}

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
        from streams.core.stepping import BatchStepper

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
    def redis_pipeline(self, total: int, **env_extra: str) -> dict:
        import numpy as np
        import orjson

        from streams.core.state import StateStore, UserState, UserWrite, encode_state

        env = self.names("redis") | env_extra
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
