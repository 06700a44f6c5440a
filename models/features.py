"""The step model's input layout: model metadata and the per-event feature encoder.

    python -m models.features --model artifacts/models/movielens-100k/model.onnx   # prints the metadata

One event becomes one float32 row of n_features = K + A + 2 values:

    [0, K)        the item's category vector: multi-hot over the K output categories, normalised to sum 1
    [K, K+A)      the action, one-hot over the A actions (the model embeds it with a linear layer)
    K+A           log1p(gap seconds) / GAP_LOG_SCALE, 0 for a user's first event
    K+A+1         1.0 for a user's first event (no previous event), else 0.0

Training (models/train.py), the ONNX parity check, the offline replay and the stream worker all build
features with `encode_events`/`FeatureEncoder.encode`, so they agree bit for bit.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from models.errors import ModelError

GAP_LOG_SCALE = 16.0  # log1p(one year in seconds) ~ 17.3, so the gap feature stays in [0, ~1.1]
N_TIME_FEATURES = 2
META_PREFIX = "interest_stream."
FORMAT_VERSION = "1"


def encode_events(
    cat_indices: np.ndarray, cat_offsets: np.ndarray, actions: np.ndarray, gaps: np.ndarray, k: int, a: int
) -> np.ndarray:
    """Vectorised encoder on flat arrays -> float32 (N, k + a + 2).

    cat_indices: int64 (M,) the category indices of all events, concatenated;
    cat_offsets: int64 (N+1,) event i owns cat_indices[cat_offsets[i]:cat_offsets[i+1]] (at least one);
    actions: int64 (N,); gaps: float64 (N,) seconds since the user's previous event, nan for a first event.
    """
    n = len(actions)
    x = np.zeros((n, k + a + N_TIME_FEATURES), dtype=np.float32)
    counts = np.diff(cat_offsets)
    if n and counts.min() < 1:
        raise ValueError("every event needs at least one category")
    rows = np.repeat(np.arange(n), counts)
    x[rows, cat_indices] = 1.0  # multi-hot: duplicates count once
    x[:, :k] /= x[:, :k].sum(axis=1, keepdims=True)
    x[np.arange(n), k + np.asarray(actions, dtype=np.int64)] = 1.0
    g = np.asarray(gaps, dtype=np.float64)
    first = np.isnan(g)
    g = np.where(first, 0.0, np.maximum(g, 0.0))
    x[:, k + a] = (np.log1p(g) / GAP_LOG_SCALE).astype(np.float32)
    x[:, k + a + 1] = first.astype(np.float32)
    return x


def _as_f32(v: object, name: str, size: int) -> np.ndarray:
    arr = np.asarray(v, dtype=np.float32)
    if arr.shape != (size,):
        raise ModelError(f"model metadata {META_PREFIX}{name}: expected {size} values, got shape {arr.shape}")
    return arr


@dataclass(frozen=True)
class ModelMeta:
    version: str  # e.g. "movielens-100k-3f2a9c1d" (hash of weights + config)
    categories: list[str]  # the K output category names (may end with "other")
    category_index: dict[str, int]  # every raw category seen in training data -> output index
    actions: list[str]  # action vocabulary
    default_action: str  # used when an event carries no action
    hidden_size: int  # size of h and of c (per ensemble member: LSTM units + category memory slots)
    n_features: int
    h0: np.ndarray  # (H,) float32 learned initial state
    c0: np.ndarray  # (H,) float32
    prior: np.ndarray  # (K,) float32 cold-start distribution (the head applied to h0, c0)
    dataset: str
    gap_log_scale: float = GAP_LOG_SCALE
    catalog_sha256: str = ""  # sha256 of catalog.csv written beside model.onnx
    format_version: str = FORMAT_VERSION
    extra: dict = field(default_factory=dict)  # model config and data summary, informative only

    def to_onnx_metadata(self) -> dict[str, str]:
        vals = {
            "format_version": self.format_version,
            "version": self.version,
            "categories": self.categories,
            "category_index": self.category_index,
            "actions": self.actions,
            "default_action": self.default_action,
            "hidden_size": self.hidden_size,
            "n_features": self.n_features,
            "h0": [float(v) for v in self.h0],
            "c0": [float(v) for v in self.c0],
            "prior": [float(v) for v in self.prior],
            "dataset": self.dataset,
            "gap_log_scale": self.gap_log_scale,
            "catalog_sha256": self.catalog_sha256,
            "extra": self.extra,
        }
        return {META_PREFIX + k: json.dumps(v) for k, v in vals.items()}

    @classmethod
    def from_onnx_metadata(cls, props: dict[str, str]) -> ModelMeta:
        """Parse the `interest_stream.*` metadata_props; ModelError on missing or bad keys."""

        def get(key: str) -> object:
            if META_PREFIX + key not in props:
                raise ModelError(f"not an interest-stream model: ONNX metadata lacks {META_PREFIX}{key}")
            try:
                return json.loads(props[META_PREFIX + key])
            except json.JSONDecodeError as e:
                raise ModelError(f"model metadata {META_PREFIX}{key} is not valid JSON: {e}") from None

        fmt = get("format_version")
        if fmt != FORMAT_VERSION:
            raise ModelError(f"model metadata format {fmt!r} is not supported (want {FORMAT_VERSION!r})")
        try:
            categories = [str(c) for c in get("categories")]  # type: ignore[union-attr]
            actions = [str(a) for a in get("actions")]  # type: ignore[union-attr]
            k, hidden = len(categories), int(get("hidden_size"))  # type: ignore[arg-type]
            index = {str(r): int(i) for r, i in get("category_index").items()}  # type: ignore[union-attr]
            meta = cls(
                version=str(get("version")),
                categories=categories,
                category_index=index,
                actions=actions,
                default_action=str(get("default_action")),
                hidden_size=hidden,
                n_features=int(get("n_features")),  # type: ignore[arg-type]
                h0=_as_f32(get("h0"), "h0", hidden),
                c0=_as_f32(get("c0"), "c0", hidden),
                prior=_as_f32(get("prior"), "prior", k),
                dataset=str(get("dataset")),
                gap_log_scale=float(get("gap_log_scale")),  # type: ignore[arg-type]
                catalog_sha256=str(get("catalog_sha256")),
                extra=dict(get("extra")),  # type: ignore[arg-type]
            )
        except ModelError:
            raise
        except (TypeError, ValueError, AttributeError) as e:
            raise ModelError(f"model metadata is malformed: {e}") from None
        if meta.n_features != k + len(actions) + N_TIME_FEATURES:
            raise ModelError(f"model metadata: n_features {meta.n_features} != K + A + {N_TIME_FEATURES}")
        if meta.default_action not in actions or any(not 0 <= i < k for i in index.values()):
            raise ModelError("model metadata: default_action or category_index out of the vocabulary")
        if meta.gap_log_scale != GAP_LOG_SCALE:
            raise ModelError(f"model gap_log_scale {meta.gap_log_scale} differs from this code's {GAP_LOG_SCALE}")
        return meta


class FeatureEncoder:
    """Maps raw categories/actions to indices and encodes batches of events into feature rows."""

    def __init__(self, meta: ModelMeta):
        self.meta = meta
        self.k = len(meta.categories)
        self.a = len(meta.actions)
        self._cat = meta.category_index
        self._act = {a: i for i, a in enumerate(meta.actions)}
        self._default = self._act[meta.default_action]

    def category_indices(self, raw: Sequence[str]) -> tuple[int, ...]:
        """Raw category names -> output indices (KeyError(raw_name) for an unknown one)."""
        return tuple(self._cat[r] for r in raw)

    def action_index(self, action: str | None) -> int:
        """None/"" -> the default action; KeyError for an unknown action."""
        if not action:
            return self._default
        return self._act[action]

    def encode(
        self, categories: Sequence[Sequence[int]], actions: Sequence[int] | np.ndarray, gaps: np.ndarray
    ) -> np.ndarray:
        """-> float32 (N, n_features); see the module docstring for the layout."""
        lengths = np.fromiter((len(c) for c in categories), dtype=np.int64, count=len(categories))
        offsets = np.zeros(len(lengths) + 1, dtype=np.int64)
        np.cumsum(lengths, out=offsets[1:])
        flat = np.fromiter((i for c in categories for i in c), dtype=np.int64, count=int(offsets[-1]))
        if flat.size and (flat.min() < 0 or flat.max() >= self.k):
            raise ValueError(f"category index out of range [0, {self.k})")
        return encode_events(flat, offsets, np.asarray(actions, dtype=np.int64), gaps, self.k, self.a)


if __name__ == "__main__":
    import onnx

    ap = argparse.ArgumentParser(description="print an exported model's metadata")
    ap.add_argument("--model", required=True)
    m = onnx.load(ap.parse_args().model)
    meta = ModelMeta.from_onnx_metadata({p.key: p.value for p in m.metadata_props})
    print(meta.version, meta.dataset, f"K={len(meta.categories)} A={len(meta.actions)} H={meta.hidden_size}")
    print("categories:", meta.categories)
    print("prior:", np.round(meta.prior, 4).tolist())
