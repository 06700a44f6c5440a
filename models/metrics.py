"""Evaluation metrics over stacked predictions P (N, K) and normalised target vectors Y (N, K).

    python -m pytest tests/models/test_metrics.py   # hand-computed cases

ce: mean of -sum_k y_k log max(p_k, 1e-9) (nats); top3_mass: mean of sum of y over the top-3 of p;
precision@3, recall@3, f1@3: over the sets top-3(p) and {k : y_k > 0}, averaged per target (f1 = 0 when
the intersection is empty); accuracy@1: argmax p is one of the target's categories.
Top-3 ties are broken by the lower category index (stable sort).
"""

from __future__ import annotations

import numpy as np

EPS = 1e-9
METRICS = ("ce", "top3_mass", "precision@3", "recall@3", "f1@3", "accuracy@1")


def top_k_indices(p: np.ndarray, k: int = 3) -> np.ndarray:
    """(N, K) -> (N, min(k, K)) indices of the k largest, descending; ties -> lower index first."""
    return np.argsort(-p, axis=1, kind="stable")[:, :k]


def evaluate(p: np.ndarray, y: np.ndarray) -> dict[str, float]:
    """All METRICS as plain floats; empty input -> nan for every metric."""
    p = np.asarray(p, dtype=np.float64)
    y = np.asarray(y, dtype=np.float64)
    if len(p) == 0:
        return {m: float("nan") for m in METRICS}
    ce = -(y * np.log(np.maximum(p, EPS))).sum(axis=1)
    top = top_k_indices(p, 3)
    rows = np.arange(len(p))[:, None]
    mass = y[rows, top].sum(axis=1)
    relevant = y > 0
    hits = relevant[rows, top].sum(axis=1)
    n_rel = relevant.sum(axis=1)
    prec = hits / top.shape[1]
    rec = hits / np.maximum(n_rel, 1)
    f1 = np.where(hits > 0, 2 * prec * rec / np.maximum(prec + rec, EPS), 0.0)
    acc = relevant[np.arange(len(p)), top[:, 0]]
    vals = (ce, mass, prec, rec, f1, acc)
    return {m: float(np.mean(v)) for m, v in zip(METRICS, vals, strict=True)}
