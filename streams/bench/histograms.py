"""Quantiles from Prometheus histograms (the worker's /metrics), the way Prometheus computes them."""

from __future__ import annotations

import re


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
