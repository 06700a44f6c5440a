"""The batch step at the heart of the worker, free of Faust so that tests, the benchmark and the oracle share it.

One call to :meth:`InterestProcessor.prepare` takes a batch of Kafka messages and

1. decodes and validates each (invalid -> dead letter with a reason; keyed by something other than the user id,
   or on a partition the user's key does not hash to -> re-key);
2. loads the states of the batch's users (those of an earlier batch not yet written, else the in-process cache,
   else one Redis pipeline; none -> cold start from the model's learned initial state);
3. drops duplicates: an input position at or below the user's last applied one (redelivery), or a fingerprint among
   the user's recent events (a producer re-send);
4. steps all users together (:class:`BatchStepper`, in a thread: ORT releases the GIL): each user's events of the
   batch in order, the users split into a few ORT calls of the Scan sequence graph (:mod:`streams.core.stepping`);
5. builds one output record per applied event and one Redis write per user (its newest state only).

Nothing is written by ``prepare``. Given a producer, it hands the batch's records to it at the end (:meth:`send`, in
the background) without waiting for their delivery; :meth:`InterestProcessor.finish` waits for it (or publishes the
plan itself), then writes Redis, and the caller (:mod:`streams.runtime.app`) acks after that. The next batch may be
prepared before that: it builds on the states of the plans not yet written, and its records are delivered after the
earlier plan's (one batch per partition in flight), so a batch's delivery overlaps the previous batch's Redis write.
``prepare`` is :meth:`~InterestProcessor.stage` (steps 2-3), :meth:`~InterestProcessor.step_ort` (4) and
:meth:`~InterestProcessor.publish_stepped` (5); the step process calls them apart, so that ORT steps batch n+1 while
batch n+2 is staged and batch n's records are built.

One module (~500 lines) because the five phases share one class's bookkeeping (the in-flight states, the caches, the
metrics) and read best top to bottom; the stepping itself is :mod:`streams.core.stepping`.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np
import orjson
from aiokafka.partitioner import murmur2

from export.runtime import StepSession
from streams.core.events import Click, EventDecoder, Limits, Rejected
from streams.core.metrics import Metrics
from streams.core.state import StateStore, UserState, UserWrite, encode_state
from streams.core.stepping import BatchStepper
from streams.kafka import RecordBatches
from streams.settings import Settings

log = logging.getLogger("streams.core.processor")


class Message(Protocol):
    """What the processor reads of a Kafka message (faust's ``Message`` has these attributes)."""

    topic: str
    partition: int
    offset: int
    key: bytes | None
    value: bytes | None
    timestamp: float  # produce time, epoch ms (Kafka's; aiokafka's ConsumerRecord), -1 if unknown
    headers: Any  # [(name, value), ...] or None; forwarded with re-keyed events and dead letters


@dataclass(slots=True)
class RawMessage:
    """A plain message, for callers outside Faust (tests, benchmark)."""

    topic: str
    partition: int
    offset: int
    key: bytes | None
    value: bytes | None
    timestamp: float = 0.0
    headers: Any = None


@dataclass
class BatchPlan:
    """Everything one batch leads to; published and written by the caller, in that order."""

    # (user key, InterestUpdate JSON): per applied event, or per user (Settings.output_mode "user")
    outputs: list[tuple[bytes, bytes]] = field(default_factory=list)
    dead: list[tuple[Message, str, str]] = field(default_factory=list)  # (message, reason, detail)
    rekey: list[tuple[bytes, Message]] = field(default_factory=list)  # (user key, message)
    writes: list[UserWrite] = field(default_factory=list)
    states: dict[str, UserState] = field(default_factory=dict)
    produce_ts: list[float] = field(default_factory=list)  # per applied event
    event_ts: list[float] = field(default_factory=list)  # per applied event
    duplicates: int = 0
    ort_seconds: float = 0.0
    # once send() has run: resolves, when every record is in the producer's hands, to their delivery futures
    delivery: asyncio.Future | None = None
    batch_id: int = 0  # the step process's handle on the plan (streams.runtime.stepper); unused in-process

    @property
    def applied(self) -> int:
        return len(self.produce_ts)


def decoder_for(session: StepSession, settings: Settings, catalog: dict[str, tuple[int, ...]]) -> EventDecoder:
    """The worker's event decoder for this model, catalog and settings (the replay oracle validates with it too)."""
    return EventDecoder(
        catalog,
        session.meta.category_index,
        session.encoder.action_index,
        Limits(
            max_event_bytes=settings.max_event_bytes,
            max_user_id_len=settings.max_user_id_len,
            max_categories=settings.max_categories,
            max_future_s=settings.max_future_s,
        ),
    )


# A dead letter keeps the original bytes up to this size. Only an event over INTEREST_MAX_EVENT_BYTES can be larger
# (its size is checked first); near the broker's own limit (1 MiB by default) it would not fit again with the added
# headers, the batch's delivery would fail and the worker would abandon and meet it again, for ever.
DLQ_MAX_VALUE = 256 * 1024


def original_headers(msg: Any) -> list[tuple[str, bytes]]:
    """A consumed message's headers as (name, value) pairs, to forward with it (re-key, dead letter)."""
    h = msg.headers or ()
    return [(k, v or b"") for k, v in (h.items() if isinstance(h, Mapping) else h)]


def default_partition(key: bytes, partitions: int) -> int:
    """The partition Kafka's default partitioner (murmur2, as in Java, kafka-python and aiokafka) picks for key."""
    return (murmur2(key) & 0x7FFFFFFF) % partitions


_M = np.uint32(0x5BD1E995)


def murmur2_many(keys: Sequence[bytes]) -> list[int]:
    """Kafka's murmur2 (``org.apache.kafka.common.utils.Utils.murmur2``) of every key, & 0x7fffffff: the same values
    as aiokafka's pure-Python ``murmur2``, computed with numpy over all keys of one length at a time (~0.3 us a key
    against 2-5 us; it matters when most keys of a batch are new, as with millions of users)."""
    out = [0] * len(keys)
    by_len: dict[int, list[int]] = {}
    for i, k in enumerate(keys):
        by_len.setdefault(len(k), []).append(i)
    for n, idx in by_len.items():
        rows = np.frombuffer(b"".join([keys[i] for i in idx]), dtype=np.uint8).reshape(len(idx), n)
        h = np.full(len(idx), 0x9747B28C ^ n, dtype=np.uint32)
        words = np.ascontiguousarray(rows[:, : n - n % 4]).view("<u4").astype(np.uint32)  # (keys, n // 4)
        for j in range(n // 4):
            w = words[:, j] * _M
            w ^= w >> 24
            w *= _M
            h *= _M
            h ^= w
        tail = n % 4
        if tail:
            base = n - tail
            for t in range(tail - 1, -1, -1):
                h ^= rows[:, base + t].astype(np.uint32) << np.uint32(8 * t)
            h *= _M
        h ^= h >> 13
        h *= _M
        h ^= h >> 15
        h &= np.uint32(0x7FFFFFFF)
        for i, v in zip(idx, h.tolist(), strict=True):
            out[i] = v
    return out


HASH_MEMO = 1_000_000  # keys whose murmur2 the processor keeps (then it starts over)
POINTER_TTL_S = 1.0  # how long the worker trusts its last read of the promoted-version pointer


@dataclass
class StagedBatch:
    """A batch between :meth:`InterestProcessor.stage` and :meth:`InterestProcessor.publish_stepped`: its rows to
    apply (none: nothing to step), with per row its user's slot, round and event count, and the step's input
    features; once stepped (:meth:`InterestProcessor.step_ort`), the probabilities and the users' new state bytes."""

    plan: BatchPlan
    rows: list[tuple[Click, Message]] = field(default_factory=list)
    row_slot: list[int] = field(default_factory=list)
    row_round: list[int] = field(default_factory=list)
    row_events: list[int] = field(default_factory=list)
    feats: Any = None  # (rows, features) float32
    work: dict[str, UserState] = field(default_factory=dict)  # the batch's users' new states (h, c set when stepped)
    users: list[str] = field(default_factory=list)  # the batch's users, in slot order
    sources: dict[str, UserState] = field(default_factory=dict)  # in-flight states whose h, c the users continue
    probs: Any = None  # (rows, categories) float32, once stepped
    state_bytes: dict[str, bytes] = field(default_factory=dict)  # stepped users' h then c, little-endian float32


class BatchStep(Protocol):
    """What the Faust app needs of the batch step: :class:`InterestProcessor` in the worker's process, or
    :class:`streams.runtime.stepper.StepperProcess`, its proxy to the step process."""

    info: dict

    async def start(self) -> None: ...

    async def prepare(self, messages: Sequence[Message], producer: Any = None) -> BatchPlan: ...

    async def finish(self, plan: BatchPlan, producer: Any) -> None: ...

    def drop_cache(self) -> None: ...


class Router:
    """Step 1 of a batch: decode and validate each message, and pick out what goes elsewhere (dead letters, and events
    to re-key). It reads no state, so it runs wherever the batch arrives: :class:`InterestProcessor` has one, and so
    does the step process's proxy in the worker (:mod:`streams.runtime.stepper`), which sends the child only the
    decoded events."""

    def __init__(self, decoder: EventDecoder, partitions: dict[str, int]) -> None:
        self.decoder = decoder
        self.partitions = partitions
        self._hash: dict[bytes, int] = {}

    def key_hash(self, key: bytes) -> int:
        """murmur2(key) & 0x7fffffff, memoised (aiokafka's murmur2 is pure Python: 2-5 us a call)."""
        h = self._hash.get(key)
        if h is None:
            if len(self._hash) > HASH_MEMO:
                self._hash.clear()
            h = self._hash[key] = murmur2(key) & 0x7FFFFFFF
        return h

    def hash_keys(self, keys: Sequence[bytes]) -> None:
        """Memoise the hashes of the keys not seen yet, all in one :func:`murmur2_many` call."""
        memo = self._hash
        new = [k for k in dict.fromkeys(keys) if k not in memo]
        if new:
            if len(memo) + len(new) > HASH_MEMO:
                memo.clear()
            memo.update(zip(new, murmur2_many(new), strict=True))

    def partition_for(self, topic: str, key: bytes) -> int | None:
        """The partition Kafka's default partitioner picks for ``key`` on ``topic`` (None if the count is unknown)."""
        n = self.partitions.get(topic)
        return self.key_hash(key) % n if n else None

    def _misrouted(self, msg: Message, key: bytes) -> bool:
        """True when a correctly keyed message sits on another partition than its key hashes to."""
        home = self.partition_for(msg.topic, key)
        return home is not None and home != msg.partition

    def route(self, messages: Sequence[Message]) -> tuple[BatchPlan, list[tuple[Click, Message]]]:
        """Step 1: decode and validate; the plan gets the dead letters and re-keys, the rest is returned in order.

        It reads no state: the worker routes a batch (in its own process, when the step has one of its own) while the
        previous one is being stepped."""
        plan = BatchPlan()
        self.hash_keys([m.key for m in messages if m.key])  # a correctly keyed message's user key is its key
        decode = self.decoder.decode
        accepted: list[tuple[Click, Message]] = []
        for msg in messages:
            try:
                click = decode(msg.value)
            except Rejected as rej:
                plan.dead.append((msg, rej.reason, rej.detail))
                continue
            key = click.user_id.encode()
            if msg.key != key or self._misrouted(msg, key):
                plan.rekey.append((key, msg))
                continue
            accepted.append((click, msg))
        return plan, accepted


class InterestProcessor:
    """Validates, de-duplicates and steps one batch of click messages (see the module docstring)."""

    def __init__(
        self,
        session: StepSession,
        store: StateStore,
        settings: Settings,
        catalog: dict[str, tuple[int, ...]],
        partitions: dict[str, int] | None = None,
        metrics: Metrics | None = None,
        step_in_thread: bool = True,
    ) -> None:
        meta = session.meta
        self.session = session
        self.encoder = session.encoder
        self.store = store
        self.settings = settings
        self.metrics = metrics
        self.partitions = partitions or {}
        self.version = meta.version
        self.categories = list(meta.categories)
        self.top_n = min(settings.top_n, len(self.categories))
        # `{"category":<name>,"p":` per category: a row's top list is these joined with its probabilities' JSON,
        # the bytes orjson writes for the list of dicts, at a fraction of the cost of building the dicts
        # (the first entry opens the list, the others close the entry before them), in object arrays that a row's
        # top indices pick from at once
        prefixes = [b'{"category":' + orjson.dumps(name) + b',"p":' for name in self.categories]
        self._top_first = np.array([b"[" + p for p in prefixes], dtype=object)
        self._top_next = np.array([b"}," + p for p in prefixes], dtype=object)
        self.window_bytes = 8 * settings.dedup_window
        self.h0 = np.asarray(meta.h0, dtype=np.float32)
        self.c0 = np.asarray(meta.c0, dtype=np.float32)
        self.router = Router(decoder_for(session, settings, catalog), self.partitions)
        self.info: dict[str, object] = {}  # what the worker logs about the model (set by from_settings)
        # states of batches prepared but not yet written: the next batch builds on them (see write())
        self.inflight: dict[str, UserState] = {}
        self.stepper = BatchStepper(session, settings.ort_threads or None)
        # only the promoted version publishes to the output topic (others keep their states live, invisible)
        self.publishing = True
        self._pointer_read_at = -float("inf")
        self._handing: asyncio.Future | None = None  # the last plan's hand-over of its records (see send)
        # ORT releases the GIL: in a thread, the event loop keeps collecting and writing meanwhile
        self._step_thread = ThreadPoolExecutor(1, thread_name_prefix="ort-step") if step_in_thread else None

    @classmethod
    def from_settings(
        cls, settings: Settings, partitions: dict[str, int], metrics: Metrics | None = None
    ) -> InterestProcessor:
        """The worker's processor: the model session, its catalog and the state store, all from the settings."""
        threads = settings.ort_threads or None
        session = StepSession(settings.model_path, device=settings.device, intra_op_threads=threads)
        catalog = session.load_catalog(settings.catalog_path)
        store = StateStore(settings, session.meta.version, session.meta.hidden_size, metrics)
        processor = cls(session, store, settings, catalog, partitions, metrics)
        processor.info = {
            "version": session.meta.version,
            "categories": len(session.meta.categories),
            "items": len(catalog),
            "provider": session.provider,
            "sequence": f"{processor.stepper.sequence.path.name} ({processor.stepper.sequence.kind})",
        }
        return processor

    async def start(self) -> None:
        """Connect the state store (PING, retried; ServiceError if Redis stays unreachable)."""
        await self.store.start()

    def drop_cache(self) -> None:
        """Partitions moved: forget cached states, the next batch reads them from Redis (never a stale cache)."""
        self.store.drop_cache()

    async def write(self, plan: BatchPlan) -> int:
        """Write the plan's states to Redis (one pipeline); returns the number of stale writes (see StateStore.write).

        Until then the next batch builds on them from ``inflight``; afterwards from the store's cache.
        """
        stale = await self.store.write(plan.writes, plan.states)
        inflight = self.inflight
        for u, st in plan.states.items():
            if inflight.get(u) is st:  # unless a later batch has stepped u further
                del inflight[u]
        if self.metrics:
            self.metrics.users_cached.set(len(self.store.cache))
        return stale

    async def send(self, plan: BatchPlan, producer: Any) -> None:
        """Fill the plan's output records, dead letters and re-keys into record batches for ``producer`` (a started
        aiokafka producer) and hand them over in the background, after the earlier plans' (``plan.delivery``;
        :meth:`publish` waits for it): returns without waiting for the hand-over or the delivery.

        The hand-over waits whenever a partition already has a batch on its way to the broker (aiokafka sends one
        per partition at a time); done inline, that wait held up the next batch's step by 25-80 ms a batch."""
        # straight into aiokafka's record batches: send() would cost ~25 us a record
        batches = RecordBatches(producer)
        add = batches.add
        # the default partitioner's choice, memoised; never None here (the worker created these topics, so their
        # partition counts are known): the ignore says so without a check per record
        router = self.router
        partition_for: Callable[[str, bytes], int] = router.partition_for  # type: ignore[assignment]
        if self.publishing:
            router.hash_keys([key for key, _ in plan.outputs])
        s = self.settings
        out_topic, dlq_topic, rekey_topic = s.output_topic, s.dlq_topic, s.rekey_topic
        for key, value in plan.outputs if self.publishing else ():
            add(out_topic, partition_for(out_topic, key), key, value)
        for msg, reason, detail in plan.dead:
            headers = [
                *original_headers(msg),
                ("dlq.reason", reason.encode()),
                ("dlq.detail", detail.encode("utf-8", "replace")),
                ("dlq.source", f"{msg.topic}:{msg.partition}:{msg.offset}".encode()),
            ]
            value = msg.value or b""
            if len(value) > DLQ_MAX_VALUE:  # only an oversized event can be: cut, so the broker always takes it
                headers.append(("dlq.truncated", b"%d" % len(value)))
                value = value[:DLQ_MAX_VALUE]
            # a message without a key is spread by its source offset
            dlq_key = msg.key or b"%d" % msg.offset
            add(dlq_topic, partition_for(dlq_topic, dlq_key), msg.key, value, headers)
        for key, msg in plan.rekey:
            add(rekey_topic, partition_for(rekey_topic, key), key, msg.value or b"", original_headers(msg))
        earlier = self._handing

        async def hand_over() -> list[asyncio.Future]:
            if earlier is not None:
                await earlier  # in batch order (an earlier failure fails this one too: nothing is acked past it)
            return await batches.send()

        plan.delivery = self._handing = asyncio.ensure_future(hand_over())
        # a failure is raised by publish(); the worker abandons then (nothing here to report it twice)
        plan.delivery.add_done_callback(lambda f: f.cancelled() or f.exception())

    async def publish(self, plan: BatchPlan, producer: Any) -> None:
        """:meth:`send` (unless done already), then wait until the broker has every record of the plan."""
        if plan.delivery is None:
            await self.send(plan, producer)
        assert plan.delivery is not None
        await asyncio.gather(*await plan.delivery)

    async def finish(self, plan: BatchPlan, producer: Any) -> None:
        """The second half of a batch: publish (:meth:`publish`), then write Redis (:meth:`write`), then count.
        Returns only when all of it is done; the caller acks the batch's events after that."""
        await self.publish(plan, producer)
        await self.write(plan)
        m = self.metrics
        if m is None:
            return
        done = time.time()
        m.applied.inc(plan.applied)
        m.duplicates.inc(plan.duplicates)
        m.rekeyed.inc(len(plan.rekey))
        for _msg, reason, _detail in plan.dead:
            m.dead_letters.labels(reason).inc()
        # latency histograms: 16 to 31 evenly spaced events per batch (each observation costs the worker ~2 us)
        every = max(1, len(plan.produce_ts) // 16)
        from_produce = [done - t / 1000.0 for t in plan.produce_ts[::every] if t > 0]  # Kafka's ms; -1: no timestamp
        m.observe_latencies(from_produce, [done - t for t in plan.event_ts[::every]])
        if plan.dead or plan.duplicates or plan.rekey:
            log.info(
                "batch: %d applied, %d duplicates, %d dead-lettered, %d re-keyed",
                plan.applied,
                plan.duplicates,
                len(plan.dead),
                len(plan.rekey),
            )

    async def check_promoted(self) -> None:
        """Publish output records only while this model version is the promoted one (no pointer: publish, as before
        versions existed). The pointer is read at most every POINTER_TTL_S, so a promotion silences the old version
        within about a second; the change is logged and shown by ``interest_publishing``."""
        now = time.monotonic()
        if now - self._pointer_read_at < POINTER_TTL_S:
            return
        self._pointer_read_at = now
        promoted = await self.store.promoted()
        publishing = promoted is None or promoted == self.version
        if publishing != self.publishing:
            log.warning(
                "model %s %s the output topic (promoted: %s)",
                self.version,
                "publishes to" if publishing else "no longer publishes to",
                promoted,
            )
        self.publishing = publishing
        if self.metrics:
            self.metrics.publishing.set(1 if publishing else 0)

    async def prepare(self, messages: Sequence[Message], producer: Any = None) -> BatchPlan:
        """Steps 1-5 of the module docstring for one batch; with ``producer``, then :meth:`send` its records."""
        return await self.prepare_routed(*self.router.route(messages), producer)

    async def prepare_routed(
        self, plan: BatchPlan, accepted: list[tuple[Click, Message]], producer: Any = None
    ) -> BatchPlan:
        """Steps 2-5 for a routed batch (:meth:`route`), in batch order: it builds on the earlier batches' states."""
        return await self.step_staged(await self.stage(plan, accepted), producer)

    async def stage(self, plan: BatchPlan, accepted: list[tuple[Click, Message]]) -> StagedBatch:
        """Steps 2 and 3 and the step's input features: everything before ORT, which needs no earlier batch's
        stepped h and c. The users' new states go into ``inflight`` at once, their h and c to follow at the step.

        So the step process stages batch n+1 while ORT steps batch n (:meth:`step_ort`, batches in order: n+1's
        h and c are read from n's states once n is stepped). Batches are staged in order too."""
        await self.check_promoted()
        staged = StagedBatch(plan)
        if not accepted:
            return staged
        work, users, sources = await self._load(accepted)
        rows, row_slot, row_round, gaps, row_events = self._dedup(plan, accepted, work)
        if rows:
            n = len(rows)
            staged.feats = self.encoder.encode(
                [c.categories for c, _ in rows],
                np.fromiter((c.action for c, _ in rows), dtype=np.int64, count=n),
                np.asarray(gaps, dtype=np.float64),
            )
            staged.rows, staged.row_slot, staged.row_round, staged.row_events = rows, row_slot, row_round, row_events
            staged.work, staged.users, staged.sources = work, users, sources
            inflight = self.inflight
            for click, _ in rows:
                inflight[click.user_id] = work[click.user_id]
        return staged

    async def step_staged(self, staged: StagedBatch, producer: Any = None) -> BatchPlan:
        """Steps 4 and 5 of a staged batch (:meth:`stage`), after every batch staged before it."""
        await self.step_ort(staged)
        return await self.publish_stepped(staged, producer)

    async def step_ort(self, staged: StagedBatch) -> None:
        """Step 4 of a staged batch, after every batch staged before it was stepped: ORT, then each stepped user's
        new h and c into its state, where the next batch's step starts from them. The records of this batch need not
        be built first (:meth:`publish_stepped`), so the step process runs the next batch's ORT call meanwhile."""
        if not staged.rows:
            return
        H, C, P = await self._step(staged, staged.plan)
        staged.probs = P
        # the users' new h and c: rows of one (users, 2H) array, whose bytes are cut into the users' state fields
        HC = np.concatenate([H, C], axis=1).astype("<f4", copy=False)
        n_h, row = H.shape[1], HC.shape[1] * 4
        blob = HC.tobytes()
        work, users, state_bytes = staged.work, staged.users, staged.state_bytes
        for s in np.flatnonzero(np.bincount(staged.row_slot, minlength=len(users))).tolist():
            u = users[s]
            st, state = work[u], blob[s * row : (s + 1) * row]
            # as a state read from Redis: views of the user's own bytes (not of HC, which one cached user would pin)
            hc = np.frombuffer(state, dtype="<f4")
            st.h, st.c = hc[:n_h], hc[n_h:]
            state_bytes[u] = state

    async def publish_stepped(self, staged: StagedBatch, producer: Any = None) -> BatchPlan:
        """Step 5 of a stepped batch (:meth:`step_ort`), in batch order; with ``producer``, then :meth:`send`."""
        plan = staged.plan
        if staged.rows:
            self._publish(plan, staged.rows, staged.row_events, staged.work, staged.state_bytes, staged.probs)
        return await self._sent(plan, producer)

    async def _load(
        self, accepted: list[tuple[Click, Message]]
    ) -> tuple[dict[str, UserState], list[str], dict[str, UserState]]:
        """Step 2: the batch's users' states, as copies (a cached state changes only once Redis has the new one), and
        the in-flight states whose h and c they continue (read when the batch is stepped: see :meth:`stage`)."""
        users = list(dict.fromkeys(c.user_id for c, _ in accepted))
        inflight = self.inflight
        # taken before the await: a write finishing meanwhile drops its states from inflight
        carried = {u: inflight[u] for u in users if u in inflight}
        stored = await self.store.load([u for u in users if u not in carried])
        work: dict[str, UserState] = {}
        for u in users:
            st = carried.get(u) or stored.get(u)
            if st is None:
                work[u] = UserState(h=self.h0, c=self.c0)
            else:  # copy: the cached state changes only once Redis has the new one
                work[u] = UserState(st.h, st.c, st.events, st.last_ts, dict(st.positions), st.recent)
        return work, users, carried

    def _dedup(
        self, plan: BatchPlan, accepted: list[tuple[Click, Message]], work: dict[str, UserState]
    ) -> tuple[list[tuple[Click, Message]], list[int], list[int], list[float], list[int]]:
        """Step 3: drop duplicates; the rows to apply and, per row, its user's slot, round, time gap and event count."""
        slot = {u: i for i, u in enumerate(work)}
        rows: list[tuple[Click, Message]] = []
        row_slot: list[int] = []
        row_round: list[int] = []
        gaps: list[float] = []
        row_events: list[int] = []  # the user's applied-event count after this row
        seen_in_batch: dict[str, int] = {}
        window = self.window_bytes
        tp_names: dict[tuple[str, int], str] = {}
        for click, msg in accepted:
            st = work[click.user_id]
            tp = tp_names.get((msg.topic, msg.partition))
            if tp is None:
                tp = tp_names[(msg.topic, msg.partition)] = f"{msg.topic}:{msg.partition}"
            if msg.offset <= st.positions.get(tp, -1) or st.seen(click.fingerprint):
                plan.duplicates += 1
                continue
            gaps.append(click.ts - st.last_ts)  # nan for a user's first event
            st.positions[tp] = msg.offset
            st.last_ts = click.ts
            st.events += 1
            row_events.append(st.events)
            st.recent = (st.recent + click.fingerprint)[-window:]  # dedup_window >= 1
            r = seen_in_batch.get(click.user_id, 0)
            seen_in_batch[click.user_id] = r + 1
            rows.append((click, msg))
            row_slot.append(slot[click.user_id])
            row_round.append(r)
        return rows, row_slot, row_round, gaps, row_events

    async def _step(self, staged: StagedBatch, plan: BatchPlan) -> tuple[Any, Any, Any]:
        """Step 4: every user's events of the batch in order, the users together (a few ORT calls)."""
        feats, work, sources = staged.feats, staged.work, staged.sources
        # an in-flight user continues from the h and c its earlier batch stepped (that batch's step is done by now)
        start = [sources.get(u) or work[u] for u in staged.users]
        H = np.stack([st.h for st in start]).astype(np.float32, copy=False)
        C = np.stack([st.c for st in start]).astype(np.float32, copy=False)
        P = np.empty((len(staged.rows), len(self.categories)), dtype=np.float32)
        rounds = np.asarray(staged.row_round)
        slots = np.asarray(staged.row_slot)
        t0 = time.perf_counter()
        if self._step_thread is None:
            self.stepper(feats, H, C, P, rounds, slots)
        else:
            step = self.stepper
            await asyncio.get_running_loop().run_in_executor(self._step_thread, step, feats, H, C, P, rounds, slots)
        plan.ort_seconds = time.perf_counter() - t0
        if self.metrics:
            self.metrics.ort_step_seconds.observe(plan.ort_seconds)
        return H, C, P

    def _tops(self, P: np.ndarray) -> list[bytes]:
        """Each row's ``[{"category": name, "p": p}, ...]``, top_n by p (rounded to 6 places), as JSON bytes: one
        bytes join over the batch, cut at the newlines that end the rows (orjson never writes a raw newline)."""
        n, k = P.shape[0], self.top_n
        top_idx = np.argsort(-P, axis=1, kind="stable")[:, :k]  # (rows, k)
        top_p = np.round(np.take_along_axis(P, top_idx, axis=1).astype(np.float64), 6)
        values = orjson.dumps(top_p, option=orjson.OPT_SERIALIZE_NUMPY)[2:-2].replace(b"],[", b",").split(b",")
        parts = np.empty((n, 2 * k + 1), dtype=object)  # (rows, prefix, value, prefix, value, ..., end)
        parts[:, 0] = self._top_first[top_idx[:, 0]]
        parts[:, 2:-1:2] = self._top_next[top_idx[:, 1:]]
        parts[:, 1:-1:2] = np.array(values, dtype=object).reshape(n, k)
        parts[:, -1] = b"}]\n"
        return b"".join(parts.ravel().tolist()).split(b"\n")[:-1]

    def _publish(self, plan, rows, row_events, work, state_bytes, P) -> None:
        """Step 5: one output record per applied event (per user, its last event, with ``output_mode`` "user"), one
        Redis write per user (its last event)."""
        now = time.time()
        last_row: dict[str, int] = {}
        produce_ts, event_ts, outputs = plan.produce_ts, plan.event_ts, plan.outputs
        for i, (click, msg) in enumerate(rows):
            last_row[click.user_id] = i
            produce_ts.append(msg.timestamp)
            event_ts.append(click.ts)
        # the rows whose distribution is serialised (records and Redis), in batch order: a user's records in the
        # order of its events, so the last one on its partition is its newest
        if self.settings.output_mode == "event":
            published: Sequence[int] = range(len(rows))
            at_row: Callable[[int], int] = int
        else:
            published = sorted(last_row.values())
            P = P[published]
            at_row = {r: j for j, r in enumerate(published)}.__getitem__
        # P is serialised once (float32 shortest repr) and cut into rows, embedded as JSON fragments.
        blob = orjson.dumps(P, option=orjson.OPT_SERIALIZE_NUMPY)
        probs_json = [b"[" + row + b"]" for row in blob[2:-2].split(b"],[")]
        tops = self._tops(P)
        dumps, join = orjson.dumps, b"".join
        # the record as orjson writes {"user_id", "probs", "top", "model_version", "event_time", "processed_at",
        # "events", "event_id"}, joined from its parts: a third of the cost of a dict per record and its dumps
        version = self.version
        head, probs, top = b'{"user_id":', b',"probs":', b',"top":'
        mid = b',"model_version":' + dumps(version) + b',"event_time":'
        at, event_id = b',"processed_at":' + dumps(now) + b',"events":', b',"event_id":'
        for j, i in enumerate(published):
            click = rows[i][0]
            u = click.user_id
            record = join(
                (
                    head, dumps(u), probs, probs_json[j], top, tops[j], mid, dumps(click.ts), at,
                    b"%d" % row_events[i], event_id, dumps(click.event_id), b"}",
                )
            )  # fmt: skip
            outputs.append((u.encode(), record))

        # each user's write: its new state (h and c set by step_ort) and its last row's distribution
        user_key, updated_at = self.store.key, repr(now)
        writes, states = plan.writes, plan.states
        for u, i in last_row.items():
            st = work[u]
            j = at_row(i)
            fields = encode_state(st, state_bytes[u])
            fields["probs"] = probs_json[j]
            fields["top"] = tops[j]
            fields["model_version"] = version
            fields["updated_at"] = updated_at
            writes.append(UserWrite(user_key(u), fields, st.events))
            states[u] = st
        # the next batch starts from these, before they reach Redis (there already since stage(): now with h, c)

    async def _sent(self, plan: BatchPlan, producer: Any) -> BatchPlan:
        if producer is not None:
            await self.send(plan, producer)
        return plan
