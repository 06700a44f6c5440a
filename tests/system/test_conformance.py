"""Client conformance: the same real ML-100K slice, produced by every Kafka client our users run, is applied exactly.

Each case replays one slice (plus a few events that must be dead-lettered and one keyed by something other than its
user id) through one producer, each with its own codec, into fresh topics with a worker running, and is judged by the
replay oracle (max |dp| <= 1e-5, no user missing, exact counts). librdkafka's default partitioner
(``consistent_random``: CRC32 of the key) puts users on other partitions than murmur2: the worker's re-key path must
make those exact too, and the re-key counter must say exactly how many it moved. One case also reads the output and
dead-letter topics back with confluent-kafka and with kcat and checks them against the README's formats.

The Java and kafkajs producers are built by ``make setup`` (tests/clients/); a missing client fails the test.
"""

from __future__ import annotations

import asyncio
import shutil
import subprocess
import time
import zlib
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import orjson
import pytest

from export.runtime import StepSession
from streams.core.processor import default_partition
from streams.kafka import KafkaConnection
from streams.tools.verify import verify_events
from tests.conftest import REPO
from tests.harness import applied_events, ml_events, model_names, start_worker, wait_for

pytestmark = pytest.mark.integration

JAVA_CP_JARS = REPO / ".deps" / "clients" / "java"
JAVA_CP = f"{JAVA_CP_JARS}/*:{JAVA_CP_JARS / 'classes'}"
JAVA_CLASS = JAVA_CP_JARS / "classes" / "FileProducer.class"
KAFKAJS_DIR = REPO / "tests" / "clients" / "kafkajs"
PRODUCE_TIMEOUT_S = 120

Record = tuple[bytes | None, bytes]  # (key, value) as produced

# (value, the dead-letter reason the README gives for it); "%s" is a slice user's id, the record's key too (_stream)
BAD_VALUES: list[tuple[bytes, str]] = [
    (b'{"user_id": "%s", "item_id": "no-such-item", "ts": 881250949}', "unknown_item"),
    (b"{not json", "bad_json"),
    (b"[1, 2]", "not_object"),
]
REKEYED_EVENT = {"user_id": "conf-rekeyed-1", "item_id": "50", "ts": 881250949, "event_id": "conformance:rekeyed-1"}
REKEYED_KEY = b"session-42"  # not its user id: forwarded through the re-key topic
README_OUTPUT_FIELDS = {"user_id", "probs", "top", "model_version", "event_time", "processed_at", "events"}

KAFKAJS_PACKAGE = KAFKAJS_DIR / "node_modules" / "kafkajs" / "package.json"
REQUIREMENTS: dict[str, tuple[str, Callable[[], bool]]] = {  # name -> (what is missing, present?)
    "kcat": ("kcat", lambda: shutil.which("kcat") is not None),
    "java": ("java", lambda: shutil.which("java") is not None),
    "java-producer": (
        "the Java producer (.deps/clients/java)",
        lambda: JAVA_CLASS.exists() and any(JAVA_CP_JARS.glob("kafka-clients-*.jar")),
    ),
    "node": ("node", lambda: shutil.which("node") is not None),
    "kafkajs": ("kafkajs (tests/clients/kafkajs/node_modules)", KAFKAJS_PACKAGE.exists),
}


def _need(*what: str) -> None:
    """Fail (never skip: CI runs `make setup` first) unless every named client is there."""
    missing = [REQUIREMENTS[w][0] for w in what if not REQUIREMENTS[w][1]()]
    if missing:
        pytest.fail(f"missing: {', '.join(missing)}; run `make setup` (it builds the test clients in tests/clients/)")


def _write_lines(path: Path, records: list[Record]) -> Path:
    """``key<TAB>value`` lines (UTF-8), the input of the file-based producers."""
    lines = []
    for key, value in records:
        assert key is not None and b"\t" not in key + value and b"\n" not in key + value
        lines.append(key + b"\t" + value + b"\n")
    path.write_bytes(b"".join(lines))
    return path


def _run(argv: list[str], expect_count: int | None = None) -> str:
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=PRODUCE_TIMEOUT_S, check=False)
    assert proc.returncode == 0, f"{argv[0]} failed ({proc.returncode}): {proc.stderr[-3000:]}"
    if expect_count is not None:
        assert proc.stdout.strip().splitlines()[-1] == str(expect_count), proc.stdout[-500:]
    return proc.stdout


@dataclass
class Case:
    """How one client produces the case's records into a topic."""

    produce: Callable[[str, str, list[Record], Path, object], list[Record]]  # -> the records in produce order
    murmur2: bool  # the client's default (or configured) partitioner is Kafka's murmur2
    codec: str
    downstream: bool = False  # also read the output and dead-letter topics back with confluent-kafka and kcat
    needs: tuple[str, ...] = ()  # REQUIREMENTS the case's client needs


def _kafka_python(bootstrap: str, topic: str, records: list[Record], tmp: Path, settings) -> list[Record]:
    """Ours: the replay tool's producer (gzip) for the slice, then kafka-python (gzip) for the extra records."""
    from kafka import KafkaProducer

    from streams.core.events import encode_event
    from streams.tools.replay import produce

    good = [orjson.loads(v) for k, v in records if k is not None and _is_slice_event(k, v)]
    sent = produce(settings, iter(good), len(good), None, False, compression="gzip")
    assert sent == len(good)
    extras = [(k, v) for k, v in records if not (k is not None and _is_slice_event(k, v))]
    producer = KafkaProducer(bootstrap_servers=bootstrap, acks="all", linger_ms=5, compression_type="gzip")
    try:
        for key, value in extras:
            producer.send(topic, key=key, value=value).get(timeout=30)
    finally:
        producer.close()
    return [(str(e["user_id"]).encode(), encode_event(e)) for e in good] + extras


def _is_slice_event(key: bytes, value: bytes) -> bool:
    """An ML-100K event of the slice (what the replay tool sends): valid JSON keyed by its own user id, with an id."""
    try:
        obj = orjson.loads(value)
    except orjson.JSONDecodeError:
        return False
    return (
        isinstance(obj, dict)
        and str(obj.get("event_id", "")).startswith("movielens-100k:")
        and key == str(obj["user_id"]).encode()
    )


def _aiokafka(bootstrap: str, topic: str, records: list[Record], tmp: Path, settings) -> list[Record]:
    from aiokafka import AIOKafkaProducer

    async def send() -> None:
        producer = AIOKafkaProducer(bootstrap_servers=bootstrap, acks="all", linger_ms=5, compression_type="lz4")
        await producer.start()
        try:
            futures = [await producer.send(topic, value=v, key=k) for k, v in records]
            await asyncio.gather(*futures)
        finally:
            await producer.stop()

    asyncio.run(send())
    return records


def _confluent(partitioner: str | None, codec: str):
    def produce(bootstrap: str, topic: str, records: list[Record], tmp: Path, settings) -> list[Record]:
        from confluent_kafka import Producer

        conf = {**KafkaConnection((bootstrap,)).librdkafka(), "acks": "all", "linger.ms": 5, "compression.type": codec}
        if partitioner:
            conf["partitioner"] = partitioner
        errors: list = []
        producer = Producer(conf)
        for key, value in records:
            while True:
                try:
                    producer.produce(
                        topic, value=value, key=key, on_delivery=lambda err, _m: err and errors.append(err)
                    )
                    break
                except BufferError:
                    producer.poll(0.1)
            producer.poll(0)
        assert producer.flush(PRODUCE_TIMEOUT_S) == 0, "confluent-kafka: records left undelivered"
        assert not errors, f"confluent-kafka delivery errors: {errors[:3]}"
        return records

    return produce


def _kcat(bootstrap: str, topic: str, records: list[Record], tmp: Path, settings) -> list[Record]:
    path = _write_lines(tmp / "records.tsv", records)
    _run(["kcat", "-P", "-b", bootstrap, "-t", topic, "-K", "\\t", "-z", "lz4", "-X", "acks=all", "-l", str(path)])
    return records


def _java(bootstrap: str, topic: str, records: list[Record], tmp: Path, settings) -> list[Record]:
    path = _write_lines(tmp / "records.tsv", records)
    argv = ["java", "-cp", JAVA_CP, "FileProducer", bootstrap, topic, str(path), "compression.type=zstd"]
    _run([*argv, "linger.ms=20"], expect_count=len(records))
    return records


def _kafkajs(bootstrap: str, topic: str, records: list[Record], tmp: Path, settings) -> list[Record]:
    path = _write_lines(tmp / "records.tsv", records)
    _run(["node", str(KAFKAJS_DIR / "produce.js"), bootstrap, topic, str(path), "gzip"], expect_count=len(records))
    return records


CASES = {
    "kafka-python": Case(_kafka_python, murmur2=True, codec="gzip"),
    "aiokafka": Case(_aiokafka, murmur2=True, codec="lz4"),
    "confluent-default": Case(_confluent(None, "zstd"), murmur2=False, codec="zstd", downstream=True, needs=("kcat",)),
    "confluent-murmur2": Case(_confluent("murmur2_random", "snappy"), murmur2=True, codec="snappy"),
    # kcat's default partitioner: librdkafka's consistent_random, as confluent-kafka's
    "kcat": Case(_kcat, murmur2=False, codec="lz4", needs=("kcat",)),
    "java": Case(_java, murmur2=True, codec="zstd", needs=("java", "java-producer")),
    "kafkajs": Case(_kafkajs, murmur2=True, codec="gzip", needs=("node", "kafkajs")),
}
assert {c.codec for c in CASES.values()} >= {"gzip", "snappy", "lz4", "zstd"}


def _stream(data_dir: Path) -> tuple[list[Record], dict[bytes, str]]:
    """The slice with the bad events and the wrongly keyed one interleaved; and each bad value's reason."""
    events = ml_events(data_dir, limit=4000, users=60)
    records: list[Record] = [(str(e["user_id"]).encode(), orjson.dumps(e)) for e in events]
    users = list(dict.fromkeys(e["user_id"] for e in events))
    reasons: dict[bytes, str] = {}
    for i, (template, reason) in enumerate(BAD_VALUES):
        user = users[i * 7].encode()
        value = template.replace(b"%s", user) if b"%s" in template else template
        reasons[value] = reason
        records.insert(700 + 1000 * i, (user, value))
    records.insert(2200, (REKEYED_KEY, orjson.dumps(REKEYED_EVENT)))
    return records, reasons


def _partition_counts(bootstrap: str, *topics: str) -> dict[str, int]:
    from confluent_kafka.admin import AdminClient

    meta = AdminClient(KafkaConnection((bootstrap,)).librdkafka()).list_topics(timeout=10)
    return {t: len(meta.topics[t].partitions) for t in topics if t in meta.topics and not meta.topics[t].error}


def _end_offsets(bootstrap: str, topic: str, partitions: int) -> int:
    """Records in ``topic``: the sum of its partitions' high watermarks (nothing is deleted or compacted here)."""
    from confluent_kafka import Consumer, TopicPartition

    c = Consumer(
        {
            **KafkaConnection((bootstrap,)).librdkafka(),
            "group.id": "conformance-watermarks",
            "enable.auto.commit": False,
        }
    )
    try:
        return sum(c.get_watermark_offsets(TopicPartition(topic, p), timeout=10)[1] for p in range(partitions))
    finally:
        c.close()


CODECS = {0: "none", 1: "gzip", 2: "snappy", 3: "lz4", 4: "zstd"}  # a v2 record batch's attributes & 0x07


def _batch_codecs(bootstrap: str, topic: str, partitions: int) -> Counter:
    """(codec, records in the batch) -> batches, for the record batches of ``topic`` as the broker keeps them
    (``compression.type=producer``: as the client sent them): raw Fetch requests, each batch's v2 header read."""
    from aiokafka import AIOKafkaClient
    from aiokafka.protocol.fetch import FetchRequest
    from aiokafka.structs import TopicPartition

    async def fetch() -> Counter:
        client = AIOKafkaClient(bootstrap_servers=bootstrap)
        await client.bootstrap()
        codecs: Counter = Counter()
        try:
            await client.force_metadata_update()
            for p in range(partitions):
                leader = client.cluster.leader_for_partition(TopicPartition(topic, p))
                offset, highwater = 0, None
                while highwater is None or offset < highwater:
                    req = FetchRequest(100, 1, 64 << 20, 0, [(topic, [(p, offset, 64 << 20)])])
                    row = (await client.send(leader, req)).topics[0][1][0]  # the version's fields, records last
                    error, highwater, data = row[1], row[2], row[-1]
                    assert error == 0, f"fetch {topic}[{p}] at {offset}: error {error}"
                    pos, start = 0, offset
                    while pos + 61 <= len(data):  # a whole v2 batch header (61 bytes); a cut batch ends the data
                        base, length = int.from_bytes(data[pos : pos + 8]), int.from_bytes(data[pos + 8 : pos + 12])
                        if pos + 12 + length > len(data):
                            break
                        assert data[pos + 16] == 2, f"record batch magic {data[pos + 16]}"
                        attributes = int.from_bytes(data[pos + 21 : pos + 23])  # the codec in its low 3 bits
                        last_delta = int.from_bytes(data[pos + 23 : pos + 27])
                        codecs[CODECS[attributes & 0x07], last_delta + 1] += 1
                        offset = base + last_delta + 1
                        pos += 12 + length
                    assert offset > start or offset >= highwater, f"fetch {topic}[{p}] at {offset}: no whole batch"
        finally:
            await client.close()
        return codecs

    return asyncio.run(fetch())


def _expected_rekeys(records: list[Record], bad: dict[bytes, str], partitions: int, murmur2: bool) -> int:
    """Events the worker re-keys: the valid ones keyed by something else than their user id, plus, for a CRC32
    partitioner (librdkafka's consistent_random), every valid one whose key's CRC32 partition is not murmur2's."""
    n = 0
    for key, value in records:
        if value in bad:
            continue  # dead-lettered before any routing
        wrong_key = key != str(orjson.loads(value)["user_id"]).encode()
        crc32_elsewhere = not murmur2 and zlib.crc32(key) % partitions != default_partition(key, partitions)
        n += wrong_key or crc32_elsewhere
    return n


@pytest.mark.parametrize("client", list(CASES))
def test_every_client_is_applied_exactly(
    client, names, kafka_bootstrap, redis_url, trained_model, data_dir, rclient, settings_for, tmp_path
):
    case = CASES[client]
    _need(*case.needs)
    records, reasons = _stream(data_dir)
    settings = settings_for()
    t0 = time.monotonic()
    # the worker creates the topics (4 partitions, the re-key topic co-partitioned) before anything is produced
    worker = start_worker(names, kafka_bootstrap, redis_url, trained_model, tmp_path)
    try:
        rekey_topic = model_names(names, trained_model).rekey_topic  # the model version's own re-key topic
        counts = _partition_counts(kafka_bootstrap, names.input_topic, rekey_topic, names.output_topic)
        assert counts == dict.fromkeys((names.input_topic, rekey_topic, names.output_topic), 4), counts
        t_started = time.monotonic()
        produced = case.produce(kafka_bootstrap, names.input_topic, records, tmp_path, settings)
        t_produced = time.monotonic()
        assert sorted(produced) == sorted(records), "the producer sent other records than the case's"
        assert _end_offsets(kafka_bootstrap, names.input_topic, 4) == len(records), "not every record is in Kafka"
        # every batch of several records compressed with the case's codec; a client may send a lone record as is
        # (kafka-python does when compressing it saves nothing)
        batches = _batch_codecs(kafka_bootstrap, names.input_topic, 4)
        assert {codec for codec, n in batches if n > 1} == {case.codec}, f"(codec, records): batches {dict(batches)}"
        assert {codec for codec, _n in batches} <= {case.codec, "none"}, f"(codec, records): batches {dict(batches)}"
        compressed = sum(n * k for (codec, n), k in batches.items() if codec == case.codec)
        n_compressed = sum(k for (codec, _n), k in batches.items() if codec == case.codec)
        assert compressed >= 0.99 * len(records), f"only {compressed} records in {case.codec} batches"

        applied = len(records) - len(reasons)
        dead = len(reasons)
        wait_for(
            lambda: (
                applied_events(rclient, names.redis_prefix) == applied
                and worker.metric("interest_dead_letters_total") >= dead
            ),
            120,
            f"{applied} events applied and {dead} dead-lettered ({worker.log})",
        )
        rekeys = _expected_rekeys(records, reasons, 4, case.murmur2)
        counted = ("interest_events_applied_total", "interest_rekeyed_total")
        wait_for(
            lambda: worker.metric(counted[0]) >= applied and worker.metric(counted[1]) >= rekeys,
            10,
            f"applied and re-keyed events counted ({worker.log})",
        )
        samples = worker.samples()
        assert worker.metric("interest_events_applied_total") == applied
        assert worker.metric("interest_dead_letters_total") == dead
        assert worker.metric("interest_duplicates_skipped_total") == 0
        assert worker.metric("interest_undecodable_batches_total") == 0, f"a {case.codec} batch was skipped"
        # CRC32 partitioning moves a good part of the users; murmur2 only the one event keyed by something else
        assert worker.metric("interest_rekeyed_total") == rekeys
        if case.murmur2:
            assert rekeys == 1
        else:
            assert rekeys > 1, "CRC32 partitioning is expected to move some of the slice's users"
        for reason, n in Counter(reasons.values()).items():
            assert samples.get(f'interest_dead_letters_total{{reason="{reason}"}}') == n, reason
        assert worker.alive()
    finally:
        assert worker.stop() == 0, worker.output()[-3000:]
    done = time.monotonic()

    # the oracle, fed the records in the order the producer produced them
    report = verify_events([v for _k, v in produced], StepSession(trained_model, device="cpu"), settings, rclient)
    assert report.ok, report.summary()
    assert report.max_dp <= 1e-5
    assert report.events == applied and report.rejected == dead
    assert report.users == len({k for k, v in records if v not in reasons} - {REKEYED_KEY}) + 1
    print(
        f"{client}: worker up in {t_started - t0:.1f}s; {len(records)} records produced in "
        f"{t_produced - t_started:.1f}s ({n_compressed} {case.codec} batches); all applied "
        f"{done - t_produced:.1f}s later; {rekeys} re-keyed; {report.summary()}"
    )

    if case.downstream:
        _check_downstream(kafka_bootstrap, names, records, reasons, applied, trained_model)


def _consume_confluent(bootstrap: str, topic: str, expected: int, timeout: float = 60.0) -> list:
    """Every record of ``topic`` from the beginning with confluent-kafka (assigned partitions, no group commit)."""
    from confluent_kafka import OFFSET_BEGINNING, Consumer, TopicPartition

    c = Consumer(
        {
            **KafkaConnection((bootstrap,)).librdkafka(),
            "group.id": f"conformance-read-{topic}",
            "enable.auto.commit": False,
            "enable.partition.eof": False,
        }
    )
    got: list = []
    try:
        n = len(c.list_topics(topic, timeout=10).topics[topic].partitions)
        c.assign([TopicPartition(topic, p, OFFSET_BEGINNING) for p in range(n)])
        deadline = time.monotonic() + timeout
        while len(got) < expected and time.monotonic() < deadline:
            for m in c.consume(num_messages=1000, timeout=0.5):
                assert m.error() is None, m.error()
                got.append(m)
        # nothing beyond the expected records
        got.extend(m for m in c.consume(num_messages=1000, timeout=1.0) if m.error() is None)
    finally:
        c.close()
    return got


def _consume_kcat(bootstrap: str, topic: str) -> list[dict]:
    """Every record of ``topic`` as kcat's JSON envelope (``-J``): key/payload as strings, headers as a flat
    [name, value, ...] list (kcat 1.7)."""
    _need("kcat")
    out = _run(["kcat", "-C", "-b", bootstrap, "-t", topic, "-J", "-e", "-o", "beginning", "-q"])
    return [orjson.loads(line) for line in out.splitlines() if line.strip()]


def _kcat_text(field: object) -> bytes | None:
    """A kcat -J key or payload: kcat 1.7 prints it as a JSON string (valid UTF-8 as is), null for NULL."""
    if field is None:
        return None
    assert isinstance(field, str), f"kcat -J printed {type(field).__name__}, expected a string"
    return field.encode()


def _check_downstream(bootstrap: str, names, records: list[Record], reasons: dict[bytes, str], applied: int, model):
    session = StepSession(model, device="cpu")
    categories = list(session.meta.categories)
    per_user = Counter(k.decode() for k, v in records if v not in reasons and k != REKEYED_KEY)
    per_user[REKEYED_EVENT["user_id"]] += 1

    # output topic, confluent-kafka: one record per applied event, keyed by user id, the README's fields
    out = _consume_confluent(bootstrap, names.output_topic, applied)
    assert len(out) == applied
    last_events: dict[str, int] = {}
    for m in out:
        rec = orjson.loads(m.value())
        assert set(rec) >= README_OUTPUT_FIELDS
        assert m.key() == rec["user_id"].encode()
        assert len(rec["probs"]) == len(categories) and all(isinstance(p, float) for p in rec["probs"])
        assert abs(sum(rec["probs"]) - 1) < 1e-4
        assert len(rec["top"]) == min(5, len(categories))
        assert all(set(t) == {"category", "p"} and t["category"] in categories for t in rec["top"])
        assert [t["p"] for t in rec["top"]] == sorted((t["p"] for t in rec["top"]), reverse=True)
        assert isinstance(rec["events"], int) and isinstance(rec["event_time"], float)
        assert rec["model_version"] == session.meta.version
        # a user's records are on one partition, in order: events counts 1, 2, 3, ...
        assert rec["events"] == last_events.get(rec["user_id"], 0) + 1, rec["user_id"]
        last_events[rec["user_id"]] = rec["events"]
    assert last_events == dict(per_user)
    rekeyed_out = [orjson.loads(m.value()) for m in out if m.key() == REKEYED_EVENT["user_id"].encode()]
    assert [r["event_id"] for r in rekeyed_out] == [REKEYED_EVENT["event_id"]]

    # dead letters, confluent-kafka: the original key and bytes, the reason in the headers
    dlq = _consume_confluent(bootstrap, names.dlq_topic, len(reasons))
    assert len(dlq) == len(reasons)
    original_keys = {v: k for k, v in records if v in reasons}
    for m in dlq:
        headers = dict(m.headers() or [])
        assert m.value() in reasons, m.value()
        assert headers["dlq.reason"].decode() == reasons[m.value()]
        assert headers["dlq.detail"]
        assert headers["dlq.source"].decode().startswith(f"{names.input_topic}:")
        assert m.key() == original_keys[m.value()]

    # the same two topics with kcat's JSON envelope
    kout = _consume_kcat(bootstrap, names.output_topic)
    assert len(kout) == applied
    kusers = Counter()
    for env in kout:
        rec = orjson.loads(_kcat_text(env["payload"]))
        assert set(rec) >= README_OUTPUT_FIELDS
        assert _kcat_text(env["key"]) == rec["user_id"].encode()
        kusers[rec["user_id"]] += 1
    assert kusers == per_user
    kdlq = _consume_kcat(bootstrap, names.dlq_topic)
    assert len(kdlq) == len(reasons)
    for env in kdlq:
        value = _kcat_text(env["payload"])
        flat = env.get("headers") or []
        headers = dict(zip(flat[::2], flat[1::2], strict=True))
        assert value in reasons and headers["dlq.reason"] == reasons[value]
        assert headers["dlq.source"].startswith(f"{names.input_topic}:")
        assert _kcat_text(env["key"]) == original_keys[value]
