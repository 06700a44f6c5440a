"""bench.json, bench.md and bench.png from one run's measurements."""

from __future__ import annotations

from pathlib import Path

from streams.bench.common import MAX_BATCH, TARGETS, Plan


def ratio(a: float, b: float) -> float:
    return round(a / b, 3) if b else float("nan")


def build_result(r: dict, plan: Plan, meta: dict) -> dict:
    lat = r["latency"]
    out = {
        "faust_noop_eps": round(r["noop"]["eps"]),
        "quix_noop_eps": round(r["quix"]["eps"]),
        "aiokafka_raw_eps": round(r["raw"]["eps"]),
        "ort_step_eps": round(r["ort"]["eps"]),
        "redis_pipeline_eps": round(r["redis"]["eps"]),
        "product_eps_1w": round(r["p1"]["eps"]),
        "product_eps_2w": round(r["p2"]["eps"]),
        "product_eps_1w_event_path": round(r["p1_events"]["eps"]),
        "product_eps_1w_user_mode": round(r["p1_user_mode"]["eps"]),
        "naive_eps": round(r["naive"]["eps"], 1),
        "backfill_eps": round(r["backfill"]["eps"]),
        "backfill_split_s": r["backfill"]["split_s"],
        "latency_ms": lat["redis_ms"],
        "latency_output_ms": lat["output_ms"],
        "latency_generator_ack_ms": lat["generator_ack_ms"],
        "latency_offered_eps": round(lat["offered_eps"]),
        "latency_transport_ms": r["floor"]["consumed_ms"],
        "latency_faust_ms": r["faust_latency"]["agent_ms"],
        "latency_cpu_pct": lat["cpu_pct"],
        "latency_stages_ms": lat["stages_ms"],
        "latency_output_ms_halves": lat["output_ms_halves"],
        "product_cpu_pct_1w": r["p1"]["cpu_pct"],
        "worker_events_per_cpu_s": round(r["p1"]["worker_events_per_cpu_s"]),
        "worker_events_per_cpu_s_event_path": round(r["p1_events"]["worker_events_per_cpu_s"]),
        "users_1k_eps": round(r["u1k"]["eps"]),
        "users_1m_eps": round(r["u1m"]["eps"]),
        "rss_mb": max(r["u1m"]["rss_mb"]),
        "redis_bytes_per_user": round(r["u1m"]["redis_bytes_per_user"]),
        "cluster_product_eps_1w": round(r["p1_cluster"]["eps"]),
        "cluster_wait1_product_eps_1w": round(r["p1_cluster_wait1"]["eps"]),
        "wait1_product_eps_1w": round(r["p1_wait1"]["eps"]),
        "cluster_redis_pipeline_eps": round(r["redis_cluster"]["eps"]),
        "cluster_latency_ms": r["latency_cluster"]["redis_ms"],
        "cluster_wait1_latency_ms": r["latency_cluster_wait1"]["redis_ms"],
        "user_bytes": r["user_bytes"],
        "ratios": {
            "product_vs_noop": ratio(r["p1"]["eps"], r["noop"]["eps"]),
            "product_vs_quix": ratio(r["p1"]["eps"], r["quix"]["eps"]),
            "batch_vs_event_path": ratio(r["p1"]["eps"], r["p1_events"]["eps"]),
            "user_mode_vs_quix": ratio(r["p1_user_mode"]["eps"], r["quix"]["eps"]),
            "product_vs_naive": ratio(r["p1"]["eps"], r["naive"]["eps"]),
            "users_1m_vs_1k": ratio(r["u1m"]["eps"], r["u1k"]["eps"]),
            "product_2w_vs_1w": ratio(r["p2"]["eps"], r["p1"]["eps"]),
            "product_vs_aiokafka_raw": ratio(r["p1"]["eps"], r["raw"]["eps"]),
            "backfill_vs_product": ratio(r["backfill"]["eps"], r["p1"]["eps"]),
            "cluster_vs_single": ratio(r["p1_cluster"]["eps"], r["p1"]["eps"]),
            "cluster_wait1_vs_wait0": ratio(r["p1_cluster_wait1"]["eps"], r["p1_cluster"]["eps"]),
            "single_wait1_vs_wait0": ratio(r["p1_wait1"]["eps"], r["p1"]["eps"]),
        },
    }
    ratios = out["ratios"]
    out["targets"] = {
        "product_vs_noop >= 3": ratios["product_vs_noop"] >= TARGETS["product_vs_noop"],
        "product_vs_quix >= 0.5": ratios["product_vs_quix"] >= TARGETS["product_vs_quix"],
        "product_vs_naive >= 30": ratios["product_vs_naive"] >= TARGETS["product_vs_naive"],
        "latency p99 produce->Redis <= 50 ms": lat["redis_ms"]["p99"] <= TARGETS["latency_p99_ms"],
        "users_1m_vs_1k >= 0.8": ratios["users_1m_vs_1k"] >= TARGETS["users_1m_vs_1k"],
        "backfill_vs_product >= 10": ratios["backfill_vs_product"] >= TARGETS["backfill_vs_product"],
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
    cpu, pcpu, ack = res["latency_cpu_pct"], res["product_cpu_pct_1w"], res["latency_generator_ack_ms"]
    rows = [
        ("Faust no-op agent, take_events(2000)", f"{res['faust_noop_eps']:,}", f"{d['noop']['events']:,} events"),
        ("Quix Streams no-op application", f"{res['quix_noop_eps']:,}", f"{d['quix']['events']:,} events"),
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
        (
            "product, 1 worker, Faust's per-event path",
            f"{res['product_eps_1w_event_path']:,}",
            f"INTEREST_BATCH_PATH=false; {res['worker_events_per_cpu_s_event_path']:,} events per worker CPU-s",
        ),
        (
            "product, 1 worker, a record per user and batch",
            f"{res['product_eps_1w_user_mode']:,}",
            f"INTEREST_OUTPUT_MODE=user: {res['ratios']['user_mode_vs_quix']:.0%} of Quix (not a target figure)",
        ),
        ("naive (per event ORT + Redis + awaited send)", f"{res['naive_eps']:,}", f"{d['naive']['events']:,} events"),
        ("product, 1,000 users", f"{res['users_1k_eps']:,}", f"{d['u1k']['redis_keys']:,} keys"),
        ("product, 1,000,000-id space", f"{res['users_1m_eps']:,}", f"{d['u1m']['redis_keys']:,} distinct users"),
        ("product, 1 worker, single Redis, WAIT 1", f"{res['wait1_product_eps_1w']:,}", "one replica"),
        ("product, 1 worker, 3-master Redis Cluster", f"{res['cluster_product_eps_1w']:,}", "3 masters + 3 replicas"),
        ("product, 1 worker, Redis Cluster, WAIT 1", f"{res['cluster_wait1_product_eps_1w']:,}", "WAIT per master"),
        ("StateStore.write on the cluster", f"{res['cluster_redis_pipeline_eps']:,}", "writes/s, per-master rounds"),
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
        f"{res['latency_output_ms_halves'][0]['p99']} ms, second half {res['latency_output_ms_halves'][1]['p99']} ms. "
        f"The paced producer's own send -> acknowledgement p50 {ack['p50']} / p99 {ack['p99']} ms (what of the "
        "latency is the load generator's).",
        "",
        f"CPU during the 1-worker product run (from its start to the last applied event, % of one core): worker and "
        f"step process {pcpu.get('worker')}, the broker {pcpu.get('broker')}, Redis {pcpu.get('redis')}: "
        f"{res['worker_events_per_cpu_s']:,} events per CPU-second of the worker's processes.",
        "",
        f"Memory at the 1M-id run: worker RSS (with its step process) {res['rss_mb']} MB, "
        f"Redis {res['redis_bytes_per_user']:,} B/user "
        f"(~{res['redis_bytes_per_user'] * 1e6 / 2**30:.1f} GiB for 1M users).",
        "",
        f"Redis Cluster (3 masters + 3 replicas, loopback) at the same offered rate: produce -> Redis p50 "
        f"{res['cluster_latency_ms']['p50']} / p99 {res['cluster_latency_ms']['p99']} ms; with WAIT 1 p50 "
        f"{res['cluster_wait1_latency_ms']['p50']} / p99 {res['cluster_wait1_latency_ms']['p99']} ms.",
        "",
        "Bytes per user (`MEMORY USAGE`, field lengths by `HSTRLEN`): "
        + "; ".join(
            f"{u} ({b['events']} events, {b['encoding']}) {b['memory_usage']:,} B: "
            + ", ".join(f"{f} {n}" for f, n in b["field_bytes"].items())
            for u, b in ((u, res["user_bytes"][u]) for u in ("light", "heavy"))
        )
        + ".",
        "",
        "## Targets",
        "",
        "| target | measured | result |",
        "|---|---:|---|",
        f"| product_eps_1w >= 3x faust_noop_eps | {r['product_vs_noop']:.2f}x | {mark[t['product_vs_noop >= 3']]} |",
        f"| product_eps_1w >= 50% of quix_noop_eps | {r['product_vs_quix']:.0%} | "
        f"{mark[t['product_vs_quix >= 0.5']]} |",
        f"| product / naive >= 30 | {r['product_vs_naive']:.1f}x | {mark[t['product_vs_naive >= 30']]} |",
        f"| p99 produce->Redis <= 50 ms at half max | {lat['p99']} ms (transport alone {tr['p99']} ms, "
        f"Faust alone {fa['p99']} ms) | "
        f"{mark[t['latency p99 produce->Redis <= 50 ms']]} |",
        f"| users_1m / users_1k >= 0.8 | {r['users_1m_vs_1k']:.2f} | {mark[t['users_1m_vs_1k >= 0.8']]} |",
        f"| backfill / product_1w >= 10 | {r['backfill_vs_product']:.1f}x ({res['backfill_eps']:,} ev/s; read, step, "
        f"write s: {res['backfill_split_s']}) | {mark[t['backfill_vs_product >= 10']]} |",
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
        ("Quix no-op", res["quix_noop_eps"]),
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
    colors = ["#999"] * 5 + ["#1f77b4"] * 2 + ["#d62728"] + ["#2ca02c"] * 2
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
