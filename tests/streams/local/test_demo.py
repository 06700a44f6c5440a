"""`interest-stream demo` end to end: its own services on the default ports, a worker, a replay, live bars."""

from __future__ import annotations

import subprocess
import sys

import pytest

from streams.local.services import port_is_free
from streams.settings import LOCAL_KAFKA_PORT, LOCAL_REDIS_PORT
from tests.conftest import REPO

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def test_demo_runs_end_to_end(trained_model, tmp_path) -> None:
    services_were_up = not port_is_free(LOCAL_KAFKA_PORT) and not port_is_free(LOCAL_REDIS_PORT)
    out = subprocess.run(
        [sys.executable, "-m", "streams.cli", "demo", "--limit", "3000", "--model", str(trained_model)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    assert "== done: 3,000 events applied" in out.stdout
    assert "events, model " in out.stdout  # at least one live bar chart was shown
    if not services_were_up:  # it stops what it started
        assert port_is_free(LOCAL_KAFKA_PORT) and port_is_free(LOCAL_REDIS_PORT)
