"""The rollout on a Redis Cluster: the old version's worker applies part of the log, NEW is backfilled, its worker
catches up, NEW is promoted (readers follow the pointer, a single key on one master, to NEW's per-user hashes on all
three), verify judges NEW exactly, and the retired old version's hashes are gone from every master."""

from __future__ import annotations

import pytest

from streams.lookup import get_interests
from tests.harness import applied_events, ml_events, model_names, produce, start_worker, user_keys, wait_for
from tests.system.rollout_kit import cli, new_model

pytestmark = pytest.mark.integration
__all__ = ["new_model"]  # the second model's fixture

CLUSTER = {"INTEREST_REDIS_CLUSTER": "true"}
WAIT = 240


def test_backfill_promote_verify_retire_on_the_cluster(
    names,
    kafka_bootstrap,
    redis_cluster_url,
    trained_model,
    new_model,
    data_dir,
    cluster_client,
    settings_for,
    tmp_path,
):
    events = ml_events(data_dir, 8000)
    first, rest = events[:6000], events[6000:]
    old, new = model_names(names, trained_model), model_names(names, new_model)
    prefix = names.redis_prefix
    run = lambda *args: cli(names, kafka_bootstrap, redis_cluster_url, *args, **CLUSTER)  # noqa: E731

    old_worker = start_worker(names, kafka_bootstrap, redis_cluster_url, trained_model, tmp_path / "old", **CLUSTER)
    try:
        produce(kafka_bootstrap, names.input_topic, first)
        wait_for(lambda: applied_events(cluster_client, prefix, old.tag) == len(first), WAIT, "old applied")
    finally:
        assert old_worker.stop() == 0, old_worker.output()[-3000:]
    done = run("backfill", "--model", str(new_model), "--no-progress")
    assert done.returncode == 0, done.stdout + done.stderr
    assert applied_events(cluster_client, prefix, new.tag) == len(first)
    masters = {cluster_client.get_node_from_key(k).name for k in user_keys(cluster_client, prefix, new.tag)}
    assert len(masters) == 3, masters  # NEW's hashes spread over every master

    new_worker = start_worker(names, kafka_bootstrap, redis_cluster_url, new_model, tmp_path / "new", **CLUSTER)
    try:
        produce(kafka_bootstrap, names.input_topic, rest)
        wait_for(lambda: applied_events(cluster_client, prefix, new.tag) == len(events), WAIT, "NEW caught up")
        # the lag counts what NEW's group has committed: promote once its commit caught up too
        wait_for(lambda: run("promote", "--model", str(new_model)).returncode == 0, 60, "NEW promoted")
        user = events[-1]["user_id"]
        got = get_interests(user, settings_for(redis_url=redis_cluster_url, redis_cluster=True))
        assert (
            got is not None
            and got.model_version == new.version
            and got.events == sum(1 for e in events if e["user_id"] == user)
        )
    finally:
        assert new_worker.stop() == 0, new_worker.output()[-3000:]
    verified = run(
        "verify", "--model", str(new_model), "--dataset", "movielens-100k", "--data", str(data_dir / "ml-100k"),
        "--limit", str(len(events)),
    )  # fmt: skip
    assert verified.returncode == 0 and verified.stdout.startswith("OK"), verified.stdout + verified.stderr
    retired = run("retire", "--version", old.version)
    assert retired.returncode == 0, retired.stdout + retired.stderr
    assert user_keys(cluster_client, prefix, old.tag) == [] and user_keys(cluster_client, prefix, new.tag)
