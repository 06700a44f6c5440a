"""Baselines on the same targets as the LSTM: popularity, tuned decayed histogram, first-order Markov.

    python -m models.baselines --dataset movielens-100k --data ../shared/data/ml-100k   # prints their metrics

Each baseline returns per-user predictions (n, K) indexed by target j (row 0 unused), fitted on train
targets only; the decayed histogram's half-life and prior weight and the Markov smoothing are tuned on
validation targets by cross-entropy.
"""

from __future__ import annotations

import argparse
import json

import numpy as np

from models.data import add_dataset_arguments, load_dataset
from models.metrics import evaluate
from models.sequences import UserSequences, build_sequences
from models.vocab import build_vocabulary

HALF_LIVES = (1, 2, 3, 5, 8, 12, 20, 35, 60, 100, 1e9)  # events; 1e9 = plain (undecayed) history
PRIOR_WEIGHTS = (0.05, 0.1, 0.2, 0.35, 0.5, 0.75, 1.0, 1.5, 2.5, 4.0, 6.0, 10.0, 16.0)
MARKOV_SMOOTHING = (0.1, 0.3, 1.0, 3.0, 10.0, 30.0, 100.0, 300.0, 1000.0)


def popularity(seqs: UserSequences) -> np.ndarray:
    """(K,) mean of the train target vectors."""
    idx = seqs.targets("train")
    tot = sum(seqs.y(u)[i].sum(axis=0, dtype=np.float64) for u, i in enumerate(idx))
    pop = np.asarray(tot) + 1e-6
    return pop / pop.sum()


def predict_popularity(seqs: UserSequences, pop: np.ndarray) -> list[np.ndarray]:
    return [np.broadcast_to(pop, (len(xu), seqs.k)) for xu in seqs.x]


def decayed_histories(seqs: UserSequences, half_life: float) -> list[np.ndarray]:
    """Per user (n, K): row j = sum_{i<j} d^(j-1-i) y_i with d = 0.5 ** (1 / half_life)."""
    d = 0.5 ** (1.0 / half_life)
    out = []
    for u in range(len(seqs.users)):
        y = seqs.y(u).astype(np.float64)
        h = np.zeros_like(y)
        acc = np.zeros(seqs.k)
        for j in range(1, len(y)):
            acc = d * acc + y[j - 1]
            h[j] = acc
        out.append(h)
    return out


def predict_decayed(hist: list[np.ndarray], pop: np.ndarray, weight: float) -> list[np.ndarray]:
    """p = (hist + w * pop) / (sum hist + w)."""
    return [(h + weight * pop) / (h.sum(axis=1, keepdims=True) + weight) for h in hist]


def tune_decayed(seqs: UserSequences, pop: np.ndarray) -> tuple[dict, list[np.ndarray]]:
    best: tuple[float, dict, list[np.ndarray]] | None = None
    for hl in HALF_LIVES:
        hist = decayed_histories(seqs, hl)
        for w in PRIOR_WEIGHTS:
            preds = predict_decayed(hist, pop, w)
            ce = evaluate(*seqs.gather(preds, "val"))["ce"]
            if best is None or ce < best[0]:
                best = (ce, {"half_life": hl, "prior_weight": w}, preds)
    assert best is not None
    return best[1], best[2]


def markov_counts(seqs: UserSequences) -> np.ndarray:
    """(K, K) sum over train targets j of outer(y_{j-1}, y_j)."""
    t = np.zeros((seqs.k, seqs.k))
    for u, idx in enumerate(seqs.targets("train")):
        y = seqs.y(u).astype(np.float64)
        t += y[idx - 1].T @ y[idx]
    return t


def predict_markov(seqs: UserSequences, counts: np.ndarray, pop: np.ndarray, alpha: float) -> list[np.ndarray]:
    trans = (counts + alpha * pop) / (counts.sum(axis=1, keepdims=True) + alpha)
    out = []
    for u in range(len(seqs.users)):
        y = seqs.y(u).astype(np.float64)
        p = np.empty_like(y)
        p[0] = pop
        p[1:] = y[:-1] @ trans
        out.append(p)
    return out


def tune_markov(seqs: UserSequences, pop: np.ndarray) -> tuple[dict, list[np.ndarray]]:
    counts = markov_counts(seqs)
    best: tuple[float, dict, list[np.ndarray]] | None = None
    for a in MARKOV_SMOOTHING:
        preds = predict_markov(seqs, counts, pop, a)
        ce = evaluate(*seqs.gather(preds, "val"))["ce"]
        if best is None or ce < best[0]:
            best = (ce, {"smoothing": a}, preds)
    assert best is not None
    return best[1], best[2]


def run_baselines(seqs: UserSequences) -> tuple[dict[str, list[np.ndarray]], dict[str, dict]]:
    """-> (name -> per-user predictions, name -> tuned parameters)."""
    pop = popularity(seqs)
    dec_params, dec = tune_decayed(seqs, pop)
    mk_params, mk = tune_markov(seqs, pop)
    preds = {"popularity": predict_popularity(seqs, pop), "decayed_histogram": dec, "markov": mk}
    return preds, {"popularity": {}, "decayed_histogram": dec_params, "markov": mk_params}


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description="baseline metrics on the fixed protocol")
    add_dataset_arguments(ap)
    ap.add_argument("--top-k", type=int, default=100)
    a = ap.parse_args()
    ds = load_dataset(a.dataset, a.data, a.items)
    seqs = build_sequences(ds, build_vocabulary(ds, a.top_k))
    preds, params = run_baselines(seqs)
    for name, p in preds.items():
        print(name, params[name], json.dumps({s: evaluate(*seqs.gather(p, s)) for s in ("val", "test")}))
