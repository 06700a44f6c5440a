"""Shared fixtures for the model and export tests (importable by other test packages too).

    python -m pytest tests/models tests/export

`trained_model` trains a small ML-100K model once per session (a few epochs, ~30 s on 2 cores) and exports it;
`write_csv_dataset` writes a small generic-format data set with a learnable pattern.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

from models.data import ML100K, SHARED_DATA

REPO = Path(__file__).resolve().parents[1]
TAOBAO = SHARED_DATA / "taobao-userbehavior-sample"


def write_csv_dataset(folder: Path, users: int = 24, events: int = 40, seed: int = 0) -> tuple[Path, Path]:
    """events.csv (user_id,item_id,ts,action; ISO and epoch times mixed) + items.csv; -> their paths.

    Each user mostly stays within a favourite group of categories, so history beats popularity.
    """
    rng = np.random.default_rng(seed)
    cats = [f"c{i}" for i in range(8)]
    items = {f"i{j}": [cats[j % 8]] + ([cats[(j + 1) % 8]] if j % 5 == 0 else []) for j in range(40)}
    folder.mkdir(parents=True, exist_ok=True)
    ipath, epath = folder / "items.csv", folder / "events.csv"
    ipath.write_text("item_id,categories\n" + "".join(f"{i},{'|'.join(c)}\n" for i, c in items.items()))
    rows = ["user_id,item_id,ts,action"]
    for u in range(users):
        fav = rng.integers(0, 8)
        t = 1_600_000_000 + int(rng.integers(0, 10_000))
        for _ in range(events):
            t += int(rng.exponential(600))
            g = fav if rng.random() < 0.7 else rng.integers(0, 8)
            item = f"i{g + 8 * rng.integers(0, 5)}"
            action = rng.choice(["view", "view", "view", "buy"])
            ts = str(t) if u % 2 else np.datetime_as_string(np.datetime64(t, "s")) + "Z"
            rows.append(f"u{u},{item},{ts},{action}")
    epath.write_text("\n".join(rows) + "\n")
    return epath, ipath


@pytest.fixture(scope="session")
def trained_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """model.onnx of a small model trained on ML-100K and exported (model.pt, report.json beside it); or, where
    ``INTEREST_TEST_MODEL`` names one, that exported model (the slim worker install has no torch to train with)."""
    given = os.environ.get("INTEREST_TEST_MODEL")
    if given:
        if not Path(given).is_file():
            pytest.fail(f"INTEREST_TEST_MODEL={given} is not a file")
        return Path(given)
    if not ML100K.is_dir():
        pytest.skip(f"real data not found at {ML100K}")
    from export.onnx_export import build_default_model

    # one folder per session: tests/models and tests/export each register this fixture (two conftests),
    # and build_default_model skips training and export when the files are already there
    return build_default_model(tmp_path_factory.getbasetemp() / "trained-ml100k", ML100K, fast=True)
