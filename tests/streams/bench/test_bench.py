"""``interest-stream bench --quick`` runs end to end and writes well-formed results (figures are not judged).

python -m pytest tests/streams/bench/test_bench.py -m slow
"""

from __future__ import annotations

import json
import math
import subprocess
import sys

import pytest

from tests.conftest import REPO

pytestmark = [pytest.mark.slow, pytest.mark.integration]

NUMBERS = (
    "faust_noop_eps",
    "quix_noop_eps",
    "aiokafka_raw_eps",
    "ort_step_eps",
    "redis_pipeline_eps",
    "product_eps_1w",
    "product_eps_2w",
    "product_eps_1w_event_path",
    "product_eps_1w_user_mode",
    "naive_eps",
    "users_1k_eps",
    "users_1m_eps",
    "rss_mb",
    "redis_bytes_per_user",
    "latency_offered_eps",
    "worker_events_per_cpu_s",
    "worker_events_per_cpu_s_event_path",
    "backfill_eps",
)
QUANTILES = ("latency_ms", "latency_output_ms", "latency_generator_ack_ms", "latency_transport_ms", "latency_faust_ms")
RATIOS = (
    "product_vs_noop",
    "product_vs_quix",
    "batch_vs_event_path",
    "user_mode_vs_quix",
    "product_vs_naive",
    "users_1m_vs_1k",
    "backfill_vs_product",
)


def _positive(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value) and value > 0


@pytest.mark.timeout(600)
def test_quick_bench_writes_complete_results(tmp_path, data_dir, trained_model):
    out = tmp_path / "bench"
    cmd = [sys.executable, "-m", "streams.cli", "bench", "--out", str(out), "--quick", "--model", str(trained_model)]
    cmd += ["--data", str(data_dir / "ml-100k")]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=540)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]

    res = json.loads((out / "bench.json").read_text())
    for key in NUMBERS:
        assert _positive(res.get(key)), f"{key}: {res.get(key)!r}"
    for key in QUANTILES:
        q = res[key]
        assert all(_positive(q[p]) for p in ("p50", "p95", "p99")), f"{key}: {q}"
        assert q["p50"] <= q["p95"] <= q["p99"]
    stages = res["latency_stages_ms"]
    assert set(stages) == {"consume", "collect", "step", "write"}
    for stage, q in stages.items():  # per batch, from the worker's interest_batch_stage_seconds
        assert all(_positive(q[p]) for p in ("p50", "p99")) and q["p50"] <= q["p99"], f"{stage}: {q}"
    cpu = res["latency_cpu_pct"]
    assert all(_positive(cpu[k]) for k in ("machine", "worker", "worker_faust", "step_process", "load_generator")), cpu
    assert cpu["worker"] == pytest.approx(cpu["worker_faust"] + cpu["step_process"], abs=0.2)
    assert all(_positive(cpu[k]) for k in ("broker", "redis")), cpu
    halves = res["latency_output_ms_halves"]  # produce -> output by send time: the run's first and second half
    assert len(halves) == 2 and all(_positive(h["p99"]) for h in halves), halves
    assert cpu["machine"] <= 100 * cpu["cores"] + 5  # % of one core, at most all cores (+ sampling slack)
    for key in RATIOS:
        assert _positive(res["ratios"][key]), f"ratios.{key}"
    product_cpu = res["product_cpu_pct_1w"]
    assert all(_positive(product_cpu[k]) for k in ("worker", "broker", "redis")), product_cpu
    assert res["meta"]["broker"].startswith("apache-kafka 4.1")
    assert set(res["targets"]) and all(isinstance(v, bool) for v in res["targets"].values())
    assert "| target |" in (out / "bench.md").read_text()
    assert (out / "bench.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    services = out / "logs" / "services"
    assert list(services.glob("broker-*.log")) and list(services.glob("redis-*.log")), "the services' logs are kept"
    assert not list(services.glob("**/kafka-*/data")), "the broker's log segments are removed after the run"


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["latency", "[]", "--users", "1000"], "--users applies to the product job only"),
        (["backfill", "[]", "--profile"], "--profile applies to the product and latency jobs"),
    ],
)
def test_ab_rejects_options_of_another_job(args, message):
    """Caught before any service starts: an option the job would ignore is an error, not a silent no-op."""
    proc = subprocess.run(
        [sys.executable, "-m", "streams.bench", "ab", *args], cwd=REPO, capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == 2
    assert message in proc.stderr


def test_a_run_applied_whole_before_the_first_scrape_is_still_timed():
    """The quick bench's 20,000-event users run on a fast machine was applied between two scrapes: timing it from the
    first scrape that saw events left 0 events in 0 s, and the bench reported 0 events/s."""
    from streams.bench.product import run_rate

    eps, seconds, from_zero = run_rate(200_000, 2_000, t_zero=10.0, t_first=10.5, t_last=15.5)
    assert (eps, seconds, from_zero) == (198_000 / 5.0, 5.0, False)  # start-up and the first fetch not charged

    eps, seconds, from_zero = run_rate(20_000, 20_000, t_zero=10.0, t_first=10.4, t_last=10.4)
    assert from_zero and seconds == pytest.approx(0.4) and eps == pytest.approx(50_000)

    eps, _, from_zero = run_rate(20_000, 15_000, t_zero=10.0, t_first=10.3, t_last=10.4)
    assert from_zero and eps == pytest.approx(50_000)  # 5,000 events in 0.1 s would be a fetch, not a rate
