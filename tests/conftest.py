"""Session fixtures: a real broker and a real Redis for the whole test session, fresh names for every test.

Services come from the environment when ``INTEREST_TEST_KAFKA`` / ``INTEREST_TEST_REDIS`` are set (e.g. the
docker-compose services); otherwise Apache Kafka (KRaft, one node, its log in the session's temporary folder) and
redis-server are started here on free ports and stopped at the end. A Redis Cluster (3 masters + 3 replicas) is
started only for the tests that ask for ``redis_cluster_url``, or taken from ``INTEREST_TEST_REDIS_CLUSTER`` (a URL
naming one node); tests that kill or reshard nodes start clusters of their own.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import redis

from models.data import SHARED_DATA
from streams.local.cluster import LocalCluster, start_redis_cluster
from streams.local.services import free_port, start_broker, start_redis
from tests.model_fixtures import trained_model  # noqa: F401  (session fixture: small ML-100K model, exported)

REPO = Path(__file__).resolve().parents[1]
DATA = SHARED_DATA


@pytest.fixture(scope="session")
def run_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("services")


@pytest.fixture(scope="session")
def kafka_bootstrap(run_dir: Path) -> Iterator[str]:
    """host:port of a real Apache Kafka broker."""
    if os.environ.get("INTEREST_TEST_KAFKA"):
        yield os.environ["INTEREST_TEST_KAFKA"]
        return
    svc = start_broker(port=free_port(), run_dir=run_dir)
    yield svc.address
    svc.stop()


@pytest.fixture(scope="session")
def redis_url(run_dir: Path) -> Iterator[str]:
    """URL of a real Redis server (persistence off)."""
    if os.environ.get("INTEREST_TEST_REDIS"):
        yield os.environ["INTEREST_TEST_REDIS"]
        return
    svc = start_redis(port=free_port(), run_dir=run_dir)
    yield f"redis://{svc.address}/0"
    svc.stop()


@pytest.fixture(scope="session")
def redis_cluster(run_dir: Path) -> Iterator[LocalCluster | None]:
    """The session's local Redis Cluster (None when INTEREST_TEST_REDIS_CLUSTER names an external one)."""
    if os.environ.get("INTEREST_TEST_REDIS_CLUSTER"):
        yield None
        return
    cluster = start_redis_cluster(run_dir=run_dir / "cluster")
    yield cluster
    cluster.stop()


@pytest.fixture(scope="session")
def redis_cluster_url(redis_cluster: LocalCluster | None) -> str:
    """URL of one node of a real Redis Cluster (use with INTEREST_REDIS_CLUSTER=true)."""
    return os.environ.get("INTEREST_TEST_REDIS_CLUSTER") or redis_cluster.url  # type: ignore[union-attr]


@pytest.fixture
def cluster_client(redis_cluster_url: str) -> Iterator[redis.RedisCluster]:
    client = redis.RedisCluster.from_url(redis_cluster_url)
    yield client
    client.close()


@dataclass(frozen=True)
class Names:
    """Per-test topic names, consumer group and Redis key prefix, so tests never see each other's data."""

    suffix: str
    data_dir: Path  # Faust's data directories, in the session's temporary folder

    @property
    def input_topic(self) -> str:
        return f"clicks-{self.suffix}"

    @property
    def output_topic(self) -> str:
        return f"interests-{self.suffix}"

    @property
    def dlq_topic(self) -> str:
        return f"clicks-dlq-{self.suffix}"

    @property
    def rekey_topic(self) -> str:
        return f"clicks-rekeyed-{self.suffix}"

    @property
    def app_id(self) -> str:
        return f"interest-stream-{self.suffix}"

    @property
    def redis_prefix(self) -> str:
        return f"t{self.suffix}:"

    def worker_env(self, kafka_bootstrap: str, redis_url: str) -> dict[str, str]:
        """INTEREST_* variables pointing a worker (or any tool) at this test's names."""
        return {
            "INTEREST_KAFKA_BOOTSTRAP": kafka_bootstrap,
            "INTEREST_REDIS_URL": redis_url,
            "INTEREST_INPUT_TOPIC": self.input_topic,
            "INTEREST_OUTPUT_TOPIC": self.output_topic,
            "INTEREST_DLQ_TOPIC": self.dlq_topic,
            "INTEREST_REKEY_TOPIC": self.rekey_topic,
            "INTEREST_APP_ID": self.app_id,
            "INTEREST_REDIS_PREFIX": self.redis_prefix,
            "INTEREST_DATA_DIR": str(self.data_dir),
        }


@pytest.fixture
def names(run_dir: Path) -> Names:
    return Names(uuid.uuid4().hex[:10], run_dir / "faust")


@pytest.fixture(scope="session")
def data_dir() -> Path:
    if not DATA.exists():
        pytest.fail(f"real data sets not found at {DATA} (expected ../shared/data beside the repo)")
    return DATA


@pytest.fixture
def rclient(redis_url: str) -> Iterator[redis.Redis]:
    client = redis.Redis.from_url(redis_url)
    yield client
    client.close()


@pytest.fixture
def settings_for(names, kafka_bootstrap: str, redis_url: str, trained_model):  # noqa: F811  (the fixture above)
    """Settings pointing at this test's topics, prefix and the session's model."""
    from streams.settings import Settings

    def make(**overrides: object) -> Settings:
        values = {k[len("INTEREST_") :].lower(): v for k, v in names.worker_env(kafka_bootstrap, redis_url).items()}
        values["model_path"] = trained_model
        values.update(overrides)
        return Settings(**values)

    return make
