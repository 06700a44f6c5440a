"""The Scan-over-time sequence graphs (unpacked, as exported, and the wrapped step graph) equal the step graph
applied round by round."""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch

from export.onnx_export import build_meta, export_onnx, export_sequence_onnx
from export.runtime import StepSession
from export.sequence import SequenceSession, sequence_model, sequence_path
from models.model import InterestModel, ModelConfig


@pytest.fixture(scope="module")
def sessions(trained_model):
    step = StepSession(trained_model, device="cpu", intra_op_threads=1)
    return step, SequenceSession(step, intra_op_threads=1)


def _features(step: StepSession, n: int, rng: np.random.Generator) -> np.ndarray:
    k, a = step.encoder.k, step.encoder.a
    cats = [tuple(rng.choice(k, size=rng.integers(1, 4), replace=False)) for _ in range(n)]
    gaps = rng.exponential(3600.0, n)
    gaps[rng.random(n) < 0.1] = np.nan  # some first events
    return step.encoder.encode(cats, rng.integers(0, a, n), gaps)


@pytest.mark.parametrize(("batch", "steps"), [(1, 60), (7, 20), (33, 3)])
def test_sequence_matches_step_by_step(sessions, batch: int, steps: int) -> None:
    step, seq = sessions
    assert seq.kind == "unpacked" and seq.path == sequence_path(step.path)  # the export wrote model.seq.onnx
    _assert_matches_steps(step, seq, batch, steps)


def _assert_matches_steps(step: StepSession, seq: SequenceSession, batch: int, steps: int) -> None:
    rng = np.random.default_rng(batch * 1000 + steps)
    x = _features(step, batch * steps, rng).reshape(batch, steps, -1)
    lengths = rng.integers(1, steps + 1, batch)
    lengths[0] = steps
    mask = np.arange(steps)[None, :] < lengths[:, None]
    h, c = step.initial_state(batch)
    h += rng.normal(0, 0.1, h.shape).astype(np.float32)  # not only cold starts
    p_seq, h_seq, c_seq = seq.run(x, mask, h, c)
    assert p_seq.shape == (batch, steps, len(step.meta.categories))
    for t in range(steps):
        rows = np.flatnonzero(mask[:, t])
        p, h[rows], c[rows] = step.step(x[rows, t], h[rows], c[rows])
        assert np.abs(p - p_seq[rows, t]).max() <= 1e-6
    # a padded position leaves the state alone: the final state is each user's state after its own last event
    assert np.abs(h - h_seq).max() <= 1e-6 and np.abs(c - c_seq).max() <= 1e-6


def test_sequence_model_refuses_a_graph_that_is_not_a_step(trained_model) -> None:
    m = onnx.load(str(trained_model))
    m.graph.output[0].name = "something_else"
    with pytest.raises(ValueError, match="not a step graph"):
        sequence_model(m)


def _wrapped_falls_back(folder: Path, trained_model: Path) -> StepSession:
    for name in ("model.onnx", "catalog.csv"):
        shutil.copy(trained_model.with_name(name), folder / name)
    return StepSession(folder / "model.onnx", device="cpu", intra_op_threads=1)


def test_without_a_sequence_file_the_step_graph_is_wrapped(trained_model, tmp_path, caplog) -> None:
    step = _wrapped_falls_back(tmp_path, trained_model)
    seq = SequenceSession(step, intra_op_threads=1)
    assert seq.kind == "wrapped" and seq.path == step.path
    _assert_matches_steps(step, seq, 5, 12)
    # another model's sequence graph, or a corrupt one, is not used: a warning, and the wrapped graph
    other = onnx.load(str(sequence_path(trained_model)))
    for p in other.metadata_props:
        if p.key == "interest_stream.version":
            p.value = '"movielens-100k-00000000"'
    onnx.save(other, str(sequence_path(step.path)))
    with caplog.at_level(logging.WARNING, logger="export.sequence"):
        assert SequenceSession(step, intra_op_threads=1).kind == "wrapped"
    assert "is for model movielens-100k-00000000" in caplog.text
    renamed = onnx.load(str(sequence_path(trained_model)))  # the right model, the wrong signature
    renamed.graph.output[0].name = "probs"
    for node in renamed.graph.node:
        node.output[:] = ["probs" if x == "seq_probs" else x for x in node.output]
    onnx.save(renamed, str(sequence_path(step.path)))
    with caplog.at_level(logging.WARNING, logger="export.sequence"):
        assert SequenceSession(step, intra_op_threads=1).kind == "wrapped"
    assert "has inputs" in caplog.text and "'probs'" in caplog.text
    sequence_path(step.path).write_bytes(b"not onnx")
    with caplog.at_level(logging.WARNING, logger="export.sequence"):
        assert SequenceSession(step, intra_op_threads=1).kind == "wrapped"
    assert "not loadable" in caplog.text


@pytest.mark.parametrize(
    ("members", "head_hidden", "drift", "memory"),
    [(1, 0, True, True), (3, 0, True, True), (2, 8, True, True), (1, 0, False, True), (1, 0, True, False)],
)
def test_exported_sequence_graph_for_other_configs(
    trained_model, tmp_path, members: int, head_hidden: int, drift: bool, memory: bool
) -> None:
    """Ensembles, the MLP memory head and no drift export an unpacked graph equal to their step graph; a model
    without memories exports none (the worker wraps its step graph)."""
    from models.checkpoint import load_checkpoint

    _, ckpt = load_checkpoint(trained_model.with_name("model.pt"))
    torch.manual_seed(members)
    cfg = ModelConfig(n_categories=19, n_actions=5, hidden_size=8, n_members=members, head_hidden=head_hidden)
    cfg.state_drift, cfg.memory = drift, memory
    model = InterestModel(cfg)
    with torch.no_grad():
        for p in model.parameters():  # trained weights are not the zero-initialised ones
            p.normal_(0, 0.5)
    model.eval()
    meta = build_meta(model, {**ckpt, "version": "movielens-100k-test"}, "")
    shutil.copy(trained_model.with_name("catalog.csv"), tmp_path / "catalog.csv")
    export_onnx(model, meta, tmp_path / "model.onnx")
    assert export_sequence_onnx(model, meta, sequence_path(tmp_path / "model.onnx")) == memory
    step = StepSession(tmp_path / "model.onnx", device="cpu", intra_op_threads=1)
    seq = SequenceSession(step, intra_op_threads=1)
    assert seq.kind == ("unpacked" if memory else "wrapped")
    _assert_matches_steps(step, seq, 6, 15)
