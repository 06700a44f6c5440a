"""``interest-stream bench``: the order of the measurements and the services they run on."""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path
from typing import Any

from models.data import ML100K
from streams.bench.backfill import Backfills
from streams.bench.ceilings import Ceilings
from streams.bench.cluster import ClusterJobs
from streams.bench.common import Plan, log, stop_all
from streams.bench.latency import Latencies
from streams.bench.product import Products
from streams.bench.profile import summarize_profile
from streams.bench.report import build_result, write_markdown, write_plot
from streams.bench.workloads import PRODUCER_LINGER_MS, looped_events, scale_events


class Bench(Ceilings, Products, Latencies, Backfills, ClusterJobs):
    """Every measurement, on the processes and names of one run."""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", type=Path, required=True, help="folder for bench.json, bench.md, bench.png, logs")
    parser.add_argument("--quick", action="store_true", help="small event counts: a smoke run in < 3 minutes")
    parser.add_argument("--model", type=Path, help="model.onnx (default: build_default_model(), trained if absent)")
    parser.add_argument("--data", type=Path, default=ML100K, help="ML-100K folder (default ../shared/data)")
    parser.add_argument("--profile", dest="profile", action="store_true", default=None, help="py-spy a 1-worker run")
    parser.add_argument("--no-profile", dest="profile", action="store_false", help="skip the profiled run")
    parser.add_argument(
        "--keep-data", action="store_true", help="keep the broker's and Redis' data under OUT/logs (~2 GB a full run)"
    )


def drop_data(run_dir: Path) -> int:
    """Remove what the services stored (Kafka's log segments, Redis' AOF and RDB) below ``run_dir``, keeping their
    logs and configs: a full run's topics hold ~2 GB that no report reads. Returns the bytes freed."""
    import shutil

    freed = 0
    stored = [*run_dir.glob("**/kafka-*/data"), *run_dir.glob("**/redis-*/appendonlydir"), *run_dir.glob("**/*.rdb")]
    for path in stored:
        files = [path] if path.is_file() else [f for f in path.rglob("*") if f.is_file()]
        freed += sum(f.stat().st_size for f in files)
        if path.is_dir():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)
    return freed


def run(args: argparse.Namespace) -> int:
    from export.onnx_export import build_default_model
    from models.data import load_dataset
    from streams.local.cluster import start_redis_cluster
    from streams.local.services import KAFKA_HEAP, free_port, kafka_version, start_broker, start_redis

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
    # a replica of the single Redis, for its WAIT 1 run, and the 3+3 cluster, both beside it for the whole run
    replica = start_redis(port=free_port(), run_dir=run_dir, extra=["--replicaof", "127.0.0.1", str(rsvc.port)])
    cluster = start_redis_cluster(run_dir=run_dir / "cluster")
    bench.bootstrap, bench.redis_base = broker.address, f"redis://{rsvc.address}"
    bench.cluster_url = cluster.url
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
        r["quix"] = bench.quix_noop(topic, n)
        log(f"quix streams no-op: {r['quix']['eps']:,.0f} ev/s")
        r["raw"] = bench.aiokafka_raw(topic, n)
        log(f"aiokafka raw: {r['raw']['eps']:,.0f} ev/s")
        r["ort"] = bench.ort_step(product_events[: min(n, 40_000)], plan.ort_seconds)
        log(f"ORT step: {r['ort']['eps']:,.0f} ev/s")
        r["redis"] = bench.redis_pipeline(plan.redis_writes)
        log(f"Redis pipeline: {r['redis']['eps']:,.0f} writes/s")

        r["p1"] = bench.product(bench.names("p1", topic), n, 1, "product-1w")
        r["p2"] = bench.product(bench.names("p2", topic), n, 2, "product-2w")
        per_event = bench.names("pe", topic) | {"INTEREST_BATCH_PATH": "false"}
        r["p1_events"] = bench.product(per_event, n, 1, "product-1w-event-path")
        # not a target figure: the targets are the default contract's (a record per applied event)
        user_mode = bench.names("pu", topic) | {"INTEREST_OUTPUT_MODE": "user"}
        r["p1_user_mode"] = bench.product(user_mode, n, 1, "product-1w-user-mode")
        r["backfill"] = bench.backfill(ds, plan.quick)
        r["user_bytes"] = bench.user_bytes()
        r["naive"] = bench.naive(topic, plan.naive_events)
        r["latency"] = bench.latency(ds, r["p1"]["eps"] / 2, plan.latency_seconds, plan.latency_warmup)
        r["floor"] = bench.latency_floor(ds, r["p1"]["eps"] / 2, plan.latency_seconds, plan.latency_warmup)
        r["faust_latency"] = bench.latency_faust(ds, r["p1"]["eps"] / 2, plan.latency_seconds, plan.latency_warmup)
        r |= bench.cluster_runs(topic, n, ds, r["p1"]["eps"] / 2, plan.latency_seconds, plan.latency_warmup)

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
        cluster.stop()
        replica.stop()
        rsvc.stop()
        if not args.keep_data:
            log(f"removed the services' data: {drop_data(run_dir) / 1e6:,.0f} MB (--keep-data keeps it)")

    meta["seconds"] = round(time.perf_counter() - t_start, 1)
    res = build_result(r, plan, meta)
    (out / "bench.json").write_text(json.dumps(res, indent=2, default=float))
    write_markdown(out / "bench.md", res)
    write_plot(out / "bench.png", res, r["latency"])
    log(f"done in {meta['seconds']:.0f}s: {out / 'bench.json'}, bench.md, bench.png")
    print(json.dumps({k: v for k, v in res.items() if k not in ("details", "profile", "meta")}, indent=2))
    return 0
