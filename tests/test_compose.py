"""docker-compose.yml validates (docker-compose config; no engine needed) and agrees with the settings."""

from __future__ import annotations

import re
import shutil
import subprocess

import pytest
import yaml

from streams.settings import LOCAL_KAFKA_PORT, LOCAL_REDIS_PORT, Settings
from tests.conftest import REPO


@pytest.fixture(scope="module")
def compose() -> dict:
    exe = shutil.which("docker-compose")
    if exe is None:
        pytest.fail("docker-compose is not installed (make setup installs it)")
    out = subprocess.run(
        [exe, "-f", str(REPO / "docker-compose.yml"), "config"], capture_output=True, text=True, check=False
    )
    assert out.returncode == 0, out.stderr
    return yaml.safe_load(out.stdout)


def test_services_and_profiles(compose: dict) -> None:
    services = compose["services"]
    assert {"kafka", "redis", "worker", "worker-gpu"} <= set(services)
    assert services["worker-gpu"]["profiles"] == ["gpu"]
    devices = services["worker-gpu"]["deploy"]["resources"]["reservations"]["devices"]
    assert devices[0]["driver"] == "nvidia"
    assert "appendonly" in " ".join(services["redis"]["command"]), "Redis must run with persistence"


def _host_ports(service: dict) -> set[int]:
    ports = set()
    for p in service.get("ports", []):
        ports.add(int(p["published"]) if isinstance(p, dict) else int(str(p).split(":")[0]))
    return ports


def test_host_ports_match_setting_defaults(compose: dict) -> None:
    s = Settings()
    assert LOCAL_KAFKA_PORT in _host_ports(compose["services"]["kafka"])
    assert s.kafka_bootstrap.endswith(f":{LOCAL_KAFKA_PORT}")
    assert LOCAL_REDIS_PORT in _host_ports(compose["services"]["redis"])
    assert f":{LOCAL_REDIS_PORT}/" in s.redis_url
    assert s.metrics_port in _host_ports(compose["services"]["worker"])


def test_worker_environment_names_real_settings(compose: dict) -> None:
    fields = {f"INTEREST_{name.upper()}" for name in Settings.model_fields}
    readme = (REPO / "README.md").read_text()
    for svc in ("worker", "worker-gpu"):
        env = compose["services"][svc]["environment"]
        assert set(env) <= fields, f"unknown settings in {svc}: {set(env) - fields}"
        for name in env:
            assert name in readme, f"{name} is not documented in the README"
    assert compose["services"]["worker"]["environment"]["INTEREST_KAFKA_BOOTSTRAP"] == "kafka:9092"
    assert re.match(r"redis://redis:6379", compose["services"]["worker"]["environment"]["INTEREST_REDIS_URL"])
