"""The state store on a real Redis Cluster (slot-grouped script calls, MOVED/ASK/TRYAGAIN followed) and WAIT for
replicas (one Redis with a replica, and the cluster): judged by the replay oracle and by what the nodes hold."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal

import pytest
import redis
from redis.crc import key_slot

from export.runtime import StepSession
from streams.core.processor import InterestProcessor
from streams.core.routing import slot_groups
from streams.core.state import StateStore, promoted_key, user_key, version_tag
from streams.local.services import free_port, start_redis, wait_until
from streams.lookup import get_interests
from streams.tools.verify import verify_events
from tests.harness import raw_messages

pytestmark = pytest.mark.integration


def test_slot_groups_hold_one_slot_each_and_every_key_once():
    keys = [f"p:{i}" for i in range(3000)] + ["a{tag}x", "b{tag}y", "{tag}"]  # hash tags share a slot
    groups = slot_groups(keys, 4)
    assert sorted(i for g in groups for i in g) == list(range(len(keys)))
    for g in groups:
        assert 1 <= len(g) <= 4 and len({key_slot(keys[i].encode()) for i in g}) == 1
    tagged = next(g for g in groups if len(keys) - 1 in g)
    assert sorted(tagged) == [len(keys) - 3, len(keys) - 2, len(keys) - 1]


def _processor(settings, trained_model) -> tuple[InterestProcessor, StepSession]:
    session = StepSession(trained_model, device="cpu")
    store = StateStore(settings, session.meta.version, session.meta.hidden_size)
    return InterestProcessor(session, store, settings, session.load_catalog(), {settings.input_topic: 4}), session


async def _apply(proc: InterestProcessor, msgs) -> None:
    await proc.store.start()
    try:
        plan = await proc.prepare(msgs)
        await proc.write(plan)
    finally:
        await proc.store.close()


def _events(users: int, per_user: int, start: int = 0) -> list[dict]:
    return [
        {
            "user_id": f"u{u}",
            "item_id": str(1 + (u * 7 + k) % 1600),
            "ts": 1000 + 60 * (start + k),
            "event_id": f"{u}-{k}",
        }
        for k in range(start, start + per_user)
        for u in range(users)
    ]


def test_batches_on_the_cluster_match_the_oracle_on_every_master(
    settings_for, redis_cluster_url, cluster_client, trained_model
):
    settings = settings_for(redis_url=redis_cluster_url, redis_cluster=True)
    events = _events(600, 3)
    proc, session = _processor(settings, trained_model)
    asyncio.run(_apply(proc, raw_messages(settings, events)))
    # a second process continues the same users from what the first wrote (slot-grouped reads)
    more = _events(600, 2, start=3)
    proc2, _ = _processor(settings, trained_model)
    asyncio.run(_apply(proc2, raw_messages(settings, more, start=len(events))))
    report = verify_events(events + more, session, settings, cluster_client)
    assert report.ok and report.users == 600 and report.events == 3000, report.summary()
    # the users are spread over every master, each on the one its slot says
    per_node = {n.name: n.redis_connection.dbsize() for n in cluster_client.get_primaries()}
    assert len(per_node) == 3 and all(v > 0 for v in per_node.values()), per_node
    cluster_client.set(promoted_key(settings.redis_prefix), session.meta.version)  # what a worker does at start
    got = get_interests("u5", settings)
    assert got is not None and got.events == 5


def _same_slot_users(prefix: str, tag: str, n: int) -> list[str]:
    """``n`` user ids whose keys share one hash slot (found by search: the key layout is the state module's)."""
    by_slot: dict[int, list[str]] = {}
    for i in range(200_000):
        u = f"s{i}"
        same = by_slot.setdefault(key_slot(user_key(prefix, tag, u).encode()), [])
        same.append(u)
        if len(same) == n:
            return same
    raise AssertionError("no slot found")


def test_store_follows_a_slot_migration_tryagain_ask_then_moved(settings_for, redis_cluster, trained_model):
    """One slot with two of our users moved by hand, key by key, as ``redis-cli --cluster reshard`` does: while only
    one key has moved the script call gets TRYAGAIN (and waits), once both have moved ASK (and is re-sent with ASKING
    to the importing node), and after the slot is handed over MOVED (and the slot map is updated)."""
    if redis_cluster is None:
        pytest.skip("needs the local cluster (moves a slot by hand)")
    settings = settings_for(redis_url=redis_cluster.url, redis_cluster=True)
    proc, session = _processor(settings, trained_model)
    tag = version_tag(session.meta.version)
    u1, u2 = _same_slot_users(settings.redis_prefix, tag, 2)
    k1, k2 = user_key(settings.redis_prefix, tag, u1), user_key(settings.redis_prefix, tag, u2)
    slot = key_slot(k1.encode())
    ev = lambda u, k: {"user_id": u, "category": "Drama", "ts": 100 + k, "event_id": f"{u}{k}"}  # noqa: E731
    first = [ev(u1, 0), ev(u2, 0)]
    asyncio.run(_apply(proc, raw_messages(settings, first)))

    admin = redis.RedisCluster.from_url(redis_cluster.url)
    try:
        src = admin.get_node_from_key(k1)
        dst = next(n for n in admin.get_primaries() if n.name != src.name)
        s, d = src.redis_connection, dst.redis_connection
        src_id, dst_id = s.execute_command("CLUSTER MYID").decode(), d.execute_command("CLUSTER MYID").decode()
        d.execute_command("CLUSTER SETSLOT", slot, "IMPORTING", src_id)
        s.execute_command("CLUSTER SETSLOT", slot, "MIGRATING", dst_id)
        # the session's cluster is shared: other tests' keys may lie in this slot too, and move first with k1
        held = [os.fsdecode(k) for k in s.execute_command("CLUSTER GETKEYSINSLOT", slot, 100_000)]  # str or bytes
        assert {k1, k2} <= set(held), held
        s.execute_command("MIGRATE", dst.host, dst.port, "", 0, 5000, "KEYS", *[k for k in held if k != k2])

        second = [ev(u1, 1), ev(u2, 1)]
        proc2, _ = _processor(settings, trained_model)

        async def during() -> None:
            await proc2.store.start()
            try:
                task = asyncio.ensure_future(proc2.prepare(raw_messages(settings, second, start=2)))
                await asyncio.sleep(1.0)  # half moved: TRYAGAIN, re-sent after a pause, never answered wrong
                assert not task.done()
                s.execute_command("MIGRATE", dst.host, dst.port, "", 0, 5000, "KEYS", k2)
                plan = await asyncio.wait_for(task, 30)  # both moved: ASK -> ASKING on the importing node
                await proc2.write(plan)
            finally:
                await proc2.store.close()

        asyncio.run(during())
        third = [ev(u1, 2), ev(u2, 2)]
        proc3, _ = _processor(settings, trained_model)

        async def after() -> None:
            await proc3.store.start()  # its slot map still has the old owner
            try:
                assert proc3.store.client.nodes_manager.get_node_from_slot(slot).name == src.name
                for node in (d, s):
                    node.execute_command("CLUSTER SETSLOT", slot, "NODE", dst_id)
                await proc3.write(await proc3.prepare(raw_messages(settings, third, start=4)))  # MOVED, followed
                assert proc3.store.client.nodes_manager.get_node_from_slot(slot).name == dst.name
            finally:
                await proc3.store.close()

        asyncio.run(after())
        wait_until(redis_cluster.healthy, 30, what="the cluster to agree on the slot")
        report = verify_events(first + second + third, session, settings, admin)
        assert report.ok and report.events == 6, report.summary()
        assert d.hmget(k1, "events") == [b"3"] and s.execute_command("CLUSTER COUNTKEYSINSLOT", slot) == 0
    finally:
        admin.close()


@contextlib.contextmanager
def stopped(pid: int):
    """The process stopped (SIGSTOP) inside the block: a replica that acknowledges nothing."""
    os.kill(pid, signal.SIGSTOP)
    try:
        yield
    finally:
        os.kill(pid, signal.SIGCONT)


def _write_while_replica_stopped(settings, trained_model, replica_pid: int, users: int) -> tuple[bool, int]:
    """Step a batch while the replica is stopped: (whether its write finished within 2.5 s, users in Redis after the
    replica is back and the write is done)."""
    proc, _ = _processor(settings, trained_model)
    events = [{"user_id": f"w{u}", "category": "Comedy", "ts": 10, "event_id": f"w{u}"} for u in range(users)]

    async def go() -> bool:
        await proc.store.start()
        try:
            plan = await proc.prepare(raw_messages(settings, events))
            with stopped(replica_pid):
                task = asyncio.ensure_future(proc.write(plan))
                done, _ = await asyncio.wait([task], timeout=2.5)
            await asyncio.wait_for(task, 30)  # the replica is back: the WAIT is met, the write returns
            return bool(done)
        finally:
            await proc.store.close()

    return asyncio.run(go()), users


def test_wait_replicas_on_one_redis_blocks_the_ack_until_the_replica_has_the_writes(
    settings_for, trained_model, tmp_path
):
    master = start_redis(port=free_port(), run_dir=tmp_path)
    replica = start_redis(port=free_port(), run_dir=tmp_path, extra=["--replicaof", "127.0.0.1", str(master.port)])
    try:
        url = f"redis://{master.address}/0"
        mc, rc = redis.Redis.from_url(url), redis.Redis(port=replica.port)
        wait_until(lambda: rc.info("replication")["master_link_status"] == "up", 30, what="the replica in sync")
        waited = settings_for(redis_url=url, redis_wait_replicas=1, redis_wait_timeout_ms=200)
        finished, _ = _write_while_replica_stopped(waited, trained_model, replica.pid, 300)
        assert not finished  # WAIT 1 timed out (again and again) while the replica was stopped: not acked
        prefix = waited.redis_prefix
        assert len(list(rc.scan_iter(match=prefix + "*"))) == 300  # and once acked, the replica has every user
        plain = settings_for(redis_url=url, redis_prefix=prefix + "0:")
        finished, _ = _write_while_replica_stopped(plain, trained_model, replica.pid, 300)
        assert finished  # WAIT 0: acked as soon as the master has it
        assert len(list(mc.scan_iter(match=prefix + "0:*"))) == 300
        mc.close()
        rc.close()
    finally:
        replica.stop()
        master.stop()


def test_wait_replicas_on_the_cluster_waits_on_every_master_written(settings_for, redis_cluster, trained_model):
    if redis_cluster is None:
        pytest.skip("needs the local cluster (stops a replica)")
    settings = settings_for(
        redis_url=redis_cluster.url, redis_cluster=True, redis_wait_replicas=1, redis_wait_timeout_ms=200
    )
    replica = next(n for n in redis_cluster.live() if redis_cluster.roles()[n.port][1] == "slave")
    finished, _ = _write_while_replica_stopped(settings, trained_model, replica.pid, 300)
    assert not finished  # one master's replica stopped: that master's WAIT is not met, so the batch is not acked
    with contextlib.closing(redis_cluster.node_client(replica.port)) as rc:
        wait_until(lambda: rc.info("replication")["master_link_status"] == "up", 30, what="the replica back")
        assert rc.dbsize() > 0
    redis_cluster.wait_healthy()
