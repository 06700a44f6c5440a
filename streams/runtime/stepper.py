"""The batch step in a child process, so that it does not share the worker's GIL with Faust.

    python -m streams.runtime.stepper --fd N --parent P     # started by the worker (StepperProcess), never by hand

The worker's Python holds the GIL most of the time: Faust's consumer thread and event loop take most of it, the
batch step (decode, dedup, output records, the producer and Redis clients) the rest, so in one interpreter they take
turns on one core. :class:`StepperProcess` runs the :class:`~streams.core.processor.InterestProcessor`, its
:class:`~streams.core.state.StateStore` and a producer of its own in a child process instead. The worker sends each
batch over a socket pair, decoded and routed already (:class:`~streams.core.processor.Router`: the worker's process
is the less busy one); the child steps the batch, hands its records to its producer, then awaits their delivery and
writes Redis (in that order, the one the guarantees rest on) and says so; then the worker acks. Same code and
guarantees, two interpreters.
``INTEREST_STEP_PROCESS=false`` keeps everything in the worker's process.

Frames: a 4-byte big-endian length, then a pickled tuple (both ends are this module).
    worker -> child   ("start", settings, {topic: partitions}), first
                      ("prepare", id, events, dead, rekey)    a routed batch (Router.route), in batch order:
                                               events: the events to step, as columns (see _columns): lists of
                                                       user_id, categories, event_id, topic; arrays of action,
                                                       ts, partition, offset, timestamp; fingerprints joined
                                               dead: [(row, reason, detail), ...]   rekey: [(user key, row), ...]
                                               row: (topic, partition, offset, key, value, timestamp, headers)
                                               say "prepared", step the events and hand the batch's records to the
                                               child's producer, then (in batch order) await their delivery and
                                               write the batch to Redis (then "finished")
                      ("drop",)                partitions were revoked: forget the cached states
    child -> worker   ("ready", info, decoder) or ("failed", error class, message), once at start (the decoder is
                                               the model's EventDecoder, for the worker's Router)
                      ("prepared", id, None)   ("finished", id, None)
                      ("metrics", [(metric, labels, method, args), ...])                ("error", text)
The child exits when the socket closes, and is killed with the worker (PR_SET_PDEATHSIG): a killed worker leaves
no child behind that could still write.

One module (~400 lines): both ends of the protocol, the worker's proxy and the child, so a frame is read where it
is written.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import logging
import logging.config
import os
import pickle
import signal
import socket
import struct
import subprocess
import sys
from array import array
from collections.abc import Sequence
from itertools import repeat
from typing import Any

from models import errors
from models.errors import InterestStreamError, ServiceError
from streams.core.events import Click
from streams.core.metrics import Metrics
from streams.core.processor import BatchPlan, Message, RawMessage, Router, StagedBatch
from streams.logs import logging_config
from streams.settings import Settings

log = logging.getLogger("streams.runtime.stepper")

_LEN = struct.Struct(">I")


def quiet_gc() -> None:
    """Keep what start-up built (modules, the model, Faust's app) out of the cyclic GC's full collections (both
    worker processes call it once started).

    A full collection walks every tracked object; with start-up's hundreds of thousands of them it paused the worker
    for 60-80 ms a few times a minute, the largest part of its p99 latency. Frozen objects are still freed by
    reference counting; only start-up's cyclic garbage, collected first, would escape the GC.
    """
    gc.collect()
    gc.freeze()


def _frame(obj: tuple) -> bytes:
    data = pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL)
    return _LEN.pack(len(data)) + data


async def _read(reader: asyncio.StreamReader) -> tuple:
    (n,) = _LEN.unpack(await reader.readexactly(4))
    return pickle.loads(await reader.readexactly(n))


class StepperProcess:
    """The worker's side: :class:`~streams.core.processor.InterestProcessor`'s ``prepare`` / ``finish`` /
    ``drop_cache``, carried out by the child process it starts.

    Constructing it starts the child and waits until it has loaded the model and reached Redis (a bad model or
    an unreachable Redis raises the child's one-line error here); :meth:`start` then connects it to the event loop.
    Any failure of the child (an error, an exit) fails every call in flight and every later one with ServiceError.
    """

    def __init__(self, settings: Settings, partitions: dict[str, int], metrics: Metrics, timeout: float = 120.0):
        self.metrics = metrics
        self.sock, theirs = socket.socketpair()
        cmd = [
            sys.executable,
            "-m",
            "streams.runtime.stepper",
            "--fd",
            str(theirs.fileno()),
            "--parent",
            str(os.getpid()),
        ]
        self.proc = subprocess.Popen(cmd, pass_fds=(theirs.fileno(),))
        theirs.close()
        self.sock.sendall(_frame(("start", settings, partitions)))  # settings as they are here, secrets included
        self.info, decoder = self._handshake(timeout)
        self.router = Router(decoder, partitions)
        self._writer: asyncio.StreamWriter | None = None
        self._waiting: dict[tuple[str, int], asyncio.Future] = {}
        self._failed: str | None = None
        self._next_id = 0
        self._finished: dict[int, asyncio.Future] = {}  # batch id -> its "finished" reply, from prepare to finish
        self._reading: asyncio.Task | None = None
        self._connecting: asyncio.Task | None = None

    def _handshake(self, timeout: float) -> tuple[dict, Any]:
        self.sock.settimeout(timeout)
        try:
            head = self.sock.recv(4, socket.MSG_WAITALL)
            body = self.sock.recv(_LEN.unpack(head)[0], socket.MSG_WAITALL) if len(head) == 4 else b""
            frame = pickle.loads(body) if body else None
        except TimeoutError:
            self.stop()
            raise ServiceError(f"the step process did not start within {timeout:.0f} s") from None
        if frame is None:
            code = self.proc.wait()
            raise ServiceError(f"the step process exited with code {code} while starting (see the log above)")
        if frame[0] == "failed":
            self.stop()
            error = getattr(errors, frame[1], ServiceError)
            raise (error if isinstance(error, type) and issubclass(error, InterestStreamError) else ServiceError)(
                frame[2]
            )
        self.sock.settimeout(None)
        return frame[1], frame[2]

    async def start(self) -> None:
        """Connect the child's socket to the running event loop (once; the first batch may come first)."""
        if self._connecting is None:
            self._connecting = asyncio.ensure_future(self._connect())
        await asyncio.shield(self._connecting)

    async def _connect(self) -> None:
        self.sock.setblocking(False)
        reader, self._writer = await asyncio.open_connection(sock=self.sock)
        self._reading = asyncio.ensure_future(self._read_replies(reader))

    async def _read_replies(self, reader: asyncio.StreamReader) -> None:
        try:
            while True:
                frame = await _read(reader)
                kind = frame[0]
                if kind == "metrics":
                    apply_metrics(self.metrics, frame[1])
                elif kind == "error":
                    self._fail(f"the step process failed: {frame[1]}")
                    return
                else:
                    fut = self._waiting.pop((kind, frame[1]), None)
                    if fut is not None and not fut.done():
                        fut.set_result(frame[2])
        except (asyncio.IncompleteReadError, ConnectionError, OSError):
            code = await asyncio.get_running_loop().run_in_executor(None, self.proc.wait)
            self._fail(f"the step process exited with code {code}")

    def _fail(self, why: str) -> None:
        self._failed = why
        for fut in self._waiting.values():
            if not fut.done():
                fut.set_exception(ServiceError(why))
        self._waiting.clear()

    def _expect(self, reply: str, batch_id: int) -> asyncio.Future:
        """A future for the child's ``(reply, batch_id)`` frame, registered before the request goes out."""
        fut = asyncio.get_running_loop().create_future()
        fut.add_done_callback(lambda f: f.cancelled() or f.exception())  # a failure no caller awaited is not an error
        self._waiting[(reply, batch_id)] = fut
        return fut

    async def prepare(self, messages: Sequence[Message], producer: Any = None) -> BatchPlan:
        """Decode and route the batch here, and hand it to the child, which steps it (after the batches before it) and
        hands its records to its producer, then finishes it on its own (see :meth:`finish`). Returns once the child
        has the batch, so the next one is routed while this one is stepped; the handle is for :meth:`finish`.
        ``producer`` is not used: it is the in-process processor's."""
        if self._failed:
            raise ServiceError(self._failed)
        if self._writer is None:
            await self.start()
        assert self._writer is not None
        self._next_id += 1
        batch_id = self._next_id
        prepared = self._expect("prepared", batch_id)
        self._finished[batch_id] = self._expect("finished", batch_id)
        routed, accepted = self.router.route(messages)
        events = _columns(accepted)
        dead = [(_row(m), reason, detail) for m, reason, detail in routed.dead]
        rekey = [(key, _row(m)) for key, m in routed.rekey]
        try:
            self._writer.write(_frame(("prepare", batch_id, events, dead, rekey)))
            await self._writer.drain()
        except OSError:  # the child is gone; the reader says how once it sees the end of the socket
            if not prepared.done():
                self._fail("the step process closed its socket")
        await prepared
        return BatchPlan(batch_id=batch_id)

    async def finish(self, plan: BatchPlan, producer: Any = None) -> None:
        """Wait until the child has awaited delivery of the batch's records and then written it to Redis.

        The child goes on to that by itself once the batch is stepped, in batch order, without a round trip through
        this (busy) process. ``producer`` is not used: it is the in-process processor's.
        """
        await self._finished.pop(plan.batch_id)  # failed with ServiceError if the child failed first

    def drop_cache(self) -> None:
        """Partitions moved: the child forgets its cached states."""
        if self._writer is not None and not self._failed:
            self._writer.write(_frame(("drop",)))

    def stop(self, timeout: float = 10.0) -> None:
        """Close the socket (the child finishes and exits) and wait for the child; kill it after ``timeout``."""
        with contextlib.suppress(OSError):
            self.sock.close()
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def _row(m: Message) -> tuple:
    return (m.topic, m.partition, m.offset, m.key, m.value, m.timestamp, m.headers or None)


def _columns(accepted: Sequence[tuple[Click, Message]]) -> tuple:
    """A batch's events as columns: a frame of a few lists and arrays pickles and loads in a fraction of the time of
    a tuple per event (the child's share of the hand-off was ~8 % of its time), and the child builds its objects
    from them with ``map``."""
    clicks = [c for c, _ in accepted]
    msgs = [m for _, m in accepted]
    return (
        [c.user_id for c in clicks],
        [c.categories for c in clicks],  # the decoder's tuples, one per item: pickled once each
        [c.event_id for c in clicks],
        [m.topic for m in msgs],
        array("q", [c.action for c in clicks]),
        array("d", [c.ts for c in clicks]),
        b"".join([c.fingerprint for c in clicks]),  # 8 bytes each
        array("q", [m.partition for m in msgs]),
        array("q", [m.offset for m in msgs]),
        array("d", [m.timestamp for m in msgs]),
    )


def _unpack(events: tuple, dead: list[tuple], rekey: list[tuple]) -> tuple[BatchPlan, list]:
    """The child's side of a "prepare" frame: the batch as :meth:`Router.route` returned it in the worker."""
    plan = BatchPlan(
        dead=[(RawMessage(*row), reason, detail) for row, reason, detail in dead],
        rekey=[(key, RawMessage(*row)) for key, row in rekey],
    )
    users, categories, event_ids, topics, actions, ts, fingerprints, partitions, offsets, stamps = events
    prints = [fingerprints[i : i + 8] for i in range(0, 8 * len(users), 8)]
    clicks = map(Click, users, categories, actions.tolist(), ts.tolist(), prints, event_ids)
    msgs = map(RawMessage, topics, partitions.tolist(), offsets.tolist(), repeat(None), repeat(None), stamps.tolist())
    return plan, list(zip(clicks, msgs, strict=True))


class MetricsRelay:
    """Stands in for :class:`~streams.core.metrics.Metrics` in the child: every call on a metric (``inc``, ``observe``,
    ``set``, after ``labels(...)`` or not, and ``observe_latencies``) is queued and sent to the worker, which makes
    the same call on its own metrics; one frame per event-loop turn."""

    def __init__(self, send) -> None:
        self._send = send
        self._ops: list[tuple[str, tuple, str, tuple]] = []  # (metric, label values, method, args)

    def __getattr__(self, name: str) -> _RelayedMetric:
        return _RelayedMetric(self, name, ())

    def observe_latencies(self, from_produce: list[float], from_event: list[float]) -> None:
        self.record("", (), "observe_latencies", (from_produce, from_event))

    def record(self, name: str, labels: tuple, method: str, args: tuple) -> None:
        if not self._ops:
            asyncio.get_running_loop().call_soon(self.flush)
        self._ops.append((name, labels, method, args))

    def flush(self) -> None:
        """Send what was recorded (the child calls it before each reply, so a batch's counts precede its reply)."""
        if self._ops:
            ops, self._ops = self._ops, []
            self._send(("metrics", ops))


def apply_metrics(metrics: Metrics, ops: list[tuple[str, tuple, str, tuple]]) -> None:
    """Make the calls a :class:`MetricsRelay` recorded on ``metrics``."""
    for name, labels, method, args in ops:
        target: Any = getattr(metrics, name) if name else metrics
        if labels:
            target = target.labels(*labels)
        getattr(target, method)(*args)


class _RelayedMetric:
    __slots__ = ("labelled", "name", "relay")

    def __init__(self, relay: MetricsRelay, name: str, labelled: tuple) -> None:
        self.relay, self.name, self.labelled = relay, name, labelled

    def labels(self, *values: str) -> _RelayedMetric:
        return _RelayedMetric(self.relay, self.name, values)

    def inc(self, value: float = 1) -> None:
        self.relay.record(self.name, self.labelled, "inc", (value,))

    def observe(self, value: float) -> None:
        self.relay.record(self.name, self.labelled, "observe", (value,))

    def set(self, value: float) -> None:
        self.relay.record(self.name, self.labelled, "set", (value,))


def _die_with_parent(parent: int) -> None:
    """Be killed when the worker dies (Linux); exit at once if it is already gone."""
    with contextlib.suppress(Exception):
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    if os.getppid() != parent:
        os._exit(0)


async def serve(sock: socket.socket) -> int:
    """The child: build the processor, answer frames until the worker closes the socket."""
    from aiokafka.errors import KafkaError

    from streams.core.processor import InterestProcessor
    from streams.kafka import output_producer

    reader, writer = await asyncio.open_connection(sock=sock)
    try:
        _start, settings, partitions = await _read(reader)
    except (asyncio.IncompleteReadError, ConnectionError):
        return 0  # the worker is gone already
    logging.config.dictConfig(logging_config(settings))
    sys.setswitchinterval(settings.gil_switch_ms / 1000)  # as the worker: the ORT thread waits less for the GIL

    def send(frame: tuple) -> None:
        writer.write(_frame(frame))

    relay = MetricsRelay(send)
    try:
        # the relay stands in for Metrics: the same attributes, recorded and sent to the worker's process
        processor = InterestProcessor.from_settings(settings, partitions, relay)  # type: ignore[arg-type]
        await processor.start()
        producer = output_producer(settings)
        try:
            await producer.start()
        except KafkaError as exc:
            raise ServiceError(f"cannot reach Kafka at {settings.kafka_bootstrap}: {type(exc).__name__}") from None
    except InterestStreamError as exc:
        send(("failed", type(exc).__name__, str(exc)))
        await writer.drain()
        return 2
    send(("ready", processor.info, processor.router.decoder))
    quiet_gc()  # as the worker does: start-up's objects stay out of full collections

    to_route: asyncio.Queue[tuple[int, tuple]] = asyncio.Queue()
    to_prepare: asyncio.Queue[tuple[int, tuple]] = asyncio.Queue()
    to_step: asyncio.Queue[tuple[int, StagedBatch]] = asyncio.Queue()
    to_publish: asyncio.Queue[tuple[int, StagedBatch]] = asyncio.Queue()
    to_finish: asyncio.Queue[tuple[int, BatchPlan]] = asyncio.Queue()
    failed = asyncio.Event()

    async def routing() -> None:
        """Take each routed batch as it comes, while the one before it is stepped (ONNX Runtime releases the GIL),
        and tell the worker it has the batch: the worker then sends the next one."""
        while True:
            batch_id, frame = await to_route.get()
            routed = _unpack(*frame)
            send(("prepared", batch_id, None))
            to_prepare.put_nowait((batch_id, routed))
            await writer.drain()

    async def staging() -> None:
        """Dedup and features of each batch, while ORT steps the one before it (see InterestProcessor.stage)."""
        while True:
            batch_id, (plan, accepted) = await to_prepare.get()
            to_step.put_nowait((batch_id, await processor.stage(plan, accepted)))

    async def stepping() -> None:
        """ORT, batch after batch: the next call starts as soon as this one's states are set, while the publishing
        task builds this batch's records (ORT releases the GIL)."""
        while True:
            batch_id, staged = await to_step.get()
            await processor.step_ort(staged)
            to_publish.put_nowait((batch_id, staged))

    async def publishing() -> None:
        while True:
            batch_id, staged = await to_publish.get()
            # the records go to the producer at once: their delivery overlaps the previous batch's Redis write
            plan = await processor.publish_stepped(staged, producer)
            relay.flush()
            to_finish.put_nowait((batch_id, plan))  # the worker always finishes what it prepared: no need to wait

    async def finishing() -> None:
        while True:
            batch_id, plan = await to_finish.get()
            await processor.finish(plan, producer)
            relay.flush()
            send(("finished", batch_id, None))
            await writer.drain()

    def check(task: asyncio.Task) -> None:
        if not task.cancelled() and task.exception() is not None:
            exc = task.exception()
            log.error("step process failed: %r", exc, exc_info=exc)
            send(("error", repr(exc)))
            failed.set()

    tasks = [asyncio.ensure_future(t()) for t in (routing, staging, stepping, publishing, finishing)]
    for task in tasks:
        task.add_done_callback(check)
    reading = asyncio.ensure_future(_serve_frames(reader, processor, to_route))
    await asyncio.wait([reading, asyncio.ensure_future(failed.wait())], return_when=asyncio.FIRST_COMPLETED)
    for task in [*tasks, reading]:
        task.cancel()
    with contextlib.suppress(Exception):
        await writer.drain()
    with contextlib.suppress(Exception):
        await producer.stop()
    await processor.store.close()
    return 70 if failed.is_set() else 0


async def _serve_frames(reader: asyncio.StreamReader, processor, to_route: asyncio.Queue) -> None:
    """Route the worker's frames until it closes the socket."""
    while True:
        try:
            frame = await _read(reader)
        except (asyncio.IncompleteReadError, ConnectionError):
            return  # the worker is done (or gone)
        kind = frame[0]
        if kind == "prepare":
            to_route.put_nowait((frame[1], frame[2:]))
        elif kind == "drop":
            processor.drop_cache()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--fd", type=int, required=True, help="the worker's end of the socket pair")
    parser.add_argument("--parent", type=int, required=True, help="the worker's pid")
    args = parser.parse_args(argv)
    # the worker decides when to stop (after its graceful drain, by closing the socket): a Ctrl-C or a SIGTERM to
    # the process group must not stop the child before the worker is done with it
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    _die_with_parent(args.parent)

    return asyncio.run(serve(socket.socket(fileno=args.fd)))


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
