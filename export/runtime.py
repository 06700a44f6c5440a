"""ONNX Runtime session wrapper for the single-step model, and the offline replay of a whole event log.

    python -m export.runtime --model artifacts/models/movielens-100k/model.onnx --bench 1,64,1024,16384

`StepSession` picks CUDA when a GPU is really there (judged by session.get_providers() after creation,
not by get_available_providers(), which lists CUDA on any onnxruntime-gpu install) and CPU otherwise.
On CUDA, step() runs through IOBinding: inputs are copied once, outputs are allocated on the device and
read back once. `replay_log` steps every user of a log from the learned initial state, batching
across users round by round; it is the oracle the stream worker is judged against. On CUDA it keeps h, c and the
probabilities on the device for the whole replay (only each round's features go in, and the results come back
once at the end).
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import hashlib
import math
import os
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnxruntime as ort

from models.errors import ModelError
from models.features import FeatureEncoder, ModelMeta

INPUTS = ("features", "h", "c")
OUTPUTS = ("probs", "h_next", "c_next")
CUDA, CPU = "CUDAExecutionProvider", "CPUExecutionProvider"


def _session_options(intra_op_threads: int | None, cpu: bool) -> ort.SessionOptions:
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL  # one small graph: no inter-op parallelism to win
    so.inter_op_num_threads = 1
    # default: at most 2 threads; the worker shares the box with Kafka and Redis
    so.intra_op_num_threads = intra_op_threads or min(2, os.cpu_count() or 1)
    if cpu:
        # spinning threads burn a core between steps on a shared 2-core box
        so.add_session_config_entry("session.intra_op.allow_spinning", "0")
        so.add_session_config_entry("session.inter_op.allow_spinning", "0")
    so.log_severity_level = 3  # the CUDA-provider fallback is reported by get_providers(), not by logs
    return so


def worst(*values: float) -> float:
    """max of the values with any non-finite one counted as inf (Python's max() drops NaN: max(0.0, nan) == 0.0)."""
    return max((v if math.isfinite(v) else math.inf for v in values), default=0.0)


def max_abs_diff(a: np.ndarray, b: np.ndarray) -> float:
    """max |a - b| over all elements; inf when any difference is not finite (NaN or inf on either side)."""
    with np.errstate(invalid="ignore"):  # inf - inf: NaN, counted as inf below
        d = np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64))
    if not np.isfinite(d).all():
        return math.inf
    return float(d.max()) if d.size else 0.0


def gpu_device_present() -> bool:
    """An NVIDIA GPU is visible to this process (/dev/nvidia0..., or WSL2's /dev/dxg)."""
    return any(Path("/dev").glob("nvidia[0-9]*")) or Path("/dev/dxg").exists()


class StepSession:
    """A batched, stateless step: step(features, h, c) -> (probs, h_next, c_next)."""

    def __init__(self, model_path: str | Path, device: str = "auto", intra_op_threads: int | None = None):
        if device not in ("auto", "cpu", "cuda"):
            raise ModelError(f"device must be auto, cpu or cuda, got {device!r}")
        self.path = Path(model_path)
        if not self.path.is_file():
            raise ModelError(f"{self.path}: model file not found")
        # auto tries CUDA only where an NVIDIA device is there: elsewhere the attempt prints a wall of loader errors
        auto_cuda = device == "auto" and CUDA in ort.get_available_providers() and gpu_device_present()
        want_cuda = device == "cuda" or auto_cuda
        providers: list = [CPU]
        if want_cuda:
            # fp32 exactly: TF32 matmuls (ORT's CUDA default) drift ~2e-4 from the CPU results
            providers = [(CUDA, {"device_id": 0, "use_tf32": 0}), CPU]
            with contextlib.suppress(Exception):
                ort.preload_dlls()  # CUDA/cuDNN from pip's nvidia-* wheels, if that is how they are installed
            if device == "auto":  # a CPU-only box is normal for auto: no warning about the CUDA fallback
                ort.set_default_logger_severity(3)
        so = _session_options(intra_op_threads, cpu=not want_cuda)
        try:
            self.session = ort.InferenceSession(str(self.path), sess_options=so, providers=providers)
        except Exception as e:  # onnxruntime raises its own exception types for corrupt files
            first = str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__
            raise ModelError(f"{self.path}: not a loadable ONNX model ({first})") from None
        got = self.session.get_providers()
        self.provider = CUDA if got and got[0] == CUDA else CPU
        if device == "cuda" and self.provider != CUDA:
            raise ModelError(f"device=cuda requested but the CUDA provider is not usable here (got {got})")
        if self.provider == CPU and want_cuda:  # fell back: rebuild with CPU-tuned options
            so = _session_options(intra_op_threads, cpu=True)
            self.session = ort.InferenceSession(str(self.path), sess_options=so, providers=[CPU])
        props = self.session.get_modelmeta().custom_metadata_map
        self.meta = ModelMeta.from_onnx_metadata(props)
        names_in = [i.name for i in self.session.get_inputs()]
        names_out = [o.name for o in self.session.get_outputs()]
        if names_in != list(INPUTS) or names_out != list(OUTPUTS):
            raise ModelError(
                f"{self.path}: graph has inputs {names_in} / outputs {names_out}, want {INPUTS} / {OUTPUTS}"
            )
        self.encoder = FeatureEncoder(self.meta)
        self.hidden_size = self.meta.hidden_size
        self.n_features = self.meta.n_features

    def __repr__(self) -> str:
        return f"StepSession({self.path.name}, {self.meta.version}, {self.provider})"

    def initial_state(self, n: int) -> tuple[np.ndarray, np.ndarray]:
        """(n, H) copies of the learned initial state h0, c0."""
        return (np.tile(self.meta.h0, (n, 1)), np.tile(self.meta.c0, (n, 1)))

    def _check(self, features: np.ndarray, h: np.ndarray, c: np.ndarray):
        f = np.ascontiguousarray(features, dtype=np.float32)
        h = np.ascontiguousarray(h, dtype=np.float32)
        c = np.ascontiguousarray(c, dtype=np.float32)
        b = f.shape[0] if f.ndim == 2 else -1
        if b < 1 or f.shape[1] != self.n_features or h.shape != (b, self.hidden_size) or c.shape != h.shape:
            raise ValueError(
                f"step wants features (B, {self.n_features}), h and c (B, {self.hidden_size}) with B >= 1; "
                f"got {f.shape}, {h.shape}, {c.shape}"
            )
        return f, h, c

    def step(self, features: np.ndarray, h: np.ndarray, c: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """float32 (B, F), (B, H), (B, H) -> probs (B, K), h_next (B, H), c_next (B, H)."""
        f, h, c = self._check(features, h, c)
        if self.provider == CUDA:
            io = self.session.io_binding()
            for name, arr in zip(INPUTS, (f, h, c), strict=True):
                io.bind_cpu_input(name, arr)
            for name in OUTPUTS:
                io.bind_output(name, "cuda", 0)
            self.session.run_with_iobinding(io)
            p, hn, cn = io.copy_outputs_to_cpu()
            return p, hn, cn
        p, hn, cn = self.session.run(list(OUTPUTS), {"features": f, "h": h, "c": c})
        return p, hn, cn

    def load_catalog(self, path: str | Path | None = None) -> dict[str, tuple[int, ...]]:
        """item_id -> output category indices, from catalog.csv (default: beside the model, sha256-checked)."""
        p = Path(path) if path is not None else self.path.with_name("catalog.csv")
        if not p.is_file():
            raise ModelError(f"{p}: catalog not found")
        data = p.read_bytes()
        if path is None and self.meta.catalog_sha256 and hashlib.sha256(data).hexdigest() != self.meta.catalog_sha256:
            raise ModelError(
                f"{p}: sha256 differs from the one recorded in {self.path.name} (another model's catalog?)"
            )
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError as e:
            raise ModelError(f"{p}: not UTF-8 text ({e.reason} at byte {e.start})") from None
        rows = csv.reader(text.splitlines())
        header = next(rows, None)
        if header is None or [x.strip() for x in header[:2]] != ["item_id", "categories"]:
            raise ModelError(f"{p}:1: header must be item_id,categories")
        out: dict[str, tuple[int, ...]] = {}
        for ln, row in enumerate(rows, 2):
            if not row:
                continue
            if len(row) != 2 or not row[0].strip():
                raise ModelError(f"{p}:{ln}: expected item_id,categories")
            raw = [c for c in row[1].split("|") if c]
            try:
                out[row[0].strip()] = self.encoder.category_indices(raw)
            except KeyError as e:
                raise ModelError(f"{p}:{ln}: category {e.args[0]!r} is not in the model vocabulary") from None
            if not raw:
                raise ModelError(f"{p}:{ln}: item {row[0]!r} has no categories")
        return out


@dataclass
class UserReplay:
    probs: np.ndarray  # (K,) the distribution after the user's last event
    h: np.ndarray  # (H,)
    c: np.ndarray  # (H,)
    n_events: int
    last_ts: float


class DeviceState:
    """Replay state resident on the session's device: h and c in two ping-pong buffer pairs (round r reads pair r % 2
    and writes the other; ORT gives no in-place guarantee) and one probs buffer, all (N, .) float32, row-major. The
    active users of a round are a prefix of the rows, so a round binds the first n rows of each buffer by pointer."""

    def __init__(self, session: StepSession, h: np.ndarray, c: np.ndarray, probs: np.ndarray) -> None:
        self.session = session
        self.device = "cuda" if session.provider == CUDA else "cpu"
        put = lambda a: ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(a), self.device, 0)  # noqa: E731
        self.hc = [(put(h), put(c)), (put(h), put(c))]
        self.probs = put(probs)

    def step(self, r: int, x: np.ndarray, start: int, stop: int) -> None:
        """Round r for rows start..stop-1: features x (stop - start, F) from the host, the rest on the device."""
        n, hsz, k = stop - start, self.session.hidden_size, self.probs.shape()[1]
        io = self.session.session.io_binding()
        io.bind_cpu_input("features", np.ascontiguousarray(x, dtype=np.float32))
        (h_in, c_in), (h_out, c_out) = self.hc[r % 2], self.hc[(r + 1) % 2]
        for name, buf, width in (("h", h_in, hsz), ("c", c_in, hsz)):
            io.bind_input(name, self.device, 0, np.float32, [n, width], buf.data_ptr() + 4 * width * start)
        for name, buf, width in (("probs", self.probs, k), ("h_next", h_out, hsz), ("c_next", c_out, hsz)):
            io.bind_output(name, self.device, 0, np.float32, [n, width], buf.data_ptr() + 4 * width * start)
        self.session.session.run_with_iobinding(io)

    def read(self, counts: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """-> probs, h, c (N, .) on the host; a user's last round (count - 1) wrote pair count % 2."""
        probs = self.probs.numpy()
        pairs = [(h.numpy(), c.numpy()) for h, c in self.hc]
        odd = (counts % 2 == 1)[:, None]
        return probs, np.where(odd, pairs[1][0], pairs[0][0]), np.where(odd, pairs[1][1], pairs[0][1])


def replay_log(
    session: StepSession,
    events: Iterable[tuple[str, Sequence[int], int, float]],
    max_batch: int = 65536,
    device_state: bool | None = None,
) -> dict[str, UserReplay]:
    """Replay (user_id, category_indices, action_index, ts) events in log order -> per-user final state.

    Every user starts from h0/c0; round r steps the r-th event of every user that has one (users ordered
    by decreasing event count, so the active users of a round are a prefix). gap = ts - the user's previous
    ts (nan for the first event), encoded by session.encoder exactly as the stream worker does.
    ``device_state`` (default: on CUDA) keeps the state on the device between rounds (:class:`DeviceState`).
    """
    per_user: dict[str, list[tuple[Sequence[int], int, float]]] = {}
    for user, cats, action, ts in events:
        per_user.setdefault(user, []).append((cats, action, float(ts)))
    if not per_user:
        return {}
    users = sorted(per_user, key=lambda u: -len(per_user[u]))  # stable: ties keep first-seen order
    counts = np.array([len(per_user[u]) for u in users])
    h, c = session.initial_state(len(users))
    probs = np.tile(session.meta.prior, (len(users), 1)).astype(np.float32)
    last = np.full(len(users), np.nan)
    if device_state is None:
        device_state = session.provider == CUDA
    on_device = DeviceState(session, h, c, probs) if device_state else None
    for r in range(int(counts[0])):
        n = int(np.count_nonzero(counts > r))  # users with more than r events: a prefix
        evs = [per_user[users[i]][r] for i in range(n)]
        times = np.array([e[2] for e in evs])
        x = session.encoder.encode([e[0] for e in evs], [e[1] for e in evs], times - last[:n])
        for s in range(0, n, max_batch):
            e = min(n, s + max_batch)
            if on_device is not None:
                on_device.step(r, x[s:e], s, e)
            else:
                probs[s:e], h[s:e], c[s:e] = session.step(x[s:e], h[s:e], c[s:e])
        last[:n] = times
    if on_device is not None:
        probs, h, c = on_device.read(counts)
    return {
        u: UserReplay(probs[i].copy(), h[i].copy(), c[i].copy(), int(counts[i]), float(last[i]))
        for i, u in enumerate(users)
    }


def bench(session: StepSession, batches: Sequence[int], seconds: float = 1.0) -> dict[int, float]:
    """Events per second of step() at each batch size (random features, warm session)."""
    rng = np.random.default_rng(0)
    out: dict[int, float] = {}
    for b in batches:
        x = rng.random((b, session.n_features), dtype=np.float32)
        h, c = session.initial_state(b)
        session.step(x, h, c)
        n, t0 = 0, time.perf_counter()
        while time.perf_counter() - t0 < seconds:
            session.step(x, h, c)
            n += 1
        out[b] = n * b / (time.perf_counter() - t0)
    return out


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description="step throughput of an exported model")
    ap.add_argument("--model", required=True)
    ap.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    ap.add_argument("--threads", type=int)
    ap.add_argument("--bench", default="1,16,256,2048,16384")
    a = ap.parse_args()
    s = StepSession(a.model, a.device, a.threads)
    print(s)
    for b, eps in bench(s, [int(v) for v in a.bench.split(",")]).items():
        print(f"batch {b:>6d}: {eps:>12,.0f} events/s")
