import json
import math
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch

from export import gpu_check
from export.runtime import CPU, CUDA, StepSession, gpu_device_present, max_abs_diff, replay_log, worst
from models.checkpoint import load_checkpoint
from models.data import load_dataset
from models.errors import ModelError
from models.features import FeatureEncoder
from models.metrics import evaluate
from tests.model_fixtures import ML100K


@pytest.fixture(scope="module")
def session(trained_model: Path) -> StepSession:
    return StepSession(trained_model, device="cpu", intra_op_threads=1)


def test_session_basics(session: StepSession):
    assert session.provider == CPU
    k, h = len(session.meta.categories), session.meta.hidden_size
    for b in (1, 3, 1000):
        x = session.encoder.encode([(0,)] * b, [0] * b, np.full(b, np.nan))
        p, hn, cn = session.step(x, *session.initial_state(b))
        assert p.shape == (b, k) and hn.shape == cn.shape == (b, h) and p.dtype == np.float32
        assert np.allclose(p.sum(axis=1), 1, atol=1e-5)
    with pytest.raises(ValueError, match="step wants"):
        session.step(np.zeros((2, 3), np.float32), *session.initial_state(2))


def test_cold_start_gets_learned_prior(session: StepSession, trained_model: Path):
    model, _ = load_checkpoint(trained_model.with_name("model.pt"))
    meta = session.meta
    h, c = session.initial_state(4)
    assert np.array_equal(h[2], meta.h0) and np.array_equal(c[3], meta.c0)
    h0, c0 = model.initial_state(1)
    assert np.array_equal(meta.h0, h0[0].detach().numpy()) and np.array_equal(meta.c0, c0[0].detach().numpy())
    assert np.allclose(meta.prior, model.prior().numpy(), atol=1e-7)
    # a sensible prior: far from uniform, close to the category popularity of users' next events
    rep = json.loads(trained_model.with_name("report.json").read_text())
    k = len(meta.categories)
    ds = load_dataset("movielens-100k", ML100K)
    firsts = [evs[0] for evs in ds.by_user().values()]
    y = session.encoder.encode(
        [session.encoder.category_indices(ds.catalog[e.item_id]) for e in firsts],
        [0] * len(firsts),
        np.full(len(firsts), np.nan),
    )[:, :k]
    ce_prior = evaluate(np.tile(meta.prior, (len(y), 1)), y)["ce"]
    ce_uniform = evaluate(np.full((len(y), k), 1 / k), y)["ce"]
    assert ce_prior < ce_uniform - 0.3
    assert np.allclose(meta.prior, rep["prior"], atol=1e-6)
    # replay of a user without events is the prior; a user's first step starts from h0/c0
    out = replay_log(session, [("new", (meta.category_index["Drama"],), 0, 1000.0)])
    x = session.encoder.encode([(meta.category_index["Drama"],)], [0], np.array([np.nan]))
    p, _, _ = session.step(x, *session.initial_state(1))
    assert np.array_equal(out["new"].probs, p[0]) and out["new"].n_events == 1


def test_replay_matches_pytorch(session: StepSession, trained_model: Path):
    model, _ = load_checkpoint(trained_model.with_name("model.pt"))
    enc: FeatureEncoder = session.encoder
    ds = load_dataset("movielens-100k", ML100K)
    users = list(ds.by_user().items())[:25]
    events = [
        (e.user_id, enc.category_indices(ds.catalog[e.item_id]), enc.action_index(e.action), e.ts)
        for e in ds.events
        if e.user_id in dict(users)
    ]
    out = replay_log(session, events)
    assert set(out) == {u for u, _ in users}
    for u, evs in users[:5]:
        mine = [e for e in events if e[0] == u]
        ts = np.array([e[3] for e in mine])
        x = enc.encode([e[1] for e in mine], [e[2] for e in mine], np.concatenate([[np.nan], np.diff(ts)]))
        with torch.no_grad():
            p = model(torch.from_numpy(x[None]))[0, -1].numpy()
        assert np.abs(out[u].probs - p).max() < 1e-5
        assert out[u].n_events == len(evs) and out[u].last_ts == evs[-1].ts
    # the state kept in device buffers between rounds (CUDA's path; here on the CPU device), in chunks of 7 users
    # bound by pointer offset: the same bits
    dev = replay_log(session, events, max_batch=7, device_state=True)
    for u in out:
        assert np.array_equal(dev[u].probs, out[u].probs) and dev[u].n_events == out[u].n_events, u
        assert np.array_equal(dev[u].h, out[u].h) and np.array_equal(dev[u].c, out[u].c), u


def test_encoder_layout(session: StepSession):
    enc, meta = session.encoder, session.meta
    k, a = len(meta.categories), len(meta.actions)
    x = enc.encode([(0, 2, 2), (1,)], [enc.action_index(None), enc.action_index("5")], np.array([np.nan, -5.0]))
    assert x.shape == (2, meta.n_features) and x.dtype == np.float32
    assert x[0, :k].tolist()[:3] == [0.5, 0.0, 0.5] and x[1, 1] == 1.0
    assert x[0, k + meta.actions.index(meta.default_action)] == 1 and x[1, k + 4] == 1
    assert x[0, k + a + 1] == 1.0 and x[1, k + a + 1] == 0.0 and x[1, k + a] == 0.0  # nan -> first; -5 -> 0
    with pytest.raises(KeyError, match="Nope"):
        enc.category_indices(["Drama", "Nope"])
    with pytest.raises(KeyError):
        enc.action_index("6")


def test_bad_model_files(tmp_path: Path, trained_model: Path):
    with pytest.raises(ModelError, match="not found"):
        StepSession(tmp_path / "none.onnx")
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(trained_model.read_bytes()[:500])
    with pytest.raises(ModelError, match="not a loadable ONNX model"):
        StepSession(bad, device="cpu")
    proto = onnx.load(str(trained_model))
    del proto.metadata_props[:]
    foreign = tmp_path / "foreign.onnx"
    onnx.save(proto, str(foreign))
    with pytest.raises(ModelError, match="not an interest-stream model"):
        StepSession(foreign, device="cpu")
    with pytest.raises(ModelError, match="device"):
        StepSession(trained_model, device="tpu")


def test_cuda_request_without_gpu(trained_model: Path):
    try:
        s = StepSession(trained_model, device="cuda")
    except ModelError as e:
        assert "CUDA" in str(e)
    else:
        assert s.provider == "CUDAExecutionProvider"


def test_catalog(session: StepSession, trained_model: Path, tmp_path: Path):
    cat = session.load_catalog()
    assert len(cat) == 1682 and all(cat.values())
    assert cat["1"] == session.encoder.category_indices(["Animation", "Children's", "Comedy"])
    moved = tmp_path / "model.onnx"
    moved.write_bytes(trained_model.read_bytes())
    (tmp_path / "catalog.csv").write_text("item_id,categories\n1,Drama\n")
    with pytest.raises(ModelError, match="sha256"):
        StepSession(moved, device="cpu").load_catalog()
    other = tmp_path / "other.csv"
    other.write_text("item_id,categories\n1,Drama\n2,Cooking\n")
    with pytest.raises(ModelError, match=r"other\.csv:3: category 'Cooking'"):
        session.load_catalog(other)


def test_gpu_check_without_gpu(trained_model: Path, tmp_path: Path):
    if StepSession(trained_model).provider != CPU:
        pytest.skip("a GPU is present: run python -m export.gpu_check instead")
    out = tmp_path / "gpu.json"
    assert gpu_check.main(["--model", str(trained_model), "--out", str(out)]) == 0
    rep = json.loads(out.read_text())
    assert rep["status"] == "skipped" and "CUDA" in rep["reason"]


def test_auto_without_a_gpu_device_is_quiet(trained_model: Path, capfd: pytest.CaptureFixture[str], monkeypatch):
    from export import runtime

    # onnxruntime-gpu lists CUDA everywhere; without an NVIDIA device, auto must not even try it (the attempt prints
    # CUDA loader errors to stderr on every worker start)
    monkeypatch.setattr(runtime, "gpu_device_present", lambda: False)
    s = StepSession(trained_model, device="auto")
    assert s.provider == CPU
    err = capfd.readouterr().err
    assert "Failed to load" not in err and "onnxruntime" not in err, err[:500]


def test_gpu_check_sequence_parity_runs_on_two_sessions(trained_model: Path):
    """The GPU check's sequence-graph section, here with two CPU sessions (on a GPU box the second is CUDA)."""
    a, b = StepSession(trained_model, device="cpu"), StepSession(trained_model, device="cpu")
    rep = gpu_check.sequence_parity(a, b, blocks=((1, 20), (5, 7)))
    assert rep["kind"] == "unpacked" and rep["path"] == "model.seq.onnx"
    assert set(rep) >= {"1x20", "5x7"} and rep["max_abs_dp"] == 0.0


def test_cuda_listed_but_not_granted_falls_back_to_cpu(trained_model: Path, monkeypatch):
    """The provider is judged by session.get_providers() after creation, not by get_available_providers()."""
    from export import runtime

    real, calls = runtime.ort.InferenceSession, []

    class CpuOnlySession:  # a box whose onnxruntime-gpu lists CUDA but cannot start it
        def __init__(self, path, sess_options=None, providers=None):
            calls.append((providers, sess_options))
            self._s = real(path, sess_options=sess_options, providers=[CPU])

        def get_providers(self):
            return [CPU]

        def __getattr__(self, name):
            return getattr(self._s, name)

    cpu = StepSession(trained_model, device="cpu")
    x = cpu.encoder.encode([(0,), (1, 2)], [0, 1], np.array([np.nan, 60.0]))
    ref, _, _ = cpu.step(x, *cpu.initial_state(2))
    monkeypatch.setattr(runtime, "gpu_device_present", lambda: True)
    monkeypatch.setattr(runtime.ort, "get_available_providers", lambda: [CUDA, CPU])
    monkeypatch.setattr(runtime.ort, "InferenceSession", CpuOnlySession)
    s = StepSession(trained_model, device="auto")
    assert s.provider == CPU and "CPUExecutionProvider" in repr(s)
    assert calls[0][0][0][0] == CUDA and calls[1][0] == [CPU]  # tried CUDA, then rebuilt for CPU
    assert calls[1][1].get_session_config_entry("session.intra_op.allow_spinning") == "0"
    p, _, _ = s.step(x, *s.initial_state(2))  # plain run(), not the CUDA IOBinding path
    assert np.array_equal(p, ref)
    with pytest.raises(ModelError, match="device=cuda requested but the CUDA provider is not usable"):
        StepSession(trained_model, device="cuda")


def test_parity_figures_are_nan_aware():
    assert worst(0.0, float("nan"), 1e-7) == math.inf and worst() == 0.0 and worst(1e-7, 3e-7) == 3e-7
    assert max_abs_diff(np.zeros(3), np.array([0.0, np.nan, 0.0])) == math.inf
    assert max_abs_diff(np.array([np.inf]), np.array([np.inf])) == math.inf
    assert max_abs_diff(np.ones(2), np.array([1.0, 0.5])) == 0.5
    ok = {"parity": {"1": {"max_abs_dp": 1e-7, "max_abs_dstate": 0.0}, "max_abs_dp": 1e-7}}
    assert gpu_check.parity_failures(ok) == []
    bad = {"parity": {"1": {"max_abs_dp": float("nan")}}, "sequence_parity": {"1x2": {"max_abs_dstate": 2e-5}}}
    assert gpu_check.parity_failures(bad) == [
        "parity.1.max_abs_dp = nan > 1e-05",
        "sequence_parity.1x2.max_abs_dstate = 2.000e-05 > 1e-05",
    ]
    assert gpu_check.parity_failures({"errors": {"sequence_parity": "RuntimeError: x"}}) == [
        "sequence_parity: raised RuntimeError: x"
    ]


class _Drifting(StepSession):
    """A CPU session whose probabilities are off by `shift` (NaN: a broken provider), standing in for the GPU."""

    shift = 0.0

    def step(self, features, h, c):
        p, hn, cn = super().step(features, h, c)
        return p + np.float32(self.shift), hn, cn


@pytest.mark.parametrize(
    ("shift", "status", "rc"), [(0.0, "ok", 0), (1e-3, "parity_failed", 1), (np.nan, "parity_failed", 1)]
)
def test_gpu_check_status_on_two_cpu_sessions(trained_model: Path, tmp_path: Path, monkeypatch, shift, status, rc):
    """The whole check with a CPU session in the GPU's place: parity decides the status and exit code."""
    fake = _Drifting(trained_model, device="cpu")
    fake.shift = shift
    monkeypatch.setattr(gpu_check, "gpu_session", lambda model: (fake, ""))
    out = tmp_path / "gpu.json"
    assert gpu_check.main(["--model", str(trained_model), "--out", str(out), "--batches", "1"]) == rc
    rep = json.loads(out.read_text())
    assert rep["status"] == status and rep["parity_tolerance"] == 1e-5
    assert rep["sequence_parity"]["max_abs_dp"] == 0.0  # the sequence graph does not go through step()
    assert (rep["replay_parity"]["max_abs_dp"] == 0.0) == (rc == 0) and rep["replay_parity"]["events"] > 3000
    assert bool(rep["parity_failures"]) == (rc == 1)
    assert not set(rep.get("errors", {})) & set(gpu_check.PARITY_SECTIONS)
    if not gpu_device_present():  # throughput needs CUDA: its errors are recorded, but are no parity failure
        assert "session_fp32" in rep["errors"]


def test_gpu_check_fails_when_a_parity_section_raises(trained_model: Path, tmp_path: Path, monkeypatch):
    def broken(cpu, gpu):
        raise RuntimeError("CUDA kernel failed")

    monkeypatch.setattr(gpu_check, "gpu_session", lambda model: (StepSession(model, device="cpu"), ""))
    monkeypatch.setattr(gpu_check, "sequence_parity", broken)
    out = tmp_path / "gpu.json"
    assert gpu_check.main(["--model", str(trained_model), "--out", str(out), "--batches", "1"]) == 1
    rep = json.loads(out.read_text())
    assert rep["status"] == "parity_failed" and rep["parity"]["max_abs_dp"] == 0.0
    assert rep["parity_failures"] == ["sequence_parity: raised RuntimeError: CUDA kernel failed"]
