"""GPU check: CUDA-provider parity with CPU and batched step throughput, written as a JSON report.

    python -m export.gpu_check --model artifacts/models/movielens-100k/model.onnx --out gpu_report.json

On a machine with an NVIDIA GPU (onnxruntime-gpu): builds a CPU and a CUDA session, steps the same random
sequences (length 64, batch 1, 7, 512) through both and records max |dp|, |dh|, |dc|, and the same for the
sequence graph the stream worker runs (model.seq.onnx, or the wrapped step graph) on padded blocks, and the backfill's
block stepping of a whole random log (parity and events/s on each device); then measures step
throughput (events/s) at batch 1, 4, 16, ... 65536 with plain run() (host arrays in and out) and with
IOBinding (state kept on the device between steps, features copied in, probs copied out), fp32, and fp16
(a converted copy of the graph, if onnx's float16 converter is available). Without a usable GPU it says so
and exits 0 with {"status": "skipped"}. Every section catches its own errors and the report is rewritten
after each measurement, so a crash still leaves partial results. Time-boxed to well under 5 minutes.
Parity fails (status "parity_failed", exit 1, throughput still measured) when a parity figure exceeds
PARITY_TOL or is not finite, or a parity section raised; throughput errors are only recorded.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import platform
import time
import traceback
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort

from export.runtime import CPU, CUDA, StepSession, max_abs_diff, worst

BATCHES = (1, 4, 16, 64, 256, 1024, 4096, 16384, 65536)
SECONDS_PER_POINT = 1.0  # measuring time per (mode, batch)
MAX_TOTAL_SECONDS = 240.0
PARITY_TOL = 1e-5  # CUDA vs CPU, fp32 with TF32 off (export/runtime.py)
PARITY_SECTIONS = ("parity", "sequence_parity", "replay_parity", "backfill_parity")


class Report:
    def __init__(self, path: Path):
        self.path = path
        self.data: dict = {
            "status": "running",
            "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "host": platform.node(),
            "onnxruntime": ort.__version__,
            "available_providers": ort.get_available_providers(),
        }
        self.save()

    def save(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.path.write_text(json.dumps(self.data, indent=2, default=float) + "\n")

    def error(self, section: str, e: BaseException) -> None:
        self.data.setdefault("errors", {})[section] = f"{type(e).__name__}: {e}"[:2000]
        self.data.setdefault("tracebacks", {})[section] = traceback.format_exc()[-4000:]
        self.save()


def gpu_session(model: Path) -> tuple[StepSession | None, str]:
    with contextlib.suppress(Exception):
        ort.preload_dlls()  # CUDA/cuDNN from pip's nvidia-* wheels, when that is how they are installed
    try:
        s = StepSession(model, device="cuda")
    except Exception as e:
        return None, str(e)
    return (s, "") if s.provider == CUDA else (None, f"providers granted: {s.session.get_providers()}")


def parity(cpu: StepSession, gpu: StepSession, batches=(1, 7, 512), length: int = 64) -> dict:
    rng = np.random.default_rng(0)
    out: dict[str, Any] = {}
    enc, k, a = cpu.encoder, cpu.encoder.k, cpu.encoder.a
    for b in batches:
        hc, cc = cpu.initial_state(b)
        hg, cg = gpu.initial_state(b)
        dp = dh = 0.0
        for t in range(length):
            cats = [tuple(rng.choice(k, size=rng.integers(1, min(k, 3) + 1), replace=False)) for _ in range(b)]
            gaps = np.full(b, np.nan) if t == 0 else rng.exponential(3600.0, size=b)
            x = enc.encode(cats, rng.integers(0, a, size=b), gaps)
            pc, hc, cc = cpu.step(x, hc, cc)
            pg, hg, cg = gpu.step(x, hg, cg)
            dp = worst(dp, max_abs_diff(pc, pg))
            dh = worst(dh, max_abs_diff(hc, hg), max_abs_diff(cc, cg))
        out[str(b)] = {"max_abs_dp": dp, "max_abs_dstate": dh, "length": length}
    out["max_abs_dp"] = worst(*(v["max_abs_dp"] for v in out.values()))
    return out


def sequence_parity(cpu: StepSession, gpu: StepSession, blocks=((1, 64), (8, 30), (64, 8))) -> dict:
    """The worker's sequence graph on CPU and CUDA, same padded (B, T) blocks -> max |dp| and |dstate| per block."""
    from export.sequence import SequenceSession, random_block

    seq_cpu, seq_gpu = SequenceSession(cpu), SequenceSession(gpu)
    rng = np.random.default_rng(1)
    out: dict = {"kind": seq_gpu.kind, "path": seq_gpu.path.name}
    for b, t in blocks:
        x, mask = random_block(cpu, b, t, rng)
        h, c = cpu.initial_state(b)
        pc, hc, cc = seq_cpu.run(x, mask, h, c)
        pg, hg, cg = seq_gpu.run(x, mask, h, c)
        dstate = worst(max_abs_diff(hc, hg), max_abs_diff(cc, cg))
        out[f"{b}x{t}"] = {"max_abs_dp": max_abs_diff(pc[mask], pg[mask]), "max_abs_dstate": dstate}
    out["max_abs_dp"] = worst(*(v["max_abs_dp"] for v in out.values() if isinstance(v, dict)))
    return out


def replay_parity(cpu: StepSession, gpu: StepSession, users: int = 3000, max_events: int = 40) -> dict:
    """replay_log of one random log: on CUDA with the state kept on the device between rounds, on CPU step by step."""
    from export.runtime import replay_log

    rng = np.random.default_rng(2)
    k, a = cpu.encoder.k, cpu.encoder.a
    log = [
        (f"u{u}", tuple(rng.choice(k, size=rng.integers(1, 3), replace=False)), int(rng.integers(0, a)), 60.0 * i)
        for u in range(users)
        for i in range(int(rng.integers(1, max_events + 1)))
    ]
    t0 = time.perf_counter()
    on_gpu = replay_log(gpu, log)
    t_gpu = time.perf_counter() - t0
    t0 = time.perf_counter()
    on_cpu = replay_log(cpu, log)
    t_cpu = time.perf_counter() - t0
    dp = worst(*(max_abs_diff(on_gpu[u].probs, r.probs) for u, r in on_cpu.items()))
    ds = worst(*(worst(max_abs_diff(on_gpu[u].h, r.h), max_abs_diff(on_gpu[u].c, r.c)) for u, r in on_cpu.items()))
    return {
        "events": len(log),
        "users": users,
        "max_abs_dp": dp,
        "max_abs_dstate": ds,
        "gpu_events_per_s": len(log) / t_gpu,
        "cpu_events_per_s": len(log) / t_cpu,
    }


def block_steps(seq, feats: np.ndarray, counts: np.ndarray, h0: np.ndarray, c0: np.ndarray, block_users: int):
    """The backfill's stepping (``streams.tools.backfill``): every user's whole history through the sequence graph,
    users sorted by event count and stepped ``block_users`` at a time, each block padded to its longest user.
    ``feats`` holds the users' events user after user (``counts[u]`` each). Returns final probs, h, c per user."""
    n_users = len(counts)
    starts = np.r_[0, np.cumsum(counts)[:-1]]
    order = np.argsort(-counts, kind="stable")
    h = np.empty((n_users, h0.shape[-1]), dtype=np.float32)
    c = np.empty_like(h)
    out_p = []
    for b in range(0, n_users, block_users):
        users = order[b : b + block_users]
        t = int(counts[users[0]])
        x = np.zeros((len(users), t, feats.shape[1]), dtype=np.float32)
        mask = np.zeros((len(users), t), dtype=bool)
        for i, u in enumerate(users):
            x[i, : counts[u]] = feats[starts[u] : starts[u] + counts[u]]
            mask[i, : counts[u]] = True
        rows = len(users)
        p, h[users], c[users] = seq.run(x, mask, np.tile(h0, (rows, 1)), np.tile(c0, (rows, 1)))
        out_p.append((users, p[np.arange(rows), counts[users] - 1]))
    probs = np.empty((n_users, out_p[0][1].shape[1]), dtype=np.float32)
    for users, p_last in out_p:
        probs[users] = p_last
    return probs, h, c


def backfill_parity(
    cpu: StepSession, gpu: StepSession, users: int = 8000, max_events: int = 60, block_users: int = 4096
) -> dict:
    """The backfill's block stepping of one random log, on CUDA and on CPU: parity of every user's final
    distribution and state, and events/s of each."""
    from export.sequence import SequenceSession

    rng = np.random.default_rng(3)
    k, a = cpu.encoder.k, cpu.encoder.a
    counts = rng.integers(1, max_events + 1, size=users)
    n = int(counts.sum())
    cats = [tuple(rng.choice(k, size=rng.integers(1, 3), replace=False)) for _ in range(n)]
    gaps = np.where(np.r_[0, np.cumsum(counts)[:-1]].repeat(counts) == np.arange(n), np.nan, 60.0)
    feats = cpu.encoder.encode(cats, rng.integers(0, a, size=n), gaps)
    h0 = np.asarray(cpu.meta.h0, dtype=np.float32)
    c0 = np.asarray(cpu.meta.c0, dtype=np.float32)
    out: dict = {"events": n, "users": users, "block_users": block_users}
    results = {}
    for name, session in (("gpu", gpu), ("cpu", cpu)):
        seq = SequenceSession(session)
        block_steps(seq, feats[:100], np.array([100]), h0, c0, 1)  # warm-up (CUDA kernels, allocations)
        t0 = time.perf_counter()
        results[name] = block_steps(seq, feats, counts, h0, c0, block_users)
        out[f"{name}_events_per_s"] = n / (time.perf_counter() - t0)
    (pg, hg, cg), (pc, hc, cc) = results["gpu"], results["cpu"]
    out["max_abs_dp"] = max_abs_diff(pg, pc)
    out["max_abs_dstate"] = worst(max_abs_diff(hg, hc), max_abs_diff(cg, cc))
    return out


def parity_failures(data: dict, tol: float = PARITY_TOL) -> list[str]:
    """The report's parity figures (max_abs_* at any depth) above tol or not finite, and parity sections that raised."""
    out = [f"{key}: raised {data['errors'][key]}" for key in PARITY_SECTIONS if key in data.get("errors", {})]

    def walk(node: dict, where: str) -> None:
        for k, v in node.items():
            if isinstance(v, dict):
                walk(v, f"{where}.{k}")
            elif k.startswith("max_abs_") and not worst(v) <= tol:
                out.append(f"{where}.{k} = {v:.3e} > {tol:.0e}")

    for key in PARITY_SECTIONS:
        walk(data.get(key, {}), key)
    return out


def throughput_run(sess: ort.InferenceSession, b: int, f: int, hsz: int, dtype) -> float:
    rng = np.random.default_rng(b)
    x = rng.random((b, f)).astype(dtype)
    h = np.zeros((b, hsz), dtype)
    c = np.zeros((b, hsz), dtype)
    sess.run(None, {"features": x, "h": h, "c": c})
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < SECONDS_PER_POINT:
        _, h, c = sess.run(None, {"features": x, "h": h, "c": c})
        n += 1
    return n * b / (time.perf_counter() - t0)


def throughput_iobinding(sess: ort.InferenceSession, b: int, f: int, hsz: int, dtype) -> float:
    """State stays on the device: h_next/c_next of one step are bound as h/c of the next."""
    rng = np.random.default_rng(b)
    x = rng.random((b, f)).astype(dtype)
    zeros = np.zeros((b, hsz), dtype)
    states = [[ort.OrtValue.ortvalue_from_numpy(zeros, "cuda", 0) for _ in range(2)] for _ in range(2)]
    probs_cpu = None

    def one(i: int):
        nonlocal probs_cpu
        cur, nxt = states[i % 2], states[(i + 1) % 2]
        io = sess.io_binding()
        io.bind_cpu_input("features", x)
        io.bind_ortvalue_input("h", cur[0])
        io.bind_ortvalue_input("c", cur[1])
        io.bind_output("probs", "cpu")
        io.bind_ortvalue_output("h_next", nxt[0])
        io.bind_ortvalue_output("c_next", nxt[1])
        sess.run_with_iobinding(io)
        probs_cpu = io.get_outputs()[0].numpy()

    one(0)
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < SECONDS_PER_POINT:
        one(n + 1)
        n += 1
    return n * b / (time.perf_counter() - t0)


def fp16_model(model: Path, out_dir: Path) -> Path | None:
    try:
        import onnx
        from onnx import numpy_helper  # noqa: F401

        try:
            from onnxconverter_common import float16
        except ImportError:
            return None
        m = float16.convert_float_to_float16(onnx.load(str(model)), keep_io_types=False)
        p = out_dir / (model.stem + ".fp16.onnx")
        onnx.save(m, str(p))
        return p
    except Exception:
        return None


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", required=True)
    ap.add_argument("--out", default="gpu_report.json")
    ap.add_argument("--batches", default=",".join(map(str, BATCHES)))
    a = ap.parse_args(argv)
    rep = Report(Path(a.out))
    t_start = time.perf_counter()
    try:
        cpu = StepSession(a.model, device="cpu")
    except Exception as e:
        rep.error("load", e)
        rep.data["status"] = "failed"
        rep.save()
        print(f"cannot load {a.model}: {e}")
        return 1
    rep.data["model"] = {
        "path": str(a.model),
        "version": cpu.meta.version,
        "hidden_size": cpu.hidden_size,
        "n_features": cpu.n_features,
        "categories": len(cpu.meta.categories),
    }
    gpu, why = gpu_session(Path(a.model))
    if gpu is None:
        rep.data["status"] = "skipped"
        rep.data["reason"] = f"no usable CUDA device: {why}"
        rep.save()
        print(f"no GPU: CUDA provider not usable here; skipped (report: {a.out})")
        return 0
    rep.data["device"] = gpu.session.get_provider_options().get(CUDA, {})
    try:
        import subprocess

        rep.data["nvidia_smi"] = subprocess.run(
            ["nvidia-smi", "--query-gpu=name,memory.total,driver_version", "--format=csv,noheader"],
            capture_output=True,
            text=True,
            timeout=20,
        ).stdout.strip()
    except Exception as e:
        rep.error("nvidia_smi", e)
    checks = (
        ("parity", parity),
        ("sequence_parity", sequence_parity),
        ("replay_parity", replay_parity),
        ("backfill_parity", backfill_parity),
    )
    for key, check in checks:
        try:
            rep.data[key] = res = check(cpu, gpu)
            rep.save()
            what = {
                "parity": "step graph",
                "replay_parity": "replay with the state on the device",
                "backfill_parity": "backfill block stepping",
            }.get(key)
            what = what or f"sequence graph {res['path']} ({res['kind']})"
            print(f"CUDA vs CPU parity, {what}: max |dp| = {res['max_abs_dp']:.3e}")
        except Exception as e:
            rep.error(key, e)

    batches = [int(b) for b in a.batches.split(",")]
    f, hsz = cpu.n_features, cpu.hidden_size
    variants: list[tuple[str, Path, Any]] = [("fp32", Path(a.model), np.float32)]
    p16 = fp16_model(Path(a.model), Path(a.out).resolve().parent)
    if p16 is not None:
        variants.append(("fp16", p16, np.float16))
    else:
        rep.data["fp16"] = "skipped (onnxconverter_common not installed)"
    tp: dict[str, Any] = {}
    rep.data["throughput_events_per_s"] = tp
    for name, path, dtype in variants:
        try:
            so = ort.SessionOptions()
            so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
            sess = ort.InferenceSession(str(path), sess_options=so, providers=[CUDA, CPU])
            if sess.get_providers()[0] != CUDA:
                raise RuntimeError(f"CUDA provider not granted for {name}")
        except Exception as e:
            rep.error(f"session_{name}", e)
            continue
        for mode, fn in (("run", throughput_run), ("iobinding", throughput_iobinding)):
            key = f"{name}_{mode}"
            tp[key] = {}
            for b in batches:
                if time.perf_counter() - t_start > MAX_TOTAL_SECONDS:
                    rep.data["truncated"] = f"stopped at {key} batch {b}: time budget {MAX_TOTAL_SECONDS:.0f} s"
                    break
                try:
                    tp[key][str(b)] = eps = fn(sess, b, f, hsz, dtype)
                    print(f"{key:16s} batch {b:>6d}: {eps:>14,.0f} events/s")
                except Exception as e:
                    rep.error(f"{key}_{b}", e)
                rep.save()
    failures = parity_failures(rep.data)
    rep.data["parity_tolerance"] = PARITY_TOL
    rep.data["parity_failures"] = failures
    rep.data["status"] = "parity_failed" if failures else "ok"
    rep.data["seconds"] = time.perf_counter() - t_start
    rep.save()
    for msg in failures:
        print(f"parity FAILED: {msg}")
    print(f"report: {a.out}")
    return 1 if failures else 0


if __name__ == "__main__":
    raise SystemExit(main())
