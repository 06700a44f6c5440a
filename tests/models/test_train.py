import argparse
import json
from pathlib import Path

import pytest
import torch

from models.checkpoint import load_checkpoint
from models.errors import ConfigError, ModelError
from models.model import InterestModel, ModelConfig
from models.train import TrainConfig, add_arguments, configs_from_args, run, skipped_note, train
from tests.model_fixtures import write_csv_dataset

TINY = TrainConfig(epochs=2, patience=5, batch_users=8, threads=1)


def _train_tiny(folder: Path, data: tuple[Path, Path], seed: int = 3) -> dict:
    tc = TrainConfig(**{**TINY.__dict__, "seed": seed})
    return train("csv", data[0], folder, data[1], tc=tc, model_overrides={"hidden_size": 16}, progress=False)


@pytest.fixture(scope="module")
def csv_data(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    return write_csv_dataset(tmp_path_factory.mktemp("csv"))


def test_deterministic_with_seed(tmp_path: Path, csv_data):
    r1 = _train_tiny(tmp_path / "a", csv_data)
    r2 = _train_tiny(tmp_path / "b", csv_data)
    r3 = _train_tiny(tmp_path / "c", csv_data, seed=4)
    s1 = load_checkpoint(tmp_path / "a" / "model.pt")[1]["state_dict"]
    s2 = load_checkpoint(tmp_path / "b" / "model.pt")[1]["state_dict"]
    s3 = load_checkpoint(tmp_path / "c" / "model.pt")[1]["state_dict"]
    assert all(torch.equal(s1[k], s2[k]) for k in s1)
    assert not all(torch.equal(s1[k], s3[k]) for k in s1)
    assert r1["version"] == r2["version"] != r3["version"]
    assert r1["test"] == r2["test"]


def test_outputs_and_checkpoint(tmp_path: Path, csv_data):
    _train_tiny(tmp_path, csv_data)
    for f in ("model.pt", "report.json", "report.md", "learning_curves.png", "users.png"):
        assert (tmp_path / f).stat().st_size > 0, f
    rep = json.loads((tmp_path / "report.json").read_text())
    assert set(rep["test"]) == {"lstm", "popularity", "decayed_histogram", "markov"}
    assert set(rep["val"]) == set(rep["test"])
    assert {"ce", "top3_mass", "precision@3", "recall@3", "f1@3", "accuracy@1"} == set(rep["test"]["lstm"])
    assert rep["dataset"]["events"] == 24 * 40
    assert "| lstm |" in (tmp_path / "report.md").read_text()
    # a plain dict of tensors and plain types: loads with weights_only=True
    ck = torch.load(tmp_path / "model.pt", weights_only=True)
    assert ck["vocab"]["categories"] and ck["catalog"]["i0"] == ["c0", "c1"]
    model, _ = load_checkpoint(tmp_path / "model.pt")
    assert isinstance(model, InterestModel) and not model.training


def test_bad_checkpoints(tmp_path: Path):
    bad = tmp_path / "model.pt"
    bad.write_bytes(b"this is not a checkpoint")
    with pytest.raises(ModelError, match="not a readable checkpoint"):
        load_checkpoint(bad)
    torch.save({"weights": torch.zeros(2)}, bad)
    with pytest.raises(ModelError, match="not an interest-stream checkpoint"):
        load_checkpoint(bad)
    with pytest.raises(ModelError, match="not found"):
        load_checkpoint(tmp_path / "missing.pt")


def test_cli_arguments():
    ap = argparse.ArgumentParser()
    add_arguments(ap)
    a = ap.parse_args(
        [
            "--dataset",
            "csv",
            "--data",
            "e",
            "--items",
            "i",
            "--out",
            "o",
            "--seed",
            "7",
            "--top-k",
            "9",
            "--hidden-size",
            "32",
            "--no-drift",
        ]
    )
    tc, mc = configs_from_args(a)
    assert (tc.seed, tc.top_k, tc.epochs) == (7, 9, TrainConfig().epochs)
    assert mc == {"hidden_size": 32, "state_drift": False}
    with pytest.raises(ConfigError):
        configs_from_args(ap.parse_args(["--dataset", "csv", "--data", "e", "--out", "o", "--epochs", "0"]))


@pytest.mark.parametrize("members", [1, 3])
def test_step_matches_sequence_forward(members: int):
    torch.manual_seed(0)
    m = InterestModel(ModelConfig(n_categories=5, n_actions=3, hidden_size=8, n_members=members)).eval()
    assert m.cfg.state_size == members * (8 + 5 * 4 // 2)
    x = torch.rand(3, 6, m.cfg.n_features)
    full = m(x)
    h, c = m.initial_state(3)
    assert h.shape == (3, m.cfg.state_size)
    assert torch.allclose(full[:, 0], m.probs(h, c))
    for t in range(6):
        h, c = m.step(x[:, t], h, c)
        assert torch.allclose(full[:, t + 1], m.probs(h, c), atol=1e-6)
    assert torch.allclose(full.sum(-1), torch.ones(3, 7), atol=1e-5)


def test_ensemble_is_the_mean_of_independent_members():
    """Member i of an ensemble computes exactly what a one-member model with member i's weights computes."""
    torch.manual_seed(1)
    cfg = ModelConfig(n_categories=5, n_actions=3, hidden_size=8, n_members=3)
    ens = InterestModel(cfg).eval()
    x = torch.rand(2, 7, cfg.n_features)
    singles = []
    for i in range(3):
        one = InterestModel(ModelConfig(**{**cfg.to_dict(), "n_members": 1})).eval()
        one.load_state_dict({k: v[i : i + 1] for k, v in ens.state_dict().items()})
        singles.append(one(x))
    assert torch.allclose(ens.forward_members(x), torch.stack(singles), atol=1e-6)
    assert torch.allclose(ens(x), torch.stack(singles).mean(0), atol=1e-6)


@pytest.mark.parametrize(
    ("members", "head_hidden", "memory"), [(1, 0, True), (3, 0, True), (2, 8, True), (2, 0, False)]
)
def test_export_step_matches_model(members: int, head_hidden: int, memory: bool):
    """StepModel (the exported graph, with its fused weights) == InterestModel.step + probs."""
    from models.model import StepModel

    torch.manual_seed(2)
    cfg = ModelConfig(n_categories=5, n_actions=3, hidden_size=8, n_members=members, head_hidden=head_hidden)
    cfg.memory = memory
    m = InterestModel(cfg)
    with torch.no_grad():
        for p in m.parameters():  # trained weights are not the zero-initialised ones
            p.normal_(0, 0.5)
    m.eval()
    step = StepModel(m)
    x = torch.rand(4, 6, cfg.n_features)
    full = m(x)
    h, c = m.initial_state(4)
    h2, c2 = h, c
    for t in range(6):
        p, h, c = step(x[:, t], h, c)
        h2, c2 = m.step(x[:, t], h2, c2)
        assert torch.allclose(p, full[:, t + 1], atol=1e-6)
        assert torch.allclose(h, h2, atol=1e-6) and torch.allclose(c, c2, atol=1e-6)


def test_training_target_mixes_only_train_events():
    from models.train import training_target

    y = torch.eye(3).repeat(1, 2, 1)[:, :5]  # (1, 5, 3): categories 0 1 2 0 1
    mask = torch.tensor([[1.0, 1, 1, 1, 0]])  # the 5th is not a train target
    out = training_target(y, mask, TrainConfig(aux_horizon=2, aux_weight=0.5))
    assert torch.allclose(out[0, 0], torch.tensor([0.75, 0.25, 0]))
    assert torch.allclose(out[0, 3], torch.tensor([1.0, 0, 0]))  # the window stops at the train prefix
    assert torch.allclose(training_target(y, mask, TrainConfig()), y)


def test_trained_model_beats_popularity(trained_model: Path):
    rep = json.loads((trained_model.parent / "report.json").read_text())
    lstm, pop = rep["test"]["lstm"], rep["test"]["popularity"]
    assert lstm["ce"] < pop["ce"] and lstm["top3_mass"] > pop["top3_mass"]


def test_shuffle_ties_only_permutes_within_equal_timestamps():
    import numpy as np

    from models.train import shuffle_ties

    rng = np.random.default_rng(0)
    ts = np.array([0.0, 5, 5, 5, 9, 9, 12])
    x = np.arange(7 * 4, dtype=np.float32).reshape(7, 4)  # last 2 columns play the time features
    seen = set()
    for _ in range(30):
        out = shuffle_ties(x, ts, 6, 2, rng)  # only the first 6 events (a train prefix)
        assert out.shape == (6, 4)
        assert np.array_equal(out[:, 2:], x[:6, 2:])  # time columns stay by position
        assert out[0, 0] == x[0, 0]
        assert sorted(out[1:4, 0]) == sorted(x[1:4, 0]) and sorted(out[4:6, 0]) == sorted(x[4:6, 0])
        seen.add(tuple(out[:, 0]))
    assert len(seen) > 1


def test_loads_checkpoints_written_before_ensembles(tmp_path: Path):
    """A one-model checkpoint (nn.Linear layout, no n_members in its config) loads as a one-member model."""
    from models.checkpoint import FORMAT, FORMAT_VERSION

    torch.manual_seed(3)
    m = InterestModel(ModelConfig(n_categories=5, n_actions=3, hidden_size=8)).eval()
    old = {
        k: v.reshape(-1) if k in ("h0", "c0") or k.endswith(".bias") else v[0].t().contiguous()
        for k, v in m.state_dict().items()
    }
    assert old["cell.proj.weight"].shape == (4 * 8, 5 + 8 + 2 + 8)  # (out, in) as nn.Linear kept it
    cfg = m.cfg.to_dict()
    del cfg["n_members"]
    ck = {"format": FORMAT, "format_version": FORMAT_VERSION, "version": "csv-0", "config": cfg, "state_dict": old}
    torch.save(ck, tmp_path / "model.pt")
    loaded, _ = load_checkpoint(tmp_path / "model.pt")
    x = torch.rand(2, 5, m.cfg.n_features)
    assert loaded.cfg.n_members == 1 and torch.allclose(loaded(x), m(x))


def test_checkpoint_with_a_config_the_model_rejects(tmp_path: Path):
    """A config the model constructor refuses (ValueError) is a ModelError naming the file, not a traceback."""
    from models.checkpoint import FORMAT, FORMAT_VERSION

    m = InterestModel(ModelConfig(n_categories=5, n_actions=3, hidden_size=8))
    cfg = {**m.cfg.to_dict(), "n_members": 0}
    ck = {"format": FORMAT, "format_version": FORMAT_VERSION, "version": "csv-0", "config": cfg}
    torch.save({**ck, "state_dict": m.state_dict()}, tmp_path / "model.pt")
    with pytest.raises(ModelError, match=r"model\.pt: invalid model config in checkpoint \(n_members must be >= 1"):
        load_checkpoint(tmp_path / "model.pt")


def test_skipped_rows_are_reported_at_training_start(tmp_path: Path, csv_data, capsys):
    assert skipped_note({"dataset": "csv", "skipped_unknown_item": 0}) is None
    assert skipped_note({"dataset": "csv", "skipped_unknown_item": 2}) == (
        "csv: 2 event rows skipped (unknown item: 2); see report.json"
    )
    events = tmp_path / "events.csv"
    events.write_text(csv_data[0].read_text() + "u0,nope,1600000000,view\nu1,nope,1600000001,view\n")
    ap = argparse.ArgumentParser()
    add_arguments(ap)
    args = ["--dataset", "csv", "--data", str(events), "--items", str(csv_data[1]), "--out", str(tmp_path / "m")]
    assert run(ap.parse_args([*args, "--epochs", "1", "--hidden-size", "8", "--quiet"])) == 0
    assert "csv: 2 event rows skipped (unknown item: 2)" in capsys.readouterr().err
    assert json.loads((tmp_path / "m" / "report.json").read_text())["dataset"]["skipped_unknown_item"] == 2
