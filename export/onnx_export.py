"""Export a checkpoint to the single-step ONNX graph, write catalog.csv beside it and check parity.

    interest-stream export --checkpoint artifacts/models/movielens-100k/model.pt \
        --out artifacts/models/movielens-100k/model.onnx
    python -m export.onnx_export --checkpoint DIR/model.pt --out DIR/model.onnx

The graph is stateless: inputs features (B, F), h (B, H), c (B, H) -> outputs probs (B, K), h_next, c_next,
with a dynamic batch axis, exported with the TorchScript exporter (dynamo=False); the LSTM cell math is
written out in models/model.py, so it exports as plain ops, and models.model.StepModel rearranges one step
for the graph (the ensemble members side by side, everything that depends only on the event in one matmul).
The metadata_props carry ModelMeta (models/features.py): model version, vocabularies, initial state, prior and
the sha256 of catalog.csv. Beside it go catalog.csv and model.seq.onnx, the same model over a (B, T) block of events
in one call (export/sequence.py; the stream worker's batch step), with the same metadata.

Parity: random sequences and real users' sequences (kept in the checkpoint, encoded with the same
FeatureEncoder the stream worker uses), length >= 50, batch 1, 7 and 512: the ONNX model stepped event by event
on ONNX Runtime (CPU), and the sequence graph over the whole block, against the PyTorch model run over the whole
sequence. Prints max |dp| and fails (exit 1, model left as model.onnx.failed) above 1e-5 or on any non-finite
difference (NaN counts as inf). A checkpoint without users of >= 64 events gets the random sequences only, and a notice.
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import io
import os
import warnings
from pathlib import Path

import numpy as np
import onnx
import torch

from export.sequence import SequenceSession, join_sequence, sequence_path
from models.checkpoint import load_checkpoint
from models.data import ML100K
from models.errors import ModelError
from models.features import FeatureEncoder, ModelMeta
from models.model import SEQ_LOOP_INPUTS, InterestModel, SeqHead, SeqPrepare, SeqStep, StepModel

PARITY_TOL = 1e-5
PARITY_BATCHES = (1, 7, 512)
PARITY_LENGTH = 64  # events per parity sequence (>= 50)
OPSET = 17
REPO = Path(__file__).resolve().parents[1]


def write_catalog(path: Path, catalog: dict[str, list[str]]) -> str:
    """catalog.csv (item_id,categories with "|"-separated raw categories) -> its sha256."""
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["item_id", "categories"])
    for item, cats in catalog.items():
        if any("|" in c for c in cats):
            raise ModelError(f"item {item!r}: a category name contains '|', which catalog.csv cannot hold")
        w.writerow([item, "|".join(cats)])
    data = buf.getvalue().encode()
    path.write_bytes(data)
    return hashlib.sha256(data).hexdigest()


def build_meta(model: InterestModel, ckpt: dict, catalog_sha256: str) -> ModelMeta:
    vocab = ckpt["vocab"]
    with torch.no_grad():
        h0, c0 = model.initial_state(1)
        prior = model.prior()
    return ModelMeta(
        version=ckpt["version"],
        categories=list(vocab["categories"]),
        category_index=dict(vocab["category_index"]),
        actions=list(vocab["actions"]),
        default_action=vocab["default_action"],
        hidden_size=model.cfg.state_size,
        n_features=model.cfg.n_features,
        h0=h0[0].detach().numpy().astype(np.float32),
        c0=c0[0].detach().numpy().astype(np.float32),
        prior=prior.detach().numpy().astype(np.float32),
        dataset=ckpt["dataset"],
        catalog_sha256=catalog_sha256,
        extra={
            "model_config": ckpt["config"],
            "train_config": ckpt.get("train_config", {}),
            "summary": ckpt.get("summary", {}),
            "metrics": ckpt.get("metrics", {}),
        },
    )


def _to_onnx(module: torch.nn.Module, args: tuple, names_in: list[str], names_out: list[str], axes: dict):
    """One module through the TorchScript exporter -> ModelProto; axes: {name: {axis: "batch" | "time"}}."""
    buf = io.BytesIO()
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # the TorchScript exporter is deprecated, on purpose
        torch.onnx.export(
            module,
            args,
            buf,  # type: ignore[arg-type]  # torch's hint says a path; the TorchScript exporter writes to any file
            dynamo=False,
            input_names=names_in,
            output_names=names_out,
            dynamic_axes=axes,
            opset_version=OPSET,
            do_constant_folding=True,
        )
    return onnx.load_from_string(buf.getvalue())


def _save(proto: onnx.ModelProto, meta: ModelMeta, doc: str, out: Path) -> None:
    proto.producer_name = "interest-stream"
    proto.doc_string = f"interest-stream {doc} {meta.version}"
    del proto.metadata_props[:]
    for k, v in meta.to_onnx_metadata().items():
        proto.metadata_props.add(key=k, value=v)
    onnx.checker.check_model(proto)
    onnx.save(proto, str(out))


def export_onnx(model: InterestModel, meta: ModelMeta, out: Path) -> None:
    b, hsz = 2, model.cfg.state_size
    args = (torch.zeros(b, model.cfg.n_features), torch.zeros(b, hsz), torch.zeros(b, hsz))
    names_in, names_out = ["features", "h", "c"], ["probs", "h_next", "c_next"]
    axes = {n: {0: "batch"} for n in names_in + names_out}
    _save(_to_onnx(StepModel(model).eval(), args, names_in, names_out, axes), meta, "single-step model", out)


def export_sequence_onnx(model: InterestModel, meta: ModelMeta, out: Path) -> bool:
    """The sequence graph with the state unpacked in its loop (export/sequence.py) -> out; False (nothing written)
    for a model without category memories, which the worker steps with the step graph wrapped in a Scan."""
    step = StepModel(model).eval()
    if not step.fused:
        return False
    cfg = model.cfg
    b, t, hsz, m = 2, 3, cfg.state_size, cfg.n_members
    hl, nk = m * cfg.hidden_size, m * cfg.n_memories * cfg.n_categories
    loop = [n for n in SEQ_LOOP_INPUTS if n != "keep" or cfg.state_drift]
    width = {"gx": 4 * hl, "keep": hl, "d": nk, "gy": nk}
    state = {"hs": hl, "cs": hl, "mem": nk}
    bt, bb = {0: "batch", 1: "time"}, {0: "batch"}
    prepare = _to_onnx(
        SeqPrepare(step).eval(),
        (torch.zeros(b, t, cfg.n_features), torch.zeros(b, hsz), torch.zeros(b, hsz)),
        ["seq_features", "h0", "c0"],
        [*loop, *state],
        {"seq_features": bt, "h0": bb, "c0": bb} | {n: bt for n in loop} | {n: bb for n in state},
    )
    body_in = [*state, *loop, "mask"]
    body = _to_onnx(
        SeqStep(step).eval(),
        (*(torch.zeros(b, w) for w in state.values()), *(torch.zeros(b, width[n]) for n in loop), torch.ones(b, 1) > 0),
        body_in,
        ["hs_next", "cs_next", "mem_next"],
        {n: bb for n in [*body_in, "hs_next", "cs_next", "mem_next"]},
    )
    head = _to_onnx(
        SeqHead(step).eval(),
        (torch.zeros(b, t, hl), torch.zeros(b, t, nk), *(torch.zeros(b, w) for w in state.values())),
        ["hs_all", "mem_all", *state],
        ["seq_probs", "h_final", "c_final"],
        {"hs_all": bt, "mem_all": bt, "seq_probs": bt} | {n: bb for n in [*state, "h_final", "c_final"]},
    )
    _save(join_sequence(prepare, body, head, loop), meta, "sequence model", out)
    return True


def parity_users(ckpt: dict, length: int) -> list:
    """The checkpoint's real users with at least `length` events (the "real" parity case)."""
    return [u for u in ckpt.get("parity_users", []) if len(u) >= length]


def parity_sequences(encoder: FeatureEncoder, ckpt: dict, batch: int, length: int, seed: int) -> dict:
    """-> {"random": x, "real": x} float32 (B, L, F), both built with the FeatureEncoder; no "real" without
    parity users of at least `length` events."""
    rng = np.random.default_rng(seed)
    k, a = encoder.k, encoder.a
    n = batch * length
    cats = [tuple(rng.choice(k, size=rng.integers(1, min(k, 4) + 1), replace=False)) for _ in range(n)]
    gaps = rng.exponential(3600.0, size=n) * rng.choice([1e-3, 1.0, 100.0], size=n)
    gaps[::length] = np.nan  # each sequence starts with a first event
    out = {"random": encoder.encode(cats, rng.integers(0, a, size=n), gaps).reshape(batch, length, -1)}
    users = parity_users(ckpt, length)
    if users:
        catalog = ckpt["catalog"]
        rows = []
        for i in range(batch):
            evs = users[i % len(users)][:length]
            ts = np.array([float(e[2]) for e in evs])
            g = np.concatenate([[np.nan], np.diff(ts)])
            c = [encoder.category_indices(catalog[e[0]]) for e in evs]
            rows.append(encoder.encode(c, [encoder.action_index(e[1]) for e in evs], g))
        out["real"] = np.stack(rows)
    return out


def check_parity(
    model: InterestModel,
    onnx_path: Path,
    ckpt: dict,
    batches=PARITY_BATCHES,
    length=PARITY_LENGTH,
    verbose: bool = True,
) -> dict:
    """Step the ONNX model event by event vs the PyTorch whole-sequence forward -> {case: max |dp|, "max": ...,
    "real_users": n}; a non-finite difference counts as inf; real_users 0: only random sequences were checked."""
    from export.runtime import StepSession, max_abs_diff, worst

    sess = StepSession(onnx_path, device="cpu")
    seq = SequenceSession(sess) if sequence_path(onnx_path).is_file() else None
    results: dict[str, float] = {}
    results["prior"] = max_abs_diff(sess.meta.prior, model.prior().numpy())
    n_real = len(parity_users(ckpt, length))
    if verbose and not n_real:
        print(f"parity: no user in the checkpoint has >= {length} events; only random sequences are checked")
    for b in batches:
        for kind, x in parity_sequences(sess.encoder, ckpt, b, length, seed=b).items():
            with torch.no_grad():
                ref = model(torch.from_numpy(x)).numpy()  # (B, L+1, K)
            h, c = sess.initial_state(b)
            err = max_abs_diff(ref[:, 0], sess.meta.prior)
            for t in range(x.shape[1]):
                p, h, c = sess.step(x[:, t], h, c)
                err = worst(err, max_abs_diff(p, ref[:, t + 1]))
            results[f"{kind} batch={b}"] = err
            if verbose:
                print(f"parity {kind:6s} batch={b:<4d} length={x.shape[1]}: max |dp| = {err:.3e}")
            if seq is not None:  # the sequence graph: the whole block in one call
                h, c = sess.initial_state(b)
                p_seq, _, _ = seq.run(x, np.ones(x.shape[:2], dtype=bool), h, c)
                err = max_abs_diff(p_seq, ref[:, 1:])
                results[f"sequence {kind} batch={b}"] = err
                if verbose:
                    print(f"parity {kind:6s} batch={b:<4d} length={x.shape[1]}, sequence graph: max |dp| = {err:.3e}")
    results["max"] = worst(*results.values())
    results["real_users"] = n_real
    return results


def export_checkpoint(checkpoint: str | Path, out: str | Path, verbose: bool = True) -> dict:
    """Export + catalog.csv + parity check; -> parity results. Raises ModelError when parity fails."""
    model, ckpt = load_checkpoint(checkpoint)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    sha = write_catalog(out.parent / "catalog.csv", ckpt["catalog"])
    meta = build_meta(model, ckpt, sha)
    tmp = out.with_name(out.name + ".tmp")
    export_onnx(model, meta, tmp)
    has_sequence = export_sequence_onnx(model, meta, sequence_path(tmp))
    res = check_parity(model, tmp, ckpt, verbose=verbose)
    if verbose:
        print(f"parity max |dp| = {res['max']:.3e} (tolerance {PARITY_TOL:.0e}); prior |dp| = {res['prior']:.3e}")
    if not res["max"] <= PARITY_TOL:
        os.replace(tmp, out.with_name(out.name + ".failed"))
        sequence_path(tmp).unlink(missing_ok=True)
        raise ModelError(f"ONNX parity failed: max |dp| = {res['max']:.3e} > {PARITY_TOL:.0e}")
    if has_sequence:
        os.replace(sequence_path(tmp), sequence_path(out))
    else:  # not one of an earlier export
        sequence_path(out).unlink(missing_ok=True)
    os.replace(tmp, out)
    if verbose:
        also = f" and {sequence_path(out).name}" if has_sequence else ""
        print(f"exported {meta.version} -> {out}{also} (K={len(meta.categories)}, H={meta.hidden_size})")
    return res


def build_default_model(
    out_dir: str | Path = "artifacts/models/movielens-100k",
    data: str | Path = ML100K,
    fast: bool = False,
    verbose: bool = False,
) -> Path:
    """Train (if model.pt is absent) and export (if model.onnx or model.seq.onnx is absent, or older) -> model.onnx.

    Relative paths are taken from the repository root. fast=True trains a small model in a few epochs
    (for tests and demos; it still beats the popularity baseline).
    """
    from models.train import TrainConfig, train

    out_dir = out_dir if Path(out_dir).is_absolute() else REPO / out_dir
    data = data if Path(data).is_absolute() else REPO / data
    out_dir = Path(out_dir)
    ckpt, onnx_path = out_dir / "model.pt", out_dir / "model.onnx"
    if not ckpt.is_file():
        if fast:
            tc, mc = TrainConfig(epochs=4, patience=2, batch_users=48, lr=1e-2), {"hidden_size": 32}
        else:
            tc, mc = TrainConfig(), {}
        train("movielens-100k", data, out_dir, tc=tc, model_overrides=mc, progress=verbose)
    stale = not onnx_path.is_file() or onnx_path.stat().st_mtime < ckpt.stat().st_mtime
    if stale or not sequence_path(onnx_path).is_file():  # an export from before model.seq.onnx: redo it
        export_checkpoint(ckpt, onnx_path, verbose=verbose)
    return onnx_path


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--checkpoint", required=True, help="model.pt written by train")
    parser.add_argument("--out", help="model.onnx path (default: beside the checkpoint)")


def run(args: argparse.Namespace) -> int:
    out = Path(args.out) if args.out else Path(args.checkpoint).with_name("model.onnx")
    try:
        export_checkpoint(args.checkpoint, out)
    except ModelError as e:
        if "parity failed" not in str(e):
            raise
        print(str(e))
        return 1
    return 0


if __name__ == "__main__":
    ap = argparse.ArgumentParser(prog="python -m export.onnx_export", description=__doc__.splitlines()[0])
    add_arguments(ap)
    raise SystemExit(run(ap.parse_args()))
