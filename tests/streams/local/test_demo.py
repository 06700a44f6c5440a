"""`interest-stream demo` end to end: its own services on the default ports, a worker, a replay, live bars."""

from __future__ import annotations

import re
import subprocess
import sys

import pytest

from streams.local.services import RUN_DIR, port_is_free
from streams.settings import LOCAL_KAFKA_PORT, LOCAL_REDIS_PORT
from tests.conftest import REPO

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def test_demo_runs_end_to_end(trained_model, tmp_path) -> None:
    services_were_up = not port_is_free(LOCAL_KAFKA_PORT) and not port_is_free(LOCAL_REDIS_PORT)
    fresh_broker = not (REPO / RUN_DIR / f"kafka-{LOCAL_KAFKA_PORT}").exists()  # the demo runs in REPO
    out = subprocess.run(
        [sys.executable, "-m", "streams.cli", "demo", "--limit", "3000", "--model", str(trained_model)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    # exactly 3,000 from a fresh broker; more where the broker in .run/ kept events of earlier runs that this model's
    # consumer group (one per model version) has not read yet
    done = re.search(r"== done: ([\d,]+) events applied", out.stdout)
    assert done, out.stdout[-2000:]
    applied = int(done.group(1).replace(",", ""))
    assert applied == 3000 if fresh_broker else applied >= 3000, out.stdout[-2000:]
    assert "events, model " in out.stdout  # at least one live bar chart was shown
    if not services_were_up:  # it stops what it started
        assert port_is_free(LOCAL_KAFKA_PORT) and port_is_free(LOCAL_REDIS_PORT)
