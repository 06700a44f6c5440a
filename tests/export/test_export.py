import argparse
import csv
import hashlib
import math
from pathlib import Path

import numpy as np
import onnx
import pytest

from export.onnx_export import add_arguments, check_parity, export_checkpoint, run
from export.runtime import StepSession
from models.checkpoint import load_checkpoint
from models.errors import ModelError
from models.features import META_PREFIX, ModelMeta


@pytest.fixture(scope="module")
def model_and_ckpt(trained_model: Path):
    return load_checkpoint(trained_model.with_name("model.pt"))


@pytest.mark.parametrize("batch", [1, 7, 512])
def test_parity_onnx_steps_vs_pytorch_sequence(trained_model: Path, model_and_ckpt, batch: int, capsys):
    model, ckpt = model_and_ckpt
    res = check_parity(model, trained_model, ckpt, batches=(batch,), length=50)
    assert {f"random batch={batch}", f"real batch={batch}"} <= set(res)
    assert res["max"] <= 1e-5, res
    assert "max |dp|" in capsys.readouterr().out


def test_graph_and_metadata(trained_model: Path, model_and_ckpt):
    model, ckpt = model_and_ckpt
    proto = onnx.load(str(trained_model))
    assert [i.name for i in proto.graph.input] == ["features", "h", "c"]
    assert [o.name for o in proto.graph.output] == ["probs", "h_next", "c_next"]
    assert proto.graph.input[0].type.tensor_type.shape.dim[0].dim_param == "batch"
    props = {p.key: p.value for p in proto.metadata_props}
    meta = ModelMeta.from_onnx_metadata(props)
    assert meta.version == ckpt["version"] and meta.version.startswith("movielens-100k-")
    assert len(meta.categories) == 19 and len(meta.category_index) == 19
    assert meta.actions == ["1", "2", "3", "4", "5"]
    assert meta.hidden_size == model.cfg.state_size and meta.h0.shape == (meta.hidden_size,)
    assert abs(float(meta.prior.sum()) - 1) < 1e-5
    bad = dict(props)
    del bad[META_PREFIX + "categories"]
    with pytest.raises(ModelError, match=r"lacks interest_stream\.categories"):
        ModelMeta.from_onnx_metadata(bad)
    with pytest.raises(ModelError, match="not valid JSON"):
        ModelMeta.from_onnx_metadata({**props, META_PREFIX + "h0": "[1, 2"})
    with pytest.raises(ModelError, match="h0"):
        ModelMeta.from_onnx_metadata({**props, META_PREFIX + "h0": "[1, 2]"})


def test_catalog_written_with_sha(trained_model: Path):
    path = trained_model.with_name("catalog.csv")
    meta = ModelMeta.from_onnx_metadata({p.key: p.value for p in onnx.load(str(trained_model)).metadata_props})
    assert hashlib.sha256(path.read_bytes()).hexdigest() == meta.catalog_sha256
    rows = list(csv.reader(path.open()))
    assert rows[0] == ["item_id", "categories"] and len(rows) == 1 + 1682
    assert dict(rows[1:])["1"] == "Animation|Children's|Comedy"


def test_export_cli(trained_model: Path, tmp_path: Path, capsys):
    ap = argparse.ArgumentParser()
    add_arguments(ap)
    out = tmp_path / "m.onnx"
    assert run(ap.parse_args(["--checkpoint", str(trained_model.with_name("model.pt")), "--out", str(out)])) == 0
    text = capsys.readouterr().out
    assert "parity max |dp|" in text and out.is_file() and (tmp_path / "catalog.csv").is_file()
    with pytest.raises(ModelError, match="not found"):
        run(ap.parse_args(["--checkpoint", str(tmp_path / "none.pt")]))


def test_build_default_model_re_exports_without_the_sequence_graph(trained_model: Path, tmp_path: Path):
    """A model folder exported before model.seq.onnx existed gets it on the next build (the demo's path)."""
    import shutil

    from export.onnx_export import build_default_model
    from export.sequence import sequence_path

    for name in ("model.pt", "model.onnx", "catalog.csv"):
        shutil.copy2(trained_model.with_name(name), tmp_path / name)
    assert not sequence_path(tmp_path / "model.onnx").exists()
    assert build_default_model(out_dir=tmp_path) == tmp_path / "model.onnx"
    assert sequence_path(tmp_path / "model.onnx").is_file()
    assert (tmp_path / "model.onnx").stat().st_mtime >= (tmp_path / "model.pt").stat().st_mtime


def _nan_probs_from(monkeypatch, t_nan: int) -> None:
    """StepSession.step returns NaN probabilities from its t_nan-th call on (a broken graph or provider)."""
    real, calls = StepSession.step, [0]

    def step(self, x, h, c):
        p, hn, cn = real(self, x, h, c)
        calls[0] += 1
        return (p * np.nan if calls[0] > t_nan else p), hn, cn

    monkeypatch.setattr(StepSession, "step", step)


def test_parity_counts_nan_as_a_failure(trained_model: Path, model_and_ckpt, monkeypatch, tmp_path: Path):
    """Python's max(0.0, nan) is 0.0: a NaN output must not pass the parity check."""
    model, ckpt = model_and_ckpt
    _nan_probs_from(monkeypatch, t_nan=3)
    res = check_parity(model, trained_model, ckpt, batches=(1,), length=8, verbose=False)
    assert res["random batch=1"] == math.inf and res["max"] == math.inf
    assert res["sequence random batch=1"] <= 1e-5  # the sequence graph does not go through step()
    with pytest.raises(ModelError, match=r"parity failed: max \|dp\| = inf"):
        export_checkpoint(trained_model.with_name("model.pt"), tmp_path / "m.onnx", verbose=False)
    assert (tmp_path / "m.onnx.failed").is_file() and not (tmp_path / "m.onnx").exists()


def test_parity_without_long_enough_users_says_so(trained_model: Path, model_and_ckpt, capsys):
    model, ckpt = model_and_ckpt
    res = check_parity(model, trained_model, ckpt, batches=(1,), length=50, verbose=False)
    assert res["real_users"] > 0 and "real batch=1" in res
    short = {**ckpt, "parity_users": [u[:10] for u in ckpt["parity_users"]]}
    res = check_parity(model, trained_model, short, batches=(1,), length=50)
    assert res["real_users"] == 0 and "real batch=1" not in res and "random batch=1" in res
    assert res["max"] <= 1e-5
    assert "no user in the checkpoint has >= 50 events; only random sequences are checked" in capsys.readouterr().out
