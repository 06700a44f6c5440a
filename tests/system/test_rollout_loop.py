"""The full loop on the real broker and Redis: dump the retained log -> train (a short run) on it -> export ->
backfill -> the new version's worker -> promote -> verify, every step through the CLI."""

from __future__ import annotations

import csv

import pytest

from tests.harness import applied_events, ml_events, model_names, start_worker, wait_for
from tests.system.rollout_kit import MixedFeeder, cli

pytestmark = pytest.mark.integration


def test_dump_train_export_backfill_promote_verify(
    names, kafka_bootstrap, redis_url, trained_model, data_dir, rclient, tmp_path
):
    events = ml_events(data_dir, 6000)
    users = list(dict.fromkeys(e["user_id"] for e in events))
    # one re-send (same event_id at a new offset) and one event the model rejects: neither is "applied"
    log = [*events[:100], events[50], {"user_id": "x", "item_id": "no-such-item", "ts": 1}, *events[100:]]
    MixedFeeder(kafka_bootstrap, names.input_topic, log, 0, set(users[::4])).run()
    old = model_names(names, trained_model)
    worker = start_worker(names, kafka_bootstrap, redis_url, trained_model, tmp_path / "old")
    new_worker = None
    try:
        wait_for(lambda: applied_events(rclient, names.redis_prefix, old.tag) == len(events), 180, "old applied")
        out = tmp_path / "dump"
        done = cli(names, kafka_bootstrap, redis_url, "dump", "--out", str(out), "--model", str(trained_model))
        assert done.returncode == 0, done.stderr
        assert f"dumped {len(events)} events" in done.stdout and "resent 1" in done.stdout, done.stdout
        assert "rejected_unknown_item 1" in done.stdout
        with (out / "events.csv").open() as f:
            rows = list(csv.DictReader(f))
        assert len(rows) == len(events) and sorted(r["user_id"] for r in rows) == sorted(e["user_id"] for e in events)

        model_dir = tmp_path / "retrained"
        data = ("--dataset", "csv", "--data", str(out / "events.csv"), "--items", str(out / "items.csv"))
        trained = cli(
            names, kafka_bootstrap, redis_url, "train", *data, "--out", str(model_dir), "--epochs", "1",
            "--hidden-size", "16", "--quiet", timeout=600,
        )  # fmt: skip
        assert trained.returncode == 0, trained.stdout[-2000:] + trained.stderr[-2000:]
        exported = cli(names, kafka_bootstrap, redis_url, "export", "--checkpoint", str(model_dir / "model.pt"))
        assert exported.returncode == 0, exported.stderr[-2000:]
        new_model = model_dir / "model.onnx"
        new = model_names(names, new_model)
        assert new.version != old.version

        done = cli(names, kafka_bootstrap, redis_url, "backfill", "--model", str(new_model), "--no-progress")
        assert done.returncode == 0, done.stdout + done.stderr
        assert "dead-lettered by this model's rules: unknown_item 1" in done.stdout, done.stdout
        new_worker = start_worker(names, kafka_bootstrap, redis_url, new_model, tmp_path / "new")
        wait_for(lambda: applied_events(rclient, names.redis_prefix, new.tag) == len(events), 180, "new applied")
        promoted = cli(names, kafka_bootstrap, redis_url, "promote", "--model", str(new_model))
        assert promoted.returncode == 0, promoted.stderr
        assert rclient.get(names.redis_prefix + "promoted").decode() == new.version
        verified = cli(names, kafka_bootstrap, redis_url, "verify", *data, "--model", str(new_model))
        assert verified.returncode == 0 and verified.stdout.startswith("OK:"), verified.stdout
        looked = cli(names, kafka_bootstrap, redis_url, "lookup", events[0]["user_id"], "--json")
        assert looked.returncode == 0 and new.version in looked.stdout
    finally:
        for w in (worker, new_worker):
            if w is not None:
                assert w.stop() == 0
