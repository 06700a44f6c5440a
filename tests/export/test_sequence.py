"""The Scan-over-time sequence graph equals the step graph applied round by round."""

from __future__ import annotations

import numpy as np
import onnx
import pytest

from export.runtime import StepSession
from export.sequence import SequenceSession, sequence_model


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
