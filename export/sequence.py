"""Many steps in one ONNX Runtime call: a (B, T) block of events through an ONNX ``Scan`` over time.

    python -m export.sequence --model artifacts/models/movielens-100k/model.onnx   # parity and speed vs step()

The stream worker steps every user of a batch in order. Round by round (one ``step`` call per round) a user with 100
events in a batch costs 100 calls, each paying ORT's fixed per-call cost and, in a thread, a GIL hand-over. The
sequence graph runs a (B, T) block of events in one call, with the GIL released throughout:

    inputs   seq_features (B, T, F) float32, seq_mask (B, T, 1) bool, h0 (B, H), c0 (B, H)
    outputs  seq_probs (B, T, K), h_final (B, H), c_final (B, H)

A padded position (mask False) leaves the state as it was and its probs row is ignored. Two builds, same contract:

- ``model.seq.onnx``, written beside ``model.onnx`` by the export (:func:`join_sequence` joins the three parts of
  models.model: SeqPrepare, SeqStep, SeqHead): the loop carries the LSTM state, cell and category memories as
  separate tensors; whatever depends on the event alone runs before the loop, the head after it, over the whole
  block. 23 nodes a step instead of 71: ~13 us a step at batch 1 instead of ~28 on one core.
- wrapped (:func:`sequence_model`): the step graph itself as the Scan body, built in memory from ``model.onnx``,
  for a model exported without ``model.seq.onnx`` (or with one of another model version).

Both equal the step graph applied round by round: bit for bit on the development machine, within 1e-6 in
tests/export/test_sequence.py.
"""

from __future__ import annotations

import argparse
import logging
import math
import time
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, compose, helper

from export.runtime import CUDA, INPUTS, OUTPUTS, StepSession, _session_options, max_abs_diff, worst
from models.features import ModelMeta

log = logging.getLogger("export.sequence")

SEQ_INPUTS = ("seq_features", "seq_mask", "h0", "c0")
SEQ_OUTPUTS = ("seq_probs", "h_final", "c_final")


def sequence_path(step_path: str | Path) -> Path:
    """Where the export writes the sequence graph of ``model.onnx``: ``model.seq.onnx`` beside it."""
    return Path(step_path).with_suffix(".seq.onnx")


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
    return _sequence_graph([scan], "step_sequence", (f_dim, h_dim, k_dim), [], step)


def _sequence_graph(
    nodes: list, name: str, dims: tuple[int, int, int], initializer: list, like: onnx.ModelProto
) -> onnx.ModelProto:
    """The outer graph of both builds: SEQ_INPUTS -> nodes -> SEQ_OUTPUTS, with ``like``'s opsets and IR version."""
    f_dim, h_dim, k_dim = dims

    def vi(name: str, elem: int, shape: list) -> onnx.ValueInfoProto:
        return helper.make_tensor_value_info(name, elem, shape)

    graph = helper.make_graph(
        nodes=nodes,
        name=name,
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
        initializer=initializer,
    )
    model = helper.make_model(graph, opset_imports=list(like.opset_import), producer_name="interest-stream")
    model.ir_version = like.ir_version
    onnx.checker.check_model(model)
    return model


def _rename(graph: onnx.GraphProto, names: dict[str, str]) -> None:
    for node in graph.node:
        node.input[:] = [names.get(x, x) for x in node.input]
        node.output[:] = [names.get(x, x) for x in node.output]
    for v in (*graph.input, *graph.output):
        v.name = names.get(v.name, v.name)


def join_sequence(
    prepare: onnx.ModelProto, step: onnx.ModelProto, head: onnx.ModelProto, loop_inputs: list[str]
) -> onnx.ModelProto:
    """The unpacked sequence graph: ``prepare`` -> Scan(``step``) -> ``head`` (the exports of models.model's SeqPrepare,
    SeqStep and SeqHead, with the input and output names that onnx_export.export_sequence_onnx gives them)."""
    state = ["hs", "cs", "mem"]
    want = {
        "prepare": (prepare, ["seq_features", "h0", "c0"], [*loop_inputs, *state]),
        "step": (step, [*state, *loop_inputs, "mask"], ["hs_next", "cs_next", "mem_next"]),
        "head": (head, ["hs_all", "mem_all", *state], list(SEQ_OUTPUTS)),
    }
    for part, (m, ins, outs) in want.items():
        got_in = [i.name for i in m.graph.input if i.name not in {t.name for t in m.graph.initializer}]
        if got_in != ins or [o.name for o in m.graph.output] != outs:
            raise ValueError(f"sequence part {part}: inputs {got_in}, outputs {[o.name for o in m.graph.output]}")
    prepare, head = compose.add_prefix(prepare, "prepare/"), compose.add_prefix(head, "head/")
    body = compose.add_prefix(step, "loop/").graph
    _rename(prepare.graph, {"prepare/" + x: x for x in ("seq_features", "h0", "c0")})
    outer = {x: x for x in ("hs_all", "mem_all", *SEQ_OUTPUTS)} | {x: "final_" + x for x in state}
    _rename(head.graph, {"head/" + x: y for x, y in outer.items()})
    body.node.extend(
        [
            helper.make_node("Identity", ["loop/hs_next"], ["loop/hs_out"]),
            helper.make_node("Identity", ["loop/mem_next"], ["loop/mem_out"]),
        ]
    )
    body.output.extend([onnx.ValueInfoProto(name="loop/hs_out"), onnx.ValueInfoProto(name="loop/mem_out")])
    scan = helper.make_node(
        "Scan",
        [*("prepare/" + x for x in state), *("prepare/" + x for x in loop_inputs), "seq_mask"],
        [*("final_" + x for x in state), "hs_all", "mem_all"],
        body=body,
        num_scan_inputs=len(loop_inputs) + 1,
        scan_input_axes=[1] * (len(loop_inputs) + 1),
        scan_output_axes=[1, 1],
    )
    by_name = {v.name: v for v in (*prepare.graph.input, *head.graph.output)}
    f_dim = by_name["seq_features"].type.tensor_type.shape.dim[2].dim_value
    h_dim = by_name["h0"].type.tensor_type.shape.dim[1].dim_value
    k_dim = by_name["seq_probs"].type.tensor_type.shape.dim[2].dim_value
    nodes = [*prepare.graph.node, scan, *head.graph.node]
    initializer = [*prepare.graph.initializer, *head.graph.initializer]
    return _sequence_graph(nodes, "step_sequence_unpacked", (f_dim, h_dim, k_dim), initializer, prepare)


class SequenceSession:
    """``run(features (B,T,F), mask (B,T), h, c) -> probs (B,T,K), h (B,H), c (B,H)`` in one ORT call.

    Loads ``model.seq.onnx`` beside the step session's model when it is there and of the same model version (``kind``
    "unpacked"); otherwise wraps the step graph (``kind`` "wrapped"). Same provider and session options as the step.
    """

    def __init__(self, step: StepSession, intra_op_threads: int | None = None) -> None:
        so = _session_options(intra_op_threads, cpu=step.provider != CUDA)
        providers = step.session.get_providers()
        path = sequence_path(step.path)
        self.kind, self.path = "wrapped", step.path
        if path.is_file():
            try:
                session = ort.InferenceSession(str(path), sess_options=so, providers=providers)
                version = ModelMeta.from_onnx_metadata(session.get_modelmeta().custom_metadata_map).version
                names = [i.name for i in session.get_inputs()], [o.name for o in session.get_outputs()]
            except Exception as e:  # ORT raises its own exception types for a corrupt file; ModelError for bad metadata
                log.warning("%s: not loadable (%s); stepping with the step graph wrapped in a Scan", path, e)
            else:
                why = ""
                if version != step.meta.version:
                    why = f"is for model {version}, not {step.meta.version}"
                elif names != (list(SEQ_INPUTS), list(SEQ_OUTPUTS)):
                    why = f"has inputs {names[0]} and outputs {names[1]}, not {SEQ_INPUTS} and {SEQ_OUTPUTS}"
                if why:
                    log.warning("%s %s; stepping with the step graph wrapped in a Scan", path, why)
                else:
                    self.session, self.kind, self.path = session, "unpacked", path
        if self.kind == "wrapped":
            model = sequence_model(onnx.load(str(step.path)))
            self.session = ort.InferenceSession(model.SerializeToString(), sess_options=so, providers=providers)

    def run(
        self, features: np.ndarray, mask: np.ndarray, h: np.ndarray, c: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """float32 (B, T, F), bool (B, T), float32 (B, H) x 2 -> probs (B, T, K), h_final, c_final."""
        p, h2, c2 = self.session.run(
            None, {"seq_features": features, "seq_mask": mask.reshape(*mask.shape, 1), "h0": h, "c0": c}
        )
        return p, h2, c2


def random_block(step: StepSession, batch: int, steps: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """A padded block of random events: features (B, T, F) and a mask (B, T) of random lengths, the first row full."""
    k, a = step.encoder.k, step.encoder.a
    cats = [tuple(rng.choice(k, size=rng.integers(1, 3), replace=False)) for _ in range(batch * steps)]
    feats = step.encoder.encode(cats, rng.integers(0, a, batch * steps), rng.exponential(3600, batch * steps))
    lengths = rng.integers(1, steps + 1, batch)
    lengths[0] = steps
    return feats.reshape(batch, steps, -1), np.arange(steps)[None, :] < lengths[:, None]


def _check(model: Path, batch: int, steps: int, seed: int = 0) -> tuple[float, float, float, float, str]:
    """max |dp| and |dh| of the sequence graph vs step() round by round; its time per step (s, best of 21 calls);
    its speed-up; which graph it is."""
    rng = np.random.default_rng(seed)
    step = StepSession(model, device="cpu", intra_op_threads=1)
    seq = SequenceSession(step, intra_op_threads=1)
    feats, mask = random_block(step, batch, steps, rng)
    h, c = step.initial_state(batch)
    seq.run(feats, mask, h, c)  # warm-up: the first run allocates
    t_seq = math.inf
    for _ in range(21):
        t0 = time.perf_counter()
        p_seq, h_seq, c_seq = seq.run(feats, mask, h, c)
        t_seq = min(t_seq, time.perf_counter() - t0)
    t0 = time.perf_counter()
    dp = 0.0
    for t in range(steps):
        rows = np.flatnonzero(mask[:, t])
        p, h[rows], c[rows] = step.step(feats[rows, t], h[rows], c[rows])
        dp = worst(dp, max_abs_diff(p, p_seq[rows, t]))
    t_step = time.perf_counter() - t0
    dh = worst(max_abs_diff(h, h_seq), max_abs_diff(c, c_seq))
    return dp, dh, t_seq / steps, t_step / t_seq, seq.kind


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", type=Path, required=True)
    args = ap.parse_args()
    for b, t in ((1, 100), (8, 30), (64, 8)):
        dp, dh, per_step, speedup, kind = _check(args.model, b, t)
        print(
            f"{kind} batch {b:>3} x {t:>3} steps: max|dp| {dp:.1e}, max|dh| {dh:.1e}, "
            f"{per_step * 1e6:.1f} us a step, {speedup:.1f}x round by round"
        )
