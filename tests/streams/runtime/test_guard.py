"""Record batches no codec can decode are skipped (logged, counted), never a crash loop.

The unit tests feed aiokafka's own fetcher class real record batches, one of them undecodable (its compressed bytes
broken, its CRC made to match, which no broker would accept, so it cannot come from one); the worker test hides the
codec library from a real worker, as on a machine that lacks it, and sends it a real lz4 batch through Apache Kafka.
"""

from __future__ import annotations

import asyncio
import inspect
import struct
from pathlib import Path

import orjson
import pytest
from aiokafka.consumer import fetcher
from aiokafka.record.default_records import DefaultRecordBatchBuilder
from aiokafka.record.memory_records import MemoryRecords
from aiokafka.record.util import calc_crc32c
from aiokafka.structs import TopicPartition

from streams.runtime import guard
from tests.harness import applied_events, ml_events, start_worker, wait_for

LZ4, NONE = 3, 0
HEADER = 61  # bytes before the records of a v2 batch
TP = TopicPartition("clicks", 2)


def batch(base_offset: int, n: int, codec: int = NONE, broken: bool = False) -> bytes:
    """A v2 record batch of ``n`` records at ``base_offset``; ``broken``: its compressed bytes damaged, CRC fixed."""
    builder = DefaultRecordBatchBuilder(2, codec, 0, -1, -1, -1, 1 << 20)
    for i in range(n):
        builder.append(i, timestamp=1_700_000_000_000, key=b"u%d" % i, value=b"v%d" % (base_offset + i), headers=[])
    buf = bytearray(builder.build())
    struct.pack_into(">q", buf, 0, base_offset)
    if broken:
        for i in range(HEADER + 4, len(buf)):
            buf[i] ^= 0x5A
        struct.pack_into(">I", buf, 17, calc_crc32c(bytes(buf[21:])))  # CRC over attributes..end
    return bytes(buf)


@pytest.fixture
def skips(monkeypatch) -> list:
    """Install the guard on a pristine PartitionRecords (restored afterwards); collects its on_skip calls."""
    monkeypatch.setattr(fetcher.PartitionRecords, "__init__", fetcher.PartitionRecords.__init__)
    seen: list = []
    guard.skip_undecodable_batches(lambda *args: seen.append(args))
    return seen


def fetch(data: bytes, offset: int) -> tuple[list[bytes], int]:
    """One fetch as aiokafka's fetcher does it: the records' values and the next fetch offset."""
    records = fetcher.PartitionRecords(TP, MemoryRecords(data), [], offset, None, None, True, fetcher.READ_UNCOMMITTED)
    return [r.value for r in records], records.next_fetch_offset


def test_a_broken_batch_is_refetched_then_skipped_and_the_partition_goes_on(skips) -> None:
    data = batch(0, 10) + batch(10, 10, LZ4, broken=True) + batch(20, 10, LZ4)
    values, offset = fetch(data, 0)
    assert values == [b"v%d" % i for i in range(10)] and offset == 10  # what precedes it is handed over
    for _ in range(guard.UNDECODABLE_RETRIES - 2):
        assert fetch(data[len(batch(0, 10)) :], offset) == ([], 10)  # refetched: maybe a bad read
    values, offset = fetch(data[len(batch(0, 10)) :], offset)
    assert values == [b"v%d" % i for i in range(20, 30)] and offset == 30
    assert len(skips) == 1
    topic, partition, first, last, error = skips[0]
    assert (topic, partition, first, last) == ("clicks", 2, 10, 19)
    assert isinstance(error, Exception)


def test_a_broken_last_batch_moves_the_position_past_it(skips) -> None:
    data = batch(5, 3, LZ4, broken=True)
    for _ in range(guard.UNDECODABLE_RETRIES - 1):
        assert fetch(data, 5) == ([], 5)
    assert fetch(data, 5) == ([], 8)
    assert [s[2:4] for s in skips] == [(5, 7)]


def test_good_batches_pass_unchanged(skips) -> None:
    data = batch(0, 4, LZ4) + batch(4, 4)
    assert fetch(data, 2) == ([b"v2", b"v3", b"v4", b"v5", b"v6", b"v7"], 8)  # a fetch offset inside a batch
    assert not skips


def test_aiokafka_still_has_what_the_guard_hooks_into() -> None:
    """Fails loudly when an aiokafka upgrade moves the names the guard relies on."""
    params = list(inspect.signature(fetcher.PartitionRecords.__init__).parameters)
    assert params[:3] == ["self", "tp", "records"], params
    source = inspect.getsource(fetcher.PartitionRecords._unpack_records)
    for needle in ("records = self._records", "records.has_next()", "records.next_batch()", "self.next_fetch_offset"):
        assert needle in source, f"aiokafka's PartitionRecords._unpack_records no longer uses {needle!r}"
    init = inspect.getsource(fetcher.PartitionRecords.__init__)
    assert "self._tp = tp" in init and "self._check_crcs" in init


@pytest.mark.integration
def test_worker_without_a_codec_skips_the_batch_and_goes_on(
    names, kafka_bootstrap, redis_url, trained_model, data_dir: Path, rclient, tmp_path
) -> None:
    """A worker on a machine without lz4 (cramjam hidden): an lz4 batch between gzip ones is skipped with a logged
    reason and counted; the events before and after it are applied; the worker never stops."""
    from aiokafka import AIOKafkaProducer

    hide = tmp_path / "no-cramjam"
    hide.mkdir()
    (hide / "cramjam.py").write_text('raise ImportError("cramjam hidden by the test")\n')
    worker = start_worker(names, kafka_bootstrap, redis_url, trained_model, tmp_path, PYTHONPATH=str(hide))
    events = ml_events(data_dir, 900)
    before, lz4, after = events[:300], events[300:600], events[600:]

    async def send(chunk: list[dict], codec: str) -> None:
        producer = AIOKafkaProducer(bootstrap_servers=kafka_bootstrap, compression_type=codec, linger_ms=50)
        await producer.start()
        try:
            futures = [
                await producer.send(names.input_topic, orjson.dumps(e), key=str(e["user_id"]).encode()) for e in chunk
            ]
            await asyncio.gather(*futures)
        finally:
            await producer.stop()

    try:
        asyncio.run(send(before, "gzip"))
        wait_for(lambda: applied_events(rclient, names.redis_prefix) == len(before), 60, "the first gzip events")
        asyncio.run(send(lz4, "lz4"))
        asyncio.run(send(after, "gzip"))
        wait_for(lambda: worker.metric("interest_undecodable_events_total") == len(lz4), 60, "the lz4 batches skipped")
        wait_for(
            lambda: applied_events(rclient, names.redis_prefix) == len(before) + len(after), 60, "the later events"
        )
        assert worker.alive()
        samples = worker.samples()
        reasons = {k: v for k, v in samples.items() if k.startswith("interest_undecodable_batches_total{")}
        assert reasons and all('reason="UnsupportedCodecError"' in k for k in reasons), reasons
    finally:
        code = worker.stop()
    out = worker.output()
    assert code == 0, out[-3000:]
    assert "skipped a record batch that cannot be decoded" in out and "lz4" in out
