"""Many steps in one ONNX Runtime call: the exported step graph wrapped in an ONNX ``Scan`` over time.

    python -m export.sequence --model artifacts/models/movielens-100k/model.onnx   # parity and speed vs step()

The stream worker steps every user of a batch in order. Round by round (one ``step`` call per round) a user with 100
events in a batch costs 100 calls, each paying ORT's fixed per-call cost and, in a thread, a GIL hand-over. The
sequence graph runs a (B, T) block of events in one call, with the GIL released throughout:

    inputs   features (B, T, F) float32, mask (B, T, 1) bool, h (B, H), c (B, H)
    outputs  probs (B, T, K), h_next (B, H), c_next (B, H)

Its body is the step graph itself (same nodes, same weights), followed by ``h = where(mask_t, h_next, h)`` (the same
for c), so a padded position (mask False) leaves the state as it was and its probs row is ignored. Nothing is stored:
it is built in memory from ``model.onnx`` when a worker starts, so the shipped contract stays the one-step graph.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper

from export.runtime import CUDA, INPUTS, OUTPUTS, StepSession, _session_options


def sequence_model(step: onnx.ModelProto) -> onnx.ModelProto:
    """The Scan-over-time graph around ``step`` (inputs features, h, c -> outputs probs, h_next, c_next)."""
    g = step.graph
    names_in = [i.name for i in g.input if i.name not in {t.name for t in g.initializer}]
    names_out = [o.name for o in g.output]
    if names_in != list(INPUTS) or names_out != list(OUTPUTS):
        raise ValueError(f"not a step graph: inputs {names_in}, outputs {names_out}")
    by_name = {i.name: i for i in g.input}
    f_dim = by_name["features"].type.tensor_type.shape.dim[1].dim_value
    h_dim = by_name["h"].type.tensor_type.shape.dim[1].dim_value
    k_dim = g.output[0].type.tensor_type.shape.dim[1].dim_value

    def vi(name: str, elem: int, shape: list) -> onnx.ValueInfoProto:
        return helper.make_tensor_value_info(name, elem, shape)

    # body: state (h, c), scan inputs (features_t, mask_t) -> state (h_out, c_out), scan output probs_t
    body = helper.make_graph(
        nodes=[
            *g.node,
            helper.make_node("Where", ["mask_t", "h_next", "h"], ["h_out"]),
            helper.make_node("Where", ["mask_t", "c_next", "c"], ["c_out"]),
        ],
        name="step_body",
        inputs=[
            vi("h", TensorProto.FLOAT, ["B", h_dim]),
            vi("c", TensorProto.FLOAT, ["B", h_dim]),
            vi("features", TensorProto.FLOAT, ["B", f_dim]),
            vi("mask_t", TensorProto.BOOL, ["B", 1]),
        ],
        outputs=[
            vi("h_out", TensorProto.FLOAT, ["B", h_dim]),
            vi("c_out", TensorProto.FLOAT, ["B", h_dim]),
            vi("probs", TensorProto.FLOAT, ["B", k_dim]),
        ],
        initializer=list(g.initializer),
    )
    scan = helper.make_node(
        "Scan",
        ["h0", "c0", "seq_features", "seq_mask"],
        ["h_final", "c_final", "seq_probs"],
        body=body,
        num_scan_inputs=2,
        scan_input_axes=[1, 1],
        scan_output_axes=[1],
    )
    outer = helper.make_graph(
        nodes=[scan],
        name="step_sequence",
        inputs=[
            vi("seq_features", TensorProto.FLOAT, ["B", "T", f_dim]),
            vi("seq_mask", TensorProto.BOOL, ["B", "T", 1]),
            vi("h0", TensorProto.FLOAT, ["B", h_dim]),
            vi("c0", TensorProto.FLOAT, ["B", h_dim]),
        ],
        outputs=[
            vi("seq_probs", TensorProto.FLOAT, ["B", "T", k_dim]),
            vi("h_final", TensorProto.FLOAT, ["B", h_dim]),
            vi("c_final", TensorProto.FLOAT, ["B", h_dim]),
        ],
    )
    model = helper.make_model(outer, opset_imports=list(step.opset_import), producer_name="interest-stream")
    model.ir_version = step.ir_version
    onnx.checker.check_model(model)
    return model


class SequenceSession:
    """``run(features (B,T,F), mask (B,T), h, c) -> probs (B,T,K), h (B,H), c (B,H)`` in one ORT call.

    Built from a :class:`StepSession`'s model file with the same provider and session options.
    """

    def __init__(self, step: StepSession, intra_op_threads: int | None = None) -> None:
        model = sequence_model(onnx.load(str(step.path)))
        so = _session_options(intra_op_threads, cpu=step.provider != CUDA)
        providers = step.session.get_providers()
        self.session = ort.InferenceSession(model.SerializeToString(), sess_options=so, providers=providers)

    def run(
        self, features: np.ndarray, mask: np.ndarray, h: np.ndarray, c: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """float32 (B, T, F), bool (B, T), float32 (B, H) x 2 -> probs (B, T, K), h_final, c_final."""
        p, h2, c2 = self.session.run(
            None, {"seq_features": features, "seq_mask": mask.reshape(*mask.shape, 1), "h0": h, "c0": c}
        )
        return p, h2, c2


def _check(model: Path, batch: int, steps: int, seed: int = 0) -> tuple[float, float, float]:
    """max |dp| and |dh| of the sequence graph vs step() round by round; and its speed-up."""
    rng = np.random.default_rng(seed)
    step = StepSession(model, device="cpu", intra_op_threads=1)
    seq = SequenceSession(step, intra_op_threads=1)
    k, a = step.encoder.k, step.encoder.a
    cats = [tuple(rng.choice(k, size=rng.integers(1, 3), replace=False)) for _ in range(batch * steps)]
    feats = step.encoder.encode(cats, rng.integers(0, a, batch * steps), rng.exponential(3600, batch * steps))
    feats = feats.reshape(batch, steps, -1)
    lengths = rng.integers(1, steps + 1, batch)
    lengths[0] = steps
    mask = np.arange(steps)[None, :] < lengths[:, None]
    h, c = step.initial_state(batch)
    seq.run(feats, mask, h, c)  # warm-up: the first run allocates
    t0 = time.perf_counter()
    p_seq, h_seq, c_seq = seq.run(feats, mask, h, c)
    t_seq = time.perf_counter() - t0
    t0 = time.perf_counter()
    dp = 0.0
    for t in range(steps):
        rows = np.flatnonzero(mask[:, t])
        p, h[rows], c[rows] = step.step(feats[rows, t], h[rows], c[rows])
        dp = max(dp, float(np.abs(p - p_seq[rows, t]).max()))
    t_step = time.perf_counter() - t0
    dh = float(max(np.abs(h - h_seq).max(), np.abs(c - c_seq).max()))
    return dp, dh, t_step / t_seq


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", type=Path, required=True)
    args = ap.parse_args()
    for b, t in ((1, 100), (8, 30), (64, 8)):
        dp, dh, speedup = _check(args.model, b, t)
        print(f"batch {b:>3} x {t:>3} steps: max|dp| {dp:.1e}, max|dh| {dh:.1e}, {speedup:.1f}x round by round")
