"""Build a model version's user states from what the input topics retain, beside the running version, and hand the
stream over to that version's workers exactly where the backfill stopped.

    interest-stream backfill --model artifacts/models/new/model.onnx
    interest-stream backfill --model NEW/model.onnx --partitions 0-3     # and 4-7 in another process

1. Names: the version's tag, consumer group and re-key topic (:mod:`streams.core.versions`). Refuses when a worker of
   the version is running, or when its group has committed offsets on these partitions already (its workers go on
   from there; retire the version to build it again).
2. Reads each input partition from its start to its end offset as of the start of the backfill (events produced
   meanwhile are the worker's), with a raw batch consumer, and applies the worker's rules: validation (an event this
   model would dead-letter is counted and reported, not dead-lettered: the log keeps it), re-keying (a misrouted
   event is forwarded to the version's re-key topic, as the worker would, marked with its source so that a restarted
   backfill forwards it once), dedup by position and by the fingerprints of the user's recent events.
3. Then reads the version's re-key topic partitions of the same numbers to their end, the same way.
4. Steps the users through the sequence graph in large blocks (:class:`streams.core.stepping.BatchStepper`, CUDA
   when usable), keeping every state in memory, and writes each user once at the end (the worker's CAS script, so
   a state already there with as many events stays).
5. Commits, for the version's group, the offsets where it stopped: a worker of the version continues exactly there.

Killed before step 5, it is simply run again: it starts over from the start of the log (states written by the killed
run are equal or older, so the CAS write keeps or replaces them) and forwards no misrouted event twice.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import orjson

from models.errors import ConfigError, ServiceError
from streams.core.events import Rejected
from streams.core.processor import decoder_for, default_partition, original_headers
from streams.core.state import StateStore
from streams.core.versions import Version, register
from streams.settings import Settings
from streams.tools.blocks import Builder

log = logging.getLogger("streams.tools.backfill")

SOURCE_HEADER = "interest.backfill.source"  # on a re-key the backfill forwarded: "topic:partition:offset"
WRITE_USERS = 20_000  # users per Redis pipeline at the end


@dataclass
class Report:
    version: str = ""
    group: str = ""
    read: int = 0  # messages read
    applied: int = 0
    duplicates: int = 0
    rekeyed: int = 0  # misrouted events forwarded to the re-key topic (now)
    rekeyed_before: int = 0  # forwarded by an earlier, killed run (not again)
    dead: Counter = field(default_factory=Counter)  # reason -> events this model would dead-letter
    users: int = 0
    written: int = 0
    stale: int = 0  # states Redis already had, as new (a restarted backfill)
    seconds: float = 0.0
    read_seconds: float = 0.0
    step_seconds: float = 0.0
    write_seconds: float = 0.0
    offsets: dict[str, int] = field(default_factory=dict)  # "topic:partition" -> committed (next offset to read)

    @property
    def eps(self) -> float:
        return self.applied / self.seconds if self.seconds else 0.0

    def summary(self) -> str:
        dead = ", ".join(f"{r} {n}" for r, n in self.dead.most_common()) or "none"
        return (
            f"backfilled {self.version}: {self.applied} events applied to {self.users} users in {self.seconds:.1f}s "
            f"({self.eps:,.0f} events/s; read {self.read_seconds:.1f}s with {self.step_seconds:.1f}s of stepping "
            f"overlapped, write {self.write_seconds:.1f}s); {self.duplicates} duplicates skipped; "
            f"{self.rekeyed} re-keyed (+{self.rekeyed_before} by an earlier run); dead-lettered by this model's "
            f"rules: {dead}; offsets committed for group {self.group}"
        )


def parse_partitions(text: str | None, count: int) -> list[int]:
    """``0,2,5-7`` -> [0, 2, 5, 6, 7] (None: every partition); ConfigError for a number the topic lacks."""
    if not text:
        return list(range(count))
    out: set[int] = set()
    try:
        for part in text.split(","):
            lo, _, hi = part.strip().partition("-")
            out.update(range(int(lo), int(hi or lo) + 1))
    except ValueError:
        raise ConfigError(f"--partitions {text!r}: expected numbers and ranges like 0,2,5-7") from None
    bad = sorted(p for p in out if not 0 <= p < count)
    if bad or not out:
        raise ConfigError(f"--partitions {text!r}: the input topic has partitions 0-{count - 1}")
    return sorted(out)


async def _read(consumer, ends: dict, on_batch) -> int:
    """Read every assigned partition up to its end offset in ``ends`` ((topic, partition) -> offset), calling
    ``on_batch(msgs)`` with each fetched run of one partition's messages, in partition order; returns the count.
    What was produced after ``ends`` is left unread."""
    from aiokafka import TopicPartition

    todo = {TopicPartition(t, p): end for (t, p), end in ends.items()}
    for tp in list(todo):
        if await consumer.position(tp) >= todo[tp]:
            del todo[tp]
    n = 0
    while todo:
        batches = await consumer.getmany(*todo, timeout_ms=500, max_records=20_000)
        for tp, msgs in batches.items():
            end = todo.get(tp)
            if end is None or not msgs:
                continue
            if msgs[-1].offset >= end:
                msgs = [m for m in msgs if m.offset < end]
            on_batch(msgs)
            n += len(msgs)
        for tp in list(todo):
            if await consumer.position(tp) >= todo[tp]:
                del todo[tp]
    return n


async def backfill(settings: Settings, session, partitions: str | None, progress: bool, max_dead: float) -> Report:
    """See the module docstring; returns what it did (ServiceError/ConfigError for bad use, nothing written)."""
    from aiokafka import AIOKafkaConsumer, TopicPartition
    from tqdm import tqdm

    from streams.kafka import KafkaConnection, ensure_topics, output_producer
    from streams.tools import groups

    version = Version.of(settings, session.meta.version)
    vs = version.settings(settings)
    report = Report(version=version.version, group=version.group)
    catalog = session.load_catalog(settings.catalog_path)
    decoder = decoder_for(session, settings, catalog)
    counts = ensure_topics(vs)  # the version's re-key topic too
    n_part = counts[vs.input_topic]
    mine = parse_partitions(partitions, n_part)
    inputs = [(vs.input_topic, p) for p in mine]
    rekeys = [(vs.rekey_topic, p) for p in mine]
    if groups.members(vs, version.group):
        raise ServiceError(f"a worker of {version.version} (group {version.group}) is running: stop it to backfill")
    done = groups.committed(vs, version.group, inputs + rekeys)
    if done:
        raise ServiceError(
            f"group {version.group} of {version.version} has committed offsets already ({len(done)} partitions): its "
            "workers continue from there; retire the version to backfill it again"
        )
    t0 = time.perf_counter()
    conn = KafkaConnection.from_settings(vs).aiokafka()
    consumer = AIOKafkaConsumer(
        **conn, group_id=None, enable_auto_commit=False, fetch_max_bytes=64 << 20, max_partition_fetch_bytes=8 << 20
    )
    producer = output_producer(vs)
    await consumer.start()
    await producer.start()
    builder = Builder(session, vs)
    forwarded: set[tuple[int, int]] = set()  # (input partition, offset) a killed earlier run re-keyed already
    try:
        # a restarted backfill: which misrouted events of these partitions are in the re-key topic already
        all_rekeys = [TopicPartition(vs.rekey_topic, p) for p in range(n_part)]
        consumer.assign(all_rekeys)
        await consumer.seek_to_beginning(*all_rekeys)
        rekey_ends = await consumer.end_offsets(all_rekeys)
        prefix = f"{vs.input_topic}:".encode()

        def mark(msgs) -> None:
            for msg in msgs:
                for k, v in msg.headers or ():
                    if k == SOURCE_HEADER and v.startswith(prefix):
                        p, off = v[len(prefix) :].split(b":")
                        forwarded.add((int(p), int(off)))

        await _read(consumer, {(tp.topic, tp.partition): e for tp, e in rekey_ends.items()}, mark)
        report.rekeyed_before = sum(1 for p, _ in forwarded if p in mine)

        in_tps = [TopicPartition(t, p) for t, p in inputs]
        consumer.assign(in_tps)
        await consumer.seek_to_beginning(*in_tps)
        in_ends = await consumer.end_offsets(in_tps)
        starts = {tp: await consumer.position(tp) for tp in in_tps}
        bar = tqdm(total=sum(in_ends[tp] - starts[tp] for tp in in_tps), unit="ev", disable=not progress)
        decode, add, dead_by = decoder.decode, builder.add, report.dead
        sends: list = []
        input_topic = vs.input_topic
        homes: dict[bytes, int] = {}  # key -> its murmur2 partition (aiokafka's murmur2 is pure Python: ~5 us)

        def apply(msgs, rekeyed: bool) -> None:
            """One partition's run of messages (the per-event loop, in one frame); ``rekeyed``: from the re-key topic,
            where every event is at home (the worker applies them as they come)."""
            partition = msgs[0].partition
            tp = f"{msgs[0].topic}:{partition}"  # the key of a user's positions
            applied = duplicates = 0
            for msg in msgs:
                try:
                    click = decode(msg.value)
                except Rejected as rej:
                    dead_by[rej.reason] += 1
                    continue
                if not rekeyed:
                    key = click.user_id.encode()
                    home = homes.get(key)
                    if home is None:
                        home = homes[key] = default_partition(key, n_part)
                    if msg.key != key or home != partition:  # the worker would re-key it
                        if (partition, msg.offset) not in forwarded:
                            headers = [
                                *original_headers(msg),
                                (SOURCE_HEADER, f"{input_topic}:{partition}:{msg.offset}".encode()),
                            ]
                            sends.append((key, msg.value, headers))
                        continue
                if add(click, tp, msg.offset):
                    applied += 1
                else:
                    duplicates += 1
            report.applied += applied
            report.duplicates += duplicates

        def counted(msgs) -> None:
            apply(msgs, False)
            report.read += len(msgs)
            bar.update(len(msgs))

        await _read(consumer, {(tp.topic, tp.partition): e for tp, e in in_ends.items()}, counted)
        for key, value, headers in sends:  # idempotent producer: in order, once
            await producer.send(vs.rekey_topic, value, key=key, headers=headers)
        await producer.flush()
        report.rekeyed = len(sends)
        # then the version's re-key partitions of the same numbers, to their end now (co-partitioned: same users)
        rk_tps = [TopicPartition(t, p) for t, p in rekeys]
        consumer.assign(rk_tps)
        await consumer.seek_to_beginning(*rk_tps)
        rk_ends = await consumer.end_offsets(rk_tps)

        ends = {(tp.topic, tp.partition): e for tp, e in rk_ends.items()}
        report.read += await _read(consumer, ends, lambda msgs: apply(msgs, True))
        bar.update(report.read - bar.n)
        bar.close()
        builder.step()
        report.read_seconds = time.perf_counter() - t0  # the stepping thread's time is part of it, overlapped
        report.step_seconds = builder.step_seconds
        dead = sum(report.dead.values())
        if report.read and dead / report.read > max_dead:
            raise ServiceError(
                f"{version.version} would dead-letter {dead} of the {report.read} events read "
                f"({', '.join(f'{r} {n}' for r, n in report.dead.most_common(3))}): its catalog does not match the "
                f"topic's items; nothing written (--max-dead-fraction {max_dead} accepts up to that share)"
            )
        t1 = time.perf_counter()
        store = StateStore(vs, version.version, session.meta.hidden_size)
        await store.start()
        try:
            writes, states = builder.writes(version.version, store.key, vs.top_n, list(session.meta.categories))
            for i in range(0, len(writes), WRITE_USERS):
                report.stale += await store.write(writes[i : i + WRITE_USERS], states)
        finally:
            await store.close()
        report.users, report.written = len(writes), len(writes) - report.stale
        report.write_seconds = time.perf_counter() - t1
        offsets = {(tp.topic, tp.partition): e for tp, e in in_ends.items()}
        offsets |= {(tp.topic, tp.partition): e for tp, e in rk_ends.items()}
    finally:
        await producer.stop()
        await consumer.stop()
    groups.commit(vs, version.group, offsets)  # the hand-off: only after every state is in Redis
    report.offsets = {f"{t}:{p}": off for (t, p), off in sorted(offsets.items())}
    report.seconds = time.perf_counter() - t0
    return report


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", type=Path, required=True, help="the new version's ONNX model")
    parser.add_argument("--partitions", help="only these input partitions (e.g. 0-3), to split across processes")
    parser.add_argument(
        "--max-dead-fraction",
        type=float,
        default=0.01,
        help="refuse (write nothing) when this model would dead-letter more of the log than this (default 0.01)",
    )
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.add_argument("--json", type=Path, help="also write the report as JSON here")


def run(args: argparse.Namespace) -> int:
    import redis

    from export.runtime import StepSession
    from streams.core.state import sync_client
    from streams.settings import load_settings

    settings = load_settings(model_path=args.model)
    session = StepSession(settings.model_path, device=settings.device, intra_op_threads=settings.ort_threads or None)
    report = asyncio.run(backfill(settings, session, args.partitions, not args.no_progress, args.max_dead_fraction))
    version = Version.of(settings, report.version)
    client = sync_client(settings)
    try:
        register(client, settings, version, settings.model_path, backfilled=time.time())
    except redis.RedisError as exc:
        raise ServiceError(f"cannot register {report.version} in Redis: {type(exc).__name__}: {exc}") from None
    finally:
        client.close()
    print(report.summary())
    if args.json:
        args.json.write_text(orjson.dumps(report.__dict__ | {"eps": report.eps}).decode())
    return 0
