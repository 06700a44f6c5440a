from __future__ import annotations

from collections.abc import Iterator

import pytest
import redis


@pytest.fixture
def rclient(redis_url: str) -> Iterator[redis.Redis]:
    client = redis.Redis.from_url(redis_url)
    yield client
    client.close()


@pytest.fixture
def settings_for(names, kafka_bootstrap: str, redis_url: str, trained_model):
    """Settings pointing at this test's topics, prefix and the session's model."""
    from streams.settings import Settings

    def make(**overrides: object) -> Settings:
        values = {k[len("INTEREST_") :].lower(): v for k, v in names.worker_env(kafka_bootstrap, redis_url).items()}
        values["model_path"] = trained_model
        values.update(overrides)
        return Settings(**values)

    return make
