"""What the rollout tests share: a second model (another seed), a producer that keeps events flowing (some users
through librdkafka's default partitioner, so the re-key path is used), a reader polling ``get_interests`` for gaps,
and the CLI run as a subprocess."""

from __future__ import annotations

import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from tests.conftest import REPO
from tests.harness import run_cli, worker_env


@pytest.fixture(scope="session")
def new_model(tmp_path_factory: pytest.TempPathFactory, trained_model: Path) -> Path:
    """A second small ML-100K model (seed 1, so another version), exported like the session's."""
    from export.onnx_export import export_checkpoint
    from models.data import SHARED_DATA
    from models.train import TrainConfig, train

    out = tmp_path_factory.getbasetemp() / "trained-ml100k-seed1"
    if not (out / "model.onnx").is_file():
        tc = TrainConfig(epochs=2, patience=1, batch_users=48, lr=1e-2, seed=1)
        train("movielens-100k", SHARED_DATA / "ml-100k", out, tc=tc, model_overrides={"hidden_size": 32})
        export_checkpoint(out / "model.pt", out / "model.onnx")
    return out / "model.onnx"


def cli(names, kafka_bootstrap: str, redis_url: str, *args: str, timeout: float = 300, **env: str):
    """Run ``interest-stream ARGS`` with this test's settings; the CompletedProcess (output in ``.stdout``)."""
    full = worker_env(names, kafka_bootstrap, redis_url, Path("unused.onnx"), **env)
    full.pop("INTEREST_MODEL_PATH")
    full.update(env)
    return run_cli(full, *args, timeout=timeout)


def spawn_cli(names, kafka_bootstrap: str, redis_url: str, log: Path, *args: str) -> subprocess.Popen:
    full = worker_env(names, kafka_bootstrap, redis_url, Path("unused.onnx"))
    full.pop("INTEREST_MODEL_PATH")
    with open(log, "ab") as out:
        return subprocess.Popen(
            [sys.executable, "-m", "streams.cli", *args], env=full, cwd=REPO, stdout=out, stderr=subprocess.STDOUT
        )


class MixedFeeder(threading.Thread):
    """Produces ``events`` in order at about ``rate`` events/s: users in ``rdkafka_users`` through confluent-kafka
    with librdkafka's default partitioner (CRC32: mostly the wrong partition, so re-keyed), the rest with murmur2."""

    def __init__(self, bootstrap: str, topic: str, events: list[dict], rate: float, rdkafka_users: set[str]):
        super().__init__(daemon=True)
        self.bootstrap, self.topic, self.events, self.rate = bootstrap, topic, events, rate
        self.rdkafka_users = rdkafka_users
        self.produced = 0
        self.error: BaseException | None = None

    def run(self) -> None:
        import orjson
        from confluent_kafka import Producer

        from streams.kafka import KafkaConnection

        # idempotent: without it a retried request may reorder a partition's records, and the oracle replays each
        # user's events in produce order
        base = {**KafkaConnection((self.bootstrap,)).librdkafka(), "enable.idempotence": True, "linger.ms": 5}
        default = Producer(base)  # librdkafka's consistent_random
        murmur = Producer({**base, "partitioner": "murmur2_random"})
        try:
            t0 = time.monotonic()
            for i, ev in enumerate(self.events):
                producer = default if ev["user_id"] in self.rdkafka_users else murmur
                while True:
                    try:
                        producer.produce(self.topic, value=orjson.dumps(ev), key=str(ev["user_id"]).encode())
                        break
                    except BufferError:
                        producer.poll(0.05)
                if i % 200 == 0:
                    default.poll(0)
                    murmur.poll(0)
                    ahead = i / self.rate - (time.monotonic() - t0) if self.rate else 0
                    if ahead > 0:
                        default.flush(ahead)
                        murmur.flush(0)
                        time.sleep(max(0.0, i / self.rate - (time.monotonic() - t0)))
                self.produced = i + 1
            assert default.flush(60) == 0 and murmur.flush(60) == 0, "records left undelivered"
        except BaseException as exc:
            self.error = exc


class Reader(threading.Thread):
    """Polls ``get_interests`` for ``users`` until stopped; records every gap a reader could see: None for a user
    seen before, fewer applied events than the last read, a version that is neither of ``versions``."""

    def __init__(self, settings, users: list[str], versions: set[str]):
        super().__init__(daemon=True)
        self.settings, self.users, self.versions = settings, users, versions
        self.reads = 0
        self.problems: list[str] = []
        self.seen_versions: set[str] = set()
        self.stopping = threading.Event()

    def run(self) -> None:
        from streams.core.state import sync_client
        from streams.lookup import get_interests

        client = sync_client(self.settings)
        last: dict[str, int] = {}
        try:
            while not self.stopping.is_set():
                for u in self.users:
                    got = get_interests(u, self.settings, client)
                    self.reads += 1
                    if got is None:
                        if u in last:
                            self.problems.append(f"user {u}: None after {last[u]} events")
                        continue
                    self.seen_versions.add(got.model_version)
                    if got.model_version not in self.versions:
                        self.problems.append(f"user {u}: version {got.model_version}")
                    if got.events < last.get(u, 0) or got.events == 0:
                        self.problems.append(f"user {u}: {got.events} events after {last.get(u)}")
                    last[u] = got.events
                time.sleep(0.02)
        finally:
            client.close()
