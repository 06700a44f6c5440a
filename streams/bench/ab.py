"""Settings A/B on shared services: one broker, one Redis, one pre-filled topic, each variant in turn (a warm-up run
first, so the broker's JIT is not charged to the first variant). Only ratios within one invocation compare.

    python -m streams.bench ab product '[{"tag": "b2k", "INTEREST_MAX_BATCH": "2000"}, {"tag": "b5k"}]'
    python -m streams.bench ab latency '[{"tag": "b2k", "INTEREST_MAX_BATCH": "2000"}, {"tag": "b5k"}]' --rate 19000
    python -m streams.bench ab backfill '[{"tag": "one"}, {"tag": "two"}]'
    python -m streams.bench ab idle '[{"tag": "a"}, {"tag": "b", "INTEREST_FETCH_MAX_WAIT_MS": "500"}]'  # no events
    python -m streams.bench ab product '[{"tag": "a"}]' --users 1000000      # the users-scale stream (run.py's u1m)
    python -m streams.bench ab product '[{"tag": "a"}]' --profile             # py-spy each variant's worker
    python -m streams.bench ab latency '[{"tag": "a"}]' --rate 5000 --profile # ... over the paced window

Each variant is a tag and INTEREST_* overrides for the worker (or the backfill); prints a line per variant and writes
``ab.json`` in --out. ``--loops N`` runs N passes of ML-100K a variant (product: 2, 200,000 events): effects under the
run-to-run noise of ~15 % need more (6 and three alternations of each variant measured a 23 % step)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from models.data import ML100K, load_dataset
from streams.bench.common import Plan, log, stop_all
from streams.bench.profile import summarize_profile
from streams.bench.run import Bench, drop_data
from streams.bench.workloads import looped_events, scale_events


def ab(argv: list[str]) -> int:
    from export.onnx_export import build_default_model
    from streams.local.services import free_port, start_broker, start_redis

    ap = argparse.ArgumentParser(prog="python -m streams.bench ab", description=__doc__.splitlines()[0])
    ap.add_argument("job", choices=("product", "latency", "backfill", "idle"))
    ap.add_argument("variants", type=json.loads, help='JSON list of {"tag": ..., "INTEREST_...": ...}')
    ap.add_argument("--rate", type=float, default=14_000.0, help="events/s offered (latency)")
    ap.add_argument("--out", type=Path, default=Path("artifacts/bench-ab"))
    ap.add_argument("--loops", type=int, help="passes over ML-100K a run (product 2, backfill 10)")
    ap.add_argument("--users", type=int, help="product: the users-scale stream, ids hashed into this many users")
    ap.add_argument("--profile", action="store_true", help="py-spy each variant's worker (profile-TAG.txt)")
    a = ap.parse_args(argv)
    if a.users is not None and a.job != "product":
        ap.error("--users applies to the product job only")
    if a.profile and a.job not in ("product", "latency"):
        ap.error("--profile applies to the product and latency jobs")
    out = a.out.resolve()
    (out / "logs").mkdir(parents=True, exist_ok=True)
    ds = load_dataset("movielens-100k", ML100K)
    bench = Bench(out=out, plan=Plan.make(False), model=Path(build_default_model()), data=ML100K)
    broker = start_broker(port=free_port(), run_dir=out / "logs" / "services")
    redis = start_redis(port=free_port(), run_dir=out / "logs" / "services")
    bench.bootstrap, bench.redis_base = broker.address, f"redis://{redis.address}"
    bench.service_pids = {"broker": broker.pid, "redis": redis.pid}
    results: dict[str, dict] = {}
    try:
        loops = a.loops or (10 if a.job == "backfill" else 2)
        src = bench.names("src")
        topic = src["INTEREST_INPUT_TOPIC"]
        total = loops * len(ds.events)
        if a.job == "product" and a.users:
            bench.prefill(src, scale_events(ds, total, a.users), total)
        elif a.job in ("product", "backfill"):
            bench.prefill(src, looped_events(ds, loops=loops), total)
        for v in [{"tag": "warm-up"}, *a.variants]:
            env = dict(v)
            tag = env.pop("tag")
            prof = out / f"profile-{tag}.txt" if a.profile and tag != "warm-up" else None
            if a.job == "product":
                r = bench.product(bench.names(tag[:8], topic) | env, total, 1, f"ab-{tag}", prof)
            elif a.job == "latency":
                r = bench.latency(ds, a.rate, bench.plan.latency_seconds, bench.plan.latency_warmup, tag, prof, **env)
            elif a.job == "idle":
                r = bench.idle(bench.names(tag[:8]) | env, bench.plan.latency_seconds, f"ab-idle-{tag}")
            else:
                name = f"backfill-{tag}"
                r = bench.run_backfill(bench.names(tag[:8], topic) | env, out / f"{name}.json", name)
                log(f"backfill {tag}: {r['eps']:,.0f} ev/s")
            if prof is not None and prof.exists():
                r["profile"] = summarize_profile(prof)
            results[tag] = r
            shown = ("eps", "redis_ms", "generator_ack_ms", "stages_ms", "cpu_pct")
            print(tag, json.dumps({k: r[k] for k in shown if k in r}), flush=True)
    finally:
        stop_all(bench.procs, 10)
        broker.stop()
        redis.stop()
        drop_data(out / "logs" / "services")  # the topics' ~1-2 GB; the services' logs stay
    (out / "ab.json").write_text(json.dumps(results, indent=1, default=float))
    return 0
