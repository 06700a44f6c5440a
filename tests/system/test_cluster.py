"""Workers on a real Redis Cluster (3 masters + 3 replicas on loopback), judged by the replay oracle.

* ML-100K through one worker (and ``interest-stream verify``/``lookup`` in cluster mode), then the fault suite's
  events through two workers;
* ``redis-cli --cluster reshard`` of 3000 slots while events flow: exact;
* a master ``kill -9``-ed while events flow and while its replica is cut off (stopped, its link closed: on
  loopback a replica is otherwise microseconds behind), the replica promoted by the cluster (the killed node then
  restarted, as an operator would: it rejoins as the new master's replica): with ``INTEREST_REDIS_WAIT_REPLICAS=1``
  exact; with 0 what Redis lost is measured (users, events) and recorded in artifacts/faults.jsonl;
* lookups during that failover: each answer is the user's own distribution after some number of its events (checked
  against an offline replay of that prefix), or a redis error (retryable), never another user's data.

Tests that kill or reshard start a cluster of their own; the others share the session's.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path

import numpy as np
import orjson
import pytest
import redis

from export.runtime import StepSession, replay_log
from streams.core.processor import decoder_for
from streams.local.cluster import LocalCluster, start_redis_cluster
from streams.lookup import get_interests
from streams.settings import Settings
from streams.tools.verify import verify_events
from tests.conftest import REPO
from tests.harness import applied_events, ml_events, produce, start_worker, wait_for, worker_env
from tests.system.fault_kit import WAIT, Feeder, events, oracle, record

pytestmark = pytest.mark.integration
__all__ = ["events"]  # the fault suite's module fixture (>= 20,000 ML-100K events over every user)

CLUSTER = {"INTEREST_REDIS_CLUSTER": "true", "INTEREST_REDIS_RETRY_MAX_S": "1"}


def cluster_settings(settings_for, url: str, **extra: object) -> Settings:
    return settings_for(redis_url=url, redis_cluster=True, **extra)


def cli(env: dict[str, str], *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "streams.cli", *args], env=env, cwd=REPO, capture_output=True, text=True, timeout=600
    )


def safe_applied(client, prefix: str):
    """applied_events that answers the last count while the cluster is failing over (the feeder keeps polling)."""
    last = [0]

    def count() -> int:
        with contextlib.suppress(redis.RedisError, redis.exceptions.RedisClusterException):
            last[0] = applied_events(client, prefix)
        return last[0]

    return count


def test_ml100k_through_one_worker_on_the_cluster(
    names, kafka_bootstrap, redis_cluster_url, trained_model, data_dir, cluster_client, tmp_path
):
    ml = ml_events(data_dir, 100_000)
    worker = start_worker(names, kafka_bootstrap, redis_cluster_url, trained_model, tmp_path, **CLUSTER)
    try:
        produce(kafka_bootstrap, names.input_topic, ml)
        wait_for(lambda: applied_events(cluster_client, names.redis_prefix) == len(ml), 600, "ML-100K applied")
        assert worker.metric("interest_stale_writes_total") == 0
    finally:
        assert worker.stop() == 0, worker.output()[-3000:]
    env = worker_env(names, kafka_bootstrap, redis_cluster_url, trained_model, **CLUSTER)
    done = cli(env, "verify", "--dataset", "movielens-100k", "--data", str(data_dir / "ml-100k"))
    assert done.returncode == 0 and done.stdout.startswith("OK: 943 users, 100000 events"), done.stdout + done.stderr
    looked = cli(env, "lookup", "196", "--json")
    assert looked.returncode == 0 and '"user_id":"196"' in looked.stdout, looked.stderr


def test_two_workers_on_the_cluster(
    names, kafka_bootstrap, redis_cluster_url, trained_model, events, cluster_client, settings_for, tmp_path
):
    workers = [
        start_worker(names, kafka_bootstrap, redis_cluster_url, trained_model, tmp_path, **CLUSTER) for _ in range(2)
    ]
    try:
        # both in the group before the events come: one worker alone applies them all within a second or two
        wait_for(
            lambda: all(w.metric("interest_partitions_assigned") > 0 for w in workers), WAIT, "both own partitions"
        )
        produce(kafka_bootstrap, names.input_topic, events)
        wait_for(lambda: applied_events(cluster_client, names.redis_prefix) == len(events), WAIT, "all applied")
        shares = [w.metric("interest_events_applied_total") for w in workers]
        assert sum(shares) == len(events) and min(shares) > 0, shares  # both had partitions
    finally:
        codes = [w.stop() for w in workers]
    assert codes == [0, 0]
    report = oracle(events, trained_model, cluster_settings(settings_for, redis_cluster_url), cluster_client)
    assert report.events == len(events)


@pytest.fixture
def own_cluster(tmp_path) -> LocalCluster:
    cluster = start_redis_cluster(run_dir=tmp_path / "cluster")
    yield cluster
    cluster.stop()


@pytest.mark.faults
@pytest.mark.slow
def test_reshard_of_3000_slots_while_events_flow(
    names, kafka_bootstrap, own_cluster, trained_model, events, settings_for, tmp_path
):
    cluster, n, prefix = own_cluster, len(events), names.redis_prefix
    client = cluster.client()
    worker = start_worker(names, kafka_bootstrap, cluster.url, trained_model, tmp_path, **CLUSTER)
    feeder = Feeder(
        kafka_bootstrap, names.input_topic, events, rate=600, lead=3000, applied=safe_applied(client, prefix)
    )
    feeder.start()
    try:
        wait_for(lambda: applied_events(client, prefix) >= n // 5, WAIT, "a fifth applied")
        source, target = cluster.masters()[:2]
        t0 = time.monotonic()
        cluster.reshard(source, target, 3000)
        took = time.monotonic() - t0
        at_end = applied_events(client, prefix)
        assert at_end < n, "the stream must still be flowing when the reshard ends"
        feeder.finish()
        wait_for(lambda: applied_events(client, prefix) == n, WAIT, "all events applied")
        assert worker.metric("interest_events_applied_total") == n
    finally:
        feeder.stopping = True
        code = worker.stop()
    assert code == 0, worker.output()[-3000:]
    report = oracle(events, trained_model, cluster_settings(settings_for, cluster.url), client)
    assert cluster.slots_of(target) >= 5461 + 3000 - 1  # it owned a third of 16384 before
    record("cluster_reshard_3000_slots", events=n, users=report.users, reshard_s=round(took, 1), max_dp=report.max_dp)
    client.close()


def prefix_oracle(trained_model: Path, settings: Settings, stream: list[dict], users: list[str]) -> dict:
    """Per user of ``users``: the distribution after each count of its events (1, 2, ...), replayed offline."""
    session = StepSession(trained_model, device="cpu")
    decoder = decoder_for(session, settings, session.load_catalog(settings.catalog_path))
    logs: dict[str, list] = {u: [] for u in users}
    for e in stream:
        if e["user_id"] in logs:
            c = decoder.decode(orjson.dumps(e))
            logs[c.user_id].append((c.user_id, c.categories, c.action, c.ts))
    return {u: {k: replay_log(session, log[:k])[u].probs for k in range(1, len(log) + 1)} for u, log in logs.items()}


class Lookups(threading.Thread):
    """``get_interests`` for a few users in a loop (its own cluster client, as a reader service would have)."""

    def __init__(self, settings: Settings, users: list[str]):
        super().__init__(daemon=True)
        self.settings, self.users = settings, users
        self.answers: list[tuple[str, int, list[float]]] = []
        self.errors: list[str] = []
        self.stopping = False

    def run(self) -> None:
        client = None
        while not self.stopping:
            for u in self.users:
                try:
                    client = client or redis.RedisCluster.from_url(self.settings.redis_url, socket_timeout=2)
                    got = get_interests(u, self.settings, client)
                    if got is not None:
                        self.answers.append((u, got.events, got.probs))
                except (redis.RedisError, redis.exceptions.RedisClusterException) as exc:
                    self.errors.append(type(exc).__name__)
                    client = None
                    time.sleep(0.05)


@pytest.mark.faults
@pytest.mark.slow
@pytest.mark.parametrize("wait", [1, 0])
def test_master_kill_9_while_events_flow(
    wait, names, kafka_bootstrap, own_cluster, trained_model, events, settings_for, tmp_path
):
    cluster, n, prefix = own_cluster, len(events), names.redis_prefix
    client = cluster.client()
    settings = cluster_settings(settings_for, cluster.url)
    extra = {**CLUSTER, "INTEREST_REDIS_WAIT_REPLICAS": str(wait), "INTEREST_REDIS_WAIT_TIMEOUT_MS": "200"}
    worker = start_worker(names, kafka_bootstrap, cluster.url, trained_model, tmp_path, **extra)
    watched = list(dict.fromkeys(e["user_id"] for e in events))[:12]
    lookups = Lookups(settings, watched)
    feeder = Feeder(
        kafka_bootstrap, names.input_topic, events, rate=800, lead=3000, applied=safe_applied(client, prefix)
    )
    feeder.start()
    lookups.start()
    try:
        # with WAIT 0 later in the stream, so that the lost writes are not all rewritten by the users' next events
        # (at 70 %: enough of the stream left for the ~100 KB of writes the replica must miss)
        wait_for(lambda: applied_events(client, prefix) >= n * (0.5 if wait else 0.7), WAIT, "events applied")
        victim = next(p for p in cluster.masters() if p != cluster.nodes[0].port)
        # its replica is cut off (stopped, its link closed: a partition) while writes go on, then the master dies:
        # the replica promoted lacks what the master acknowledged meanwhile (on loopback a replica is otherwise
        # microseconds behind, and a stopped one still gets the bytes into its socket buffer)
        replica = cluster.replica_of(victim)
        with cluster.node_client(victim) as master:
            offset = lambda: master.info("replication")["master_repl_offset"]  # noqa: E731
            before = offset()
            os.kill(replica.pid, signal.SIGSTOP)
            try:
                master.execute_command("CLIENT KILL TYPE replica")  # the link is cut: nothing more reaches it
                # with WAIT 1 the worker stalls on the first batch the replica lacks (that is the point); with 0
                # it goes on writing: let it get ~100 KB (~60 users' writes) ahead
                lag = 1 if wait else 100_000
                wait_for(lambda: offset() >= before + lag, WAIT, "writes the replica lacks", interval=0.02)
                cluster.kill(victim)
            finally:
                os.kill(replica.pid, signal.SIGCONT)
        t_kill = time.monotonic()
        wait_for(lambda: len(cluster.masters()) == 3 and cluster.healthy(), 60, "a replica promoted")
        promoted_s = time.monotonic() - t_kill
        cluster.restart(victim)  # back as a replica: the new master has one again, WAIT 1 can be met
        cluster.wait_healthy()
        feeder.finish()
        wait_for(lambda: worker.metric("interest_events_applied_total") >= n, WAIT, "every event applied")
    finally:
        feeder.stopping = lookups.stopping = True
        code = worker.stop()
    assert code == 0, worker.output()[-3000:]
    lookups.join(10)
    client = cluster.client()
    report = verify_events(events, StepSession(trained_model, device="cpu"), settings, client)
    per_user = Counter(e["user_id"] for e in events)  # every event has its own id: none is a re-send
    lost_events = sum(want - got for _, want, got in report.wrong_count) + sum(per_user[u] for u in report.missing)
    record(
        f"cluster_master_kill_9_wait_{wait}",
        events=n,
        users=report.users,
        promoted_s=round(promoted_s, 1),
        users_lost=len(report.missing) + len(report.wrong_count),
        events_lost=lost_events,
        missing_users=len(report.missing),
        lookups=len(lookups.answers),
        lookup_errors=len(lookups.errors),
        lookup_error_kinds=sorted(set(lookups.errors)),
        max_dp=report.max_dp,
    )
    if wait:
        assert report.ok, report.summary()
    else:  # what a failover without WAIT loses: only acked writes the replica had not yet received, never garbage
        assert not report.mismatched or all(u in {w[0] for w in report.wrong_count} for u, _ in report.mismatched)
        assert all(got < want for _, want, got in report.wrong_count), report.wrong_count
    # lookups: every answer is that user's own distribution after some prefix of its events
    expected = prefix_oracle(trained_model, settings, events, watched)
    assert len(lookups.answers) > 50
    for u, k, probs in lookups.answers:
        assert k in expected[u], (u, k)
        assert float(np.max(np.abs(np.asarray(probs) - expected[u][k]))) <= 1e-5, (u, k)
    client.close()
