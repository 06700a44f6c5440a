"""Category and action vocabularies: the top-K category cut (plus "other") and the action list.

    python -m models.vocab --dataset taobao --data ../shared/data/taobao-userbehavior-sample --top-k 100

The raw catalog stays raw; the vocabulary maps every raw category of the catalog to one of the K output
categories. Categories are ranked by how many events they appear in (ties by name), counting only each user's first
floor(0.8 n) events (the protocol's train prefix: which categories the cut keeps must not depend on validation or
test events); when there are more than `top_k` of them, the rest share the last output category "other".
"""

from __future__ import annotations

import argparse
from collections import Counter
from dataclasses import dataclass

from models.data import Dataset, add_dataset_arguments, load_dataset
from models.errors import ConfigError

OTHER = "other"


@dataclass(frozen=True)
class Vocabulary:
    categories: list[str]  # the K output categories (ends with "other" after a cut)
    category_index: dict[str, int]  # every raw category in the catalog -> output index
    actions: list[str]  # action vocabulary, sorted
    default_action: str  # the most frequent action; used for events without one

    def to_dict(self) -> dict:
        return {
            "categories": self.categories,
            "category_index": self.category_index,
            "actions": self.actions,
            "default_action": self.default_action,
        }

    @classmethod
    def from_dict(cls, d: dict) -> Vocabulary:
        return cls(list(d["categories"]), dict(d["category_index"]), list(d["actions"]), d["default_action"])


def build_vocabulary(ds: Dataset, top_k: int = 100) -> Vocabulary:
    if top_k < 2:
        raise ConfigError(f"--top-k must be at least 2, got {top_k}")
    freq: Counter[str] = Counter()
    for evs in ds.by_user().values():
        for e in evs[: (8 * len(evs)) // 10]:  # the train prefix (models.sequences.split_bounds)
            freq.update(ds.catalog[e.item_id])
    raw = {c for cs in ds.catalog.values() for c in cs}
    ranked = sorted(raw, key=lambda c: (-freq.get(c, 0), c))
    if len(ranked) <= top_k:
        categories = ranked
        index = {c: i for i, c in enumerate(ranked)}
    else:
        kept = ranked[:top_k]
        categories = [*kept, OTHER]
        index = {c: top_k for c in ranked}
        index.update({c: i for i, c in enumerate(kept)})
    acts = Counter(e.action for e in ds.events if e.action)
    actions = sorted(acts) or ["event"]
    default = max(actions, key=lambda a: (acts.get(a, 0), a == actions[0]))
    return Vocabulary(categories, index, actions, default)


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description="print a data set's vocabulary")
    add_dataset_arguments(ap)
    ap.add_argument("--top-k", type=int, default=100)
    a = ap.parse_args()
    v = build_vocabulary(load_dataset(a.dataset, a.data, a.items), a.top_k)
    print(f"K={len(v.categories)} categories:", v.categories)
    print("actions:", v.actions, "default:", v.default_action)
