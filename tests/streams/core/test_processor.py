"""The batch processor and the Redis state store, against a real Redis (and the real broker for its records)."""

from __future__ import annotations

import asyncio
import random
from itertools import pairwise

import numpy as np
import orjson
import pytest
from aiokafka.partitioner import murmur2

from export.runtime import StepSession
from streams.core.processor import DLQ_MAX_VALUE, InterestProcessor, RawMessage, default_partition, murmur2_many
from streams.core.state import StateStore, user_key, version_tag
from streams.core.versions import model_version, promote_if_none, set_promoted
from streams.kafka import ensure_topics, output_producer
from streams.lookup import bar_chart, get_interests
from streams.tools.verify import verify_events
from tests.harness import consume_all, raw_messages

pytestmark = pytest.mark.integration


def ukey(settings, user: str) -> str:
    """The user's hash under the session model's version (the layout's one key builder)."""
    return user_key(settings.redis_prefix, version_tag(model_version(settings.model_path)), user)


@pytest.fixture
def setup(settings_for, trained_model):
    settings = settings_for()
    session = StepSession(trained_model, device="cpu")
    catalog = session.load_catalog()

    def make() -> InterestProcessor:
        store = StateStore(settings, session.meta.version, session.meta.hidden_size)
        return InterestProcessor(session, store, settings, catalog, {settings.input_topic: 4})

    return settings, session, make


async def _run(proc: InterestProcessor, msgs):
    plan = await proc.prepare(msgs)
    await proc.write(plan)
    return plan


def _random_events(rng: random.Random, prefix: str, users: int, n: int, ts0: float, gap: float) -> list[dict]:
    """``n`` events of ``users`` users (ids and event ids starting with ``prefix``), random items, ``gap`` s apart."""
    return [
        {"user_id": f"{prefix}{rng.randrange(users)}", "item_id": str(1 + rng.randrange(1600)), "ts": ts0 + gap * i,
         "event_id": f"{prefix}{i}"}
        for i in range(n)
    ]  # fmt: skip


def test_cold_start_then_duplicates_skipped(setup, rclient) -> None:
    settings, session, make = setup
    proc = make()
    events = [
        {"user_id": "a", "item_id": "1", "ts": 100, "action": "4", "event_id": "e1"},
        {"user_id": "b", "item_id": "2", "ts": 101, "event_id": "e2"},
        {"user_id": "a", "item_id": "3", "ts": 160, "action": "5", "event_id": "e3"},
    ]
    msgs = raw_messages(settings, events)
    plan = asyncio.run(_run(proc, msgs))
    assert plan.applied == 3 and plan.duplicates == 0
    # user b's first event was stepped from the learned initial state
    h, c = session.initial_state(1)
    cats = proc.router.decoder.decode(msgs[1].value).categories
    feats = session.encoder.encode([cats], np.array([session.encoder.action_index(None)]), np.array([np.nan]))
    p, _, _ = session.step(feats, h, c)
    got = orjson.loads(rclient.hget(ukey(settings, "b"), "probs"))
    assert np.max(np.abs(np.asarray(got) - p[0])) <= 1e-6
    assert int(rclient.hget(ukey(settings, "a"), "events")) == 2

    # redelivery (same offsets) and a re-send (new offsets, same ids) are both skipped, by a fresh process too
    again = asyncio.run(_run(make(), msgs))
    assert again.applied == 0 and again.duplicates == 3
    resent = asyncio.run(_run(make(), raw_messages(settings, events, start=10)))
    assert resent.applied == 0 and resent.duplicates == 3
    assert int(rclient.hget(ukey(settings, "a"), "events")) == 2


@pytest.mark.parametrize("compression", ["none", "zstd", "lz4"])
def test_records_go_out_at_prepare_and_redis_waits_for_finish(settings_for, rclient, compression) -> None:
    """prepare(..., producer) hands a batch's records over at once, so their delivery overlaps the previous batch's
    Redis write; Redis is written only by finish, after delivery; two batches' records arrive in order (in batches
    compressed as INTEREST_OUTPUT_COMPRESSION says, which a consumer reads)."""
    settings = settings_for(device="cpu", output_compression=compression)
    proc = InterestProcessor.from_settings(settings, ensure_topics(settings))
    events = [{"user_id": "p", "item_id": str(i), "ts": 100 + i, "event_id": f"p{i}"} for i in range(1, 7)]
    msgs = raw_messages(settings, events)
    key = ukey(settings, "p")

    async def run() -> None:
        producer = output_producer(settings)
        await producer.start()
        try:
            first = await proc.prepare(msgs[:3], producer)
            second = await proc.prepare(msgs[3:], producer)  # stepped on the first batch's states, not yet in Redis
            assert first.delivery and second.delivery
            handed = await asyncio.wait_for(asyncio.gather(first.delivery, second.delivery), 30)
            await asyncio.wait_for(asyncio.gather(*handed[0], *handed[1]), 30)
            assert not rclient.exists(key)  # delivered, not written
            await proc.finish(first, producer)
            assert int(rclient.hget(key, "events")) == 3
            await proc.finish(second, producer)
        finally:
            await producer.stop()

    asyncio.run(run())
    assert int(rclient.hget(key, "events")) == 6
    out = consume_all(settings.kafka_bootstrap, settings.output_topic, len(events))
    assert [orjson.loads(r.value)["event_id"] for r in out] == [e["event_id"] for e in events]


def test_a_huge_event_is_dead_lettered_cut_to_256_kib(settings_for) -> None:
    """An event near the broker's size limit would not fit the dead-letter topic again with the added headers (the
    worker would abandon its batch and meet it again, for ever): its dead letter is cut, and says so."""
    settings = settings_for(device="cpu")
    partitions = ensure_topics(settings)
    proc = InterestProcessor.from_settings(settings, partitions)
    huge = b'{"user_id": "h", "item_id": "' + b"x" * 1_000_000 + b'", "ts": 1}'
    home = default_partition(b"h", partitions[settings.input_topic])  # else the good event is re-keyed
    good = raw_messages(settings, [{"user_id": "h", "item_id": "1", "ts": 2}], start=1, partition=home)
    msgs = [RawMessage(settings.input_topic, 0, 0, b"h", huge), *good]

    async def run() -> None:
        producer = output_producer(settings)
        await producer.start()
        try:
            await proc.finish(await proc.prepare(msgs, producer), producer)
        finally:
            await producer.stop()

    asyncio.run(run())
    (dead,) = consume_all(settings.kafka_bootstrap, settings.dlq_topic, 1)
    headers = dict(dead.headers)
    assert headers["dlq.reason"] == b"oversized" and headers["dlq.truncated"] == str(len(huge)).encode()
    assert dead.value == huge[:DLQ_MAX_VALUE]
    assert len(consume_all(settings.kafka_bootstrap, settings.output_topic, 1)) == 1  # the good event went on


def test_never_older_over_newer_and_version_reset(setup, rclient) -> None:
    settings, _session, make = setup
    first, second = make(), make()
    e1 = {"user_id": "z", "item_id": "1", "ts": 1, "event_id": "1"}
    e2 = {"user_id": "z", "item_id": "2", "ts": 2, "event_id": "2"}
    asyncio.run(_run(first, raw_messages(settings, [e1, e2])))
    # a zombie that saw only e1 (from an empty state) must not overwrite the 2-event state
    zombie = make()
    key = ukey(settings, "z")

    async def zombie_write() -> int:
        rclient.hset(key, "model_version", "x")  # the zombie reads "no state"
        plan = await zombie.prepare(raw_messages(settings, [e1]))
        rclient.hset(key, "model_version", second.version)
        return await zombie.write(plan)

    assert asyncio.run(zombie_write()) == 1
    assert int(rclient.hget(key, "events")) == 2
    # a state of another model version is reset: the user starts again from the cold-start state
    rclient.hset(ukey(settings, "z"), "model_version", "old-model")
    plan = asyncio.run(_run(make(), raw_messages(settings, [e2], start=50)))
    assert plan.applied == 1
    assert int(rclient.hget(ukey(settings, "z"), "events")) == 1


def test_damaged_states_in_redis_are_logged_and_overwritten(setup, rclient, caplog) -> None:
    """A damaged hash (or a key that is no hash) under the prefix must not stop the worker: the user restarts from
    the cold-start state and the next write replaces it; damaged bookkeeping alone keeps the recurrent state."""
    settings, _session, make = setup
    key = lambda u: ukey(settings, u)  # noqa: E731
    users = ["list", "count", "short", "pos"]
    asyncio.run(_run(make(), raw_messages(settings, [{"user_id": u, "item_id": "1", "ts": 1} for u in users])))
    good = rclient.hget(key("pos"), "state")
    rclient.delete(key("list"))
    rclient.rpush(key("list"), "x")  # WRONGTYPE for HMGET
    rclient.hset(key("count"), "events", "lots")
    rclient.hset(key("short"), mapping={"events": "99", "state": b"\x00" * 12})
    rclient.hset(key("pos"), "pos", "{not json")
    proc = make()
    plan = asyncio.run(_run(proc, raw_messages(settings, [{"user_id": u, "item_id": "2", "ts": 2} for u in users], 9)))
    assert plan.applied == 4 and proc.store.corrupt_states == 4
    assert "damaged state in Redis" in caplog.text
    for u in ("list", "count", "short"):  # restarted cold: one event applied, the hash replaced
        assert int(rclient.hget(key(u), "events")) == 1, u
    assert int(rclient.hget(key("pos"), "events")) == 2  # the state itself was kept
    assert rclient.hget(key("pos"), "state") != good
    again = make()  # and what was written reads back clean
    asyncio.run(again.store.load(users))
    assert again.store.corrupt_states == 0


def test_the_oracle_skips_exactly_what_the_worker_skips(settings_for, trained_model, rclient) -> None:
    """Re-sends: the same event_id for one user is skipped, for another user it is not; identical bytes without an id
    are skipped too; and only within the user's last dedup_window events (2 here)."""
    settings = settings_for(dedup_window=2)
    session = StepSession(trained_model, device="cpu")
    store = StateStore(settings, session.meta.version, session.meta.hidden_size)
    proc = InterestProcessor(session, store, settings, session.load_catalog(), {settings.input_topic: 4})
    ev = lambda u, i, ts, eid=None: {"user_id": u, "item_id": i, "ts": ts, **({"event_id": eid} if eid else {})}  # noqa: E731
    events = [
        ev("a", "1", 10, "x"),
        ev("b", "1", 10, "x"),  # another user's event with the same id: applied
        ev("a", "1", 10, "x"),  # a re-send: skipped
        ev("a", "2", 20),
        ev("a", "2", 20),  # the same bytes, no id: skipped
        ev("a", "3", 30, "y"),
        ev("a", "1", 10, "x"),  # out of the window of 2 by now: applied again
    ]
    plan = asyncio.run(_run(proc, raw_messages(settings, events)))
    assert (plan.applied, plan.duplicates) == (5, 2)
    report = verify_events(events, session, settings, rclient)
    assert report.ok, report.summary()
    assert report.events == 5


def test_one_users_events_in_one_batch_are_applied_in_order(setup, rclient) -> None:
    settings, session, make = setup
    events = [{"user_id": "o", "item_id": str(i), "ts": 1000 + 60 * i, "event_id": f"o{i}"} for i in range(1, 40)]
    others = [{"user_id": f"x{i}", "item_id": str(i), "ts": 1000 + i, "event_id": f"x{i}"} for i in range(1, 40)]
    mixed = [e for pair in zip(events, others, strict=True) for e in pair]
    plan = asyncio.run(_run(make(), raw_messages(settings, mixed)))
    assert plan.applied == len(mixed)
    # sequential replay of user o alone
    proc = make()
    h, c = session.initial_state(1)
    prev = np.nan
    for e in events:
        click = proc.router.decoder.decode(orjson.dumps(e))
        f = session.encoder.encode([click.categories], np.array([click.action]), np.array([click.ts - prev]))
        p, h, c = session.step(f, h, c)
        prev = click.ts
    got = np.asarray(orjson.loads(rclient.hget(ukey(settings, "o"), "probs")))
    assert np.max(np.abs(got - p[0])) <= 1e-5
    outs = [orjson.loads(v) for k, v in plan.outputs if k == b"o"]
    assert [o["events"] for o in outs] == list(range(1, len(events) + 1))


def test_lookup_reads_what_the_worker_wrote(setup, rclient) -> None:
    settings, _session, make = setup
    asyncio.run(_run(make(), raw_messages(settings, [{"user_id": "look", "category": "Comedy", "ts": 5}])))
    assert get_interests("look", settings) is None  # no version promoted: readers see nothing yet
    assert promote_if_none(rclient, settings, _session.meta.version)
    assert not promote_if_none(rclient, settings, "another")  # SET NX: the first worker's version stays
    interests = get_interests("look", settings)
    assert interests is not None and interests.events == 1
    assert abs(sum(interests.probs) - 1) < 1e-4
    assert interests.top[0][1] >= interests.top[-1][1]
    chart = bar_chart(interests)
    assert interests.top[0][0] in chart and "%" in chart
    assert get_interests("nobody", settings) is None
    assert get_interests("bad id*", settings) is None
    # readers follow the pointer: another version promoted, this version's hash is no longer what they see
    set_promoted(rclient, settings, "another")
    assert get_interests("look", settings) is None


def test_optional_ttl(settings_for, trained_model, rclient) -> None:
    settings = settings_for(redis_ttl_s=600)
    session = StepSession(trained_model, device="cpu")
    store = StateStore(settings, session.meta.version, session.meta.hidden_size)
    proc = InterestProcessor(session, store, settings, session.load_catalog(), {settings.input_topic: 4})
    asyncio.run(_run(proc, raw_messages(settings, [{"user_id": "ttl", "category": "Drama", "ts": 5}])))
    assert 0 < rclient.ttl(ukey(settings, "ttl")) <= 600


def test_step_groups_cover_every_user_once_and_merge_cheap_padding() -> None:
    from streams.core.stepping import step_groups

    rng = np.random.default_rng(0)
    for counts in ([1, 1, 1], [250, 3, 60, 1, 1, 2, 5, 0], [0, 0, 4], list(rng.integers(0, 300, 500))):
        counts = np.asarray(counts)
        groups = step_groups(counts)
        got = np.sort(np.concatenate(groups)) if groups else np.array([], dtype=np.int64)
        assert got.tolist() == np.flatnonzero(counts > 0).tolist()  # every present user exactly once
    assert step_groups(np.zeros(3, dtype=np.int64)) == []
    # a burst and a few short users: one padded call is cheaper than several
    assert len(step_groups(np.array([120, 2, 3, 1]))) == 1
    # one long user and many one-event users: padding all of them to 250 steps would cost far more than a second call
    groups = step_groups(np.array([250] + [1] * 400))
    assert len(groups) == 2 and groups[0].tolist() == [0]


def test_murmur2_many_is_kafkas_murmur2_for_every_length() -> None:
    rng = random.Random(7)
    keys = [bytes(rng.randrange(256) for _ in range(rng.randrange(41))) for _ in range(3000)]
    keys += [b"", b"a", b"ab", b"abc", b"123456789", b"\x00 ", "ünï".encode()]
    assert murmur2_many(keys) == [murmur2(k) & 0x7FFFFFFF for k in keys]
    # partitions of 1000 that Java's client gives (the values kafka-python checks its murmur2 against)
    assert [h % 1000 for h in murmur2_many(keys[-7:-1])] == [681, 524, 434, 107, 566, 742]


def test_output_records_are_the_documented_json_byte_for_byte(setup, rclient) -> None:
    """The worker joins each output record from parts; they are exactly what orjson writes for the record's dict
    (its fields in the documented order), for ids that need escaping too, and `top` is the top_n of `probs`."""
    settings, session, make = setup
    proc = make()
    ids = ['q"uote', "new\nline", "uni\u00e9\u4e2d", "back\\slash", "tab\t", "e" * 200]
    events = [
        {"user_id": f"u{i % 3}", "item_id": str(1 + i), "ts": 1_000.25 + i, "event_id": eid}
        for i, eid in enumerate(ids)
    ]
    plan = asyncio.run(_run(proc, raw_messages(settings, events)))
    assert plan.applied == len(events) and len(plan.outputs) == len(events)
    fields = ["user_id", "probs", "top", "model_version", "event_time", "processed_at", "events", "event_id"]
    categories = list(session.meta.categories)
    for (key, value), event in zip(plan.outputs, events, strict=True):
        record = orjson.loads(value)
        assert list(record) == fields and orjson.dumps(record) == value
        assert key == event["user_id"].encode() and record["event_id"] == event["event_id"]
        assert record["event_time"] == event["ts"] and record["model_version"] == proc.version
        probs = np.asarray(record["probs"], dtype=np.float32)
        order = np.argsort(-probs, kind="stable")[: settings.top_n]
        assert [t["category"] for t in record["top"]] == [categories[k] for k in order]
        assert [t["p"] for t in record["top"]] == [float(np.round(np.float64(probs[k]), 6)) for k in order]
    assert [orjson.loads(v)["events"] for _, v in plan.outputs] == [1, 1, 1, 2, 2, 2]


def test_batches_stepped_while_the_one_before_is_published_give_the_sequential_result(setup, rclient) -> None:
    """The step process runs ORT for batch n+1 before batch n's records are built, and stages n+2 before that: the
    records and the Redis states are those of the three batches applied one after another."""
    settings, _session, make = setup
    events = _random_events(random.Random(7), "u", users=12, n=300, ts0=5_000, gap=30)
    msgs = raw_messages(settings, events)
    batches = [msgs[:80], msgs[80:210], msgs[210:]]

    async def sequential() -> list[bytes]:
        proc, out = make(), []
        for b in batches:
            out += [v for _, v in (await _run(proc, b)).outputs]
        return out

    async def overlapped() -> list[bytes]:
        proc = make()
        s1 = await proc.stage(*proc.router.route(batches[0]))
        s2 = await proc.stage(*proc.router.route(batches[1]))
        await proc.step_ort(s1)
        s3 = await proc.stage(*proc.router.route(batches[2]))
        await proc.step_ort(s2)
        p1 = await proc.publish_stepped(s1)
        await proc.step_ort(s3)
        p2 = await proc.publish_stepped(s2)
        await proc.write(p1)
        p3 = await proc.publish_stepped(s3)
        await proc.write(p2)
        await proc.write(p3)
        return [v for p in (p1, p2, p3) for _, v in p.outputs]

    def comparable(records: list[bytes]) -> list[dict]:
        return [{k: v for k, v in orjson.loads(r).items() if k != "processed_at"} for r in records]

    def stored() -> dict[str, dict]:
        users = sorted({e["user_id"] for e in events})
        fields = ("probs", "events", "state", "pos", "recent")
        return {u: dict(zip(fields, rclient.hmget(ukey(settings, u), fields), strict=True)) for u in users}

    expected = comparable(asyncio.run(sequential()))
    expected_state = stored()
    rclient.flushdb()
    got = comparable(asyncio.run(overlapped()))
    assert len(got) == len(events) == len(expected)
    for g, e in zip(got, expected, strict=True):
        assert {k: v for k, v in g.items() if k not in ("probs", "top")} == {
            k: v for k, v in e.items() if k not in ("probs", "top")
        }
        assert np.max(np.abs(np.asarray(g["probs"]) - np.asarray(e["probs"]))) <= 1e-6
    got_state = stored()
    assert got_state.keys() == expected_state.keys()
    for u, e in expected_state.items():
        g = got_state[u]
        assert (g["events"], g["pos"], g["recent"]) == (e["events"], e["pos"], e["recent"]) and g["events"]
        diff = np.abs(np.frombuffer(g["state"], "<f4") - np.frombuffer(e["state"], "<f4"))
        assert diff.max() <= 1e-6


def test_output_mode_user_publishes_each_users_last_record_of_a_batch(settings_for, rclient) -> None:
    """INTEREST_OUTPUT_MODE=user: per batch, one record per user, the one the per-event mode gives for the user's last
    event of the batch, and after the batch before it on the topic; the same applied counts, the same Redis."""
    events = _random_events(random.Random(11), "m", users=9, n=120, ts0=9_000, gap=20)
    cuts = [0, 50, 51, 120]  # the middle batch holds one event

    def run(mode: str) -> tuple[list[list[dict]], dict, list]:
        settings = settings_for(device="cpu", output_mode=mode, partitions=4)  # as raw_messages places them
        settings = settings.model_copy(update={"output_topic": f"{settings.output_topic}-{mode}"})
        proc = InterestProcessor.from_settings(settings, ensure_topics(settings))
        msgs = raw_messages(settings, events)

        async def go() -> list:
            producer = output_producer(settings)
            await producer.start()
            try:
                plans = []
                for a, b in pairwise(cuts):
                    plan = await proc.prepare(msgs[a:b], producer)
                    await proc.finish(plan, producer)
                    plans.append(plan)
                return plans
            finally:
                await producer.stop()

        plans = asyncio.run(go())
        assert [p.applied for p in plans] == [b - a for a, b in pairwise(cuts)]
        records = [[{k: v for k, v in orjson.loads(r).items() if k != "processed_at"} for _, r in p.outputs]
                   for p in plans]  # fmt: skip
        fields = ("probs", "top", "events", "event_ts", "state", "pos", "recent")
        users = sorted({e["user_id"] for e in events})
        stored = {u: rclient.hmget(ukey(settings, u), fields) for u in users}
        out = consume_all(settings.kafka_bootstrap, settings.output_topic, sum(len(r) for r in records))
        rclient.flushdb()
        return records, stored, out

    per_event, stored_event, _ = run("event")
    per_user, stored_user, topic = run("user")
    for batch_events, batch_users in zip(per_event, per_user, strict=True):
        last = {r["user_id"]: r for r in batch_events}  # each user's last record of the batch
        assert batch_users == sorted(last.values(), key=lambda r: int(r["event_id"][1:]))
    assert sum(len(b) for b in per_user) < len(events) // 3  # 9 users: most records were skipped
    assert stored_user == stored_event
    # on the topic: every user's records in order, its last one its newest state (as in Redis)
    newest: dict[str, dict] = {}
    for r in topic:
        rec = orjson.loads(r.value)
        assert rec["events"] > newest.get(rec["user_id"], {"events": 0})["events"]
        newest[rec["user_id"]] = rec
    assert {u: int(stored_user[u][2]) for u in newest} == {u: r["events"] for u, r in newest.items()}
    assert len(topic) == sum(len(b) for b in per_user)
