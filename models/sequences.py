"""Per-user event sequences as arrays, and the fixed evaluation protocol's target splits.

    python -m models.sequences --dataset movielens-100k --data ../shared/data/ml-100k   # prints split sizes

Protocol: for a user with n events (time order, ties by file order), predicting event j (1 <= j < n) from
events 0..j-1 is a train target if j < floor(0.8 n), validation if floor(0.8 n) <= j < floor(0.9 n), and
test if j >= floor(0.9 n). The target is event j's normalised category vector. Predictions are indexed
by target: P[j] is the distribution predicted for event j (P[0] is the cold-start prior).
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass

import numpy as np

from models.data import Dataset, add_dataset_arguments, load_dataset
from models.features import encode_events
from models.vocab import Vocabulary, build_vocabulary

SPLITS = ("train", "val", "test")


def split_bounds(n: int) -> tuple[int, int]:
    """-> (floor(0.8 n), floor(0.9 n)) computed exactly in integers."""
    return (8 * n) // 10, (9 * n) // 10


@dataclass
class UserSequences:
    users: list[str]
    x: list[np.ndarray]  # per user float32 (n, F) event features
    ts: list[np.ndarray]  # per user float64 (n,) event times
    k: int  # number of output categories
    n_actions: int

    def y(self, u: int) -> np.ndarray:
        """float32 (n, K) the normalised category vectors of user u's events (the targets)."""
        return self.x[u][:, : self.k]

    def targets(self, split: str) -> list[np.ndarray]:
        """Per user the target indices j of a split (train, val, test); j >= 1 always."""
        out = []
        for xu in self.x:
            n = len(xu)
            a, b = split_bounds(n)
            lo, hi = {"train": (1, a), "val": (a, b), "test": (b, n)}[split]
            out.append(np.arange(max(lo, 1), max(hi, 1), dtype=np.int64))
        return out

    def gather(self, preds: list[np.ndarray], split: str) -> tuple[np.ndarray, np.ndarray]:
        """Per-user predictions (n, K) -> stacked (P, Y) over the split's targets."""
        idx = self.targets(split)
        p = np.concatenate([pu[i] for pu, i in zip(preds, idx, strict=True)])
        y = np.concatenate([self.y(u)[i] for u, i in enumerate(idx)])
        return p, y


def build_sequences(ds: Dataset, vocab: Vocabulary) -> UserSequences:
    by_user = ds.by_user()
    users = list(by_user)
    act = {a: i for i, a in enumerate(vocab.actions)}
    default = act[vocab.default_action]
    flat: list[int] = []
    offsets = [0]
    actions, gaps, tss = [], [], []
    for evs in by_user.values():
        prev = None
        for e in evs:
            cats = dict.fromkeys(vocab.category_index[c] for c in ds.catalog[e.item_id])
            flat.extend(cats)
            offsets.append(len(flat))
            actions.append(act[e.action] if e.action else default)
            gaps.append(np.nan if prev is None else e.ts - prev)
            tss.append(e.ts)
            prev = e.ts
    k, a = len(vocab.categories), len(vocab.actions)
    x = encode_events(
        np.asarray(flat, np.int64), np.asarray(offsets, np.int64), np.asarray(actions), np.asarray(gaps), k, a
    )
    cuts = np.cumsum([len(v) for v in by_user.values()])[:-1]
    ts = np.asarray(tss, np.float64)
    return UserSequences(users, np.split(x, cuts), np.split(ts, cuts), k, a)


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description="print the protocol's split sizes")
    add_dataset_arguments(ap)
    ap.add_argument("--top-k", type=int, default=100)
    a = ap.parse_args()
    ds = load_dataset(a.dataset, a.data, a.items)
    seqs = build_sequences(ds, build_vocabulary(ds, a.top_k))
    for s in SPLITS:
        print(s, sum(len(t) for t in seqs.targets(s)))
