"""``backfill_eps``: the backfill over ML-100K looped to at least 1,000,000 events (100,000 with --quick), on CPU,
against the product's one-worker rate of the same run (target: >= 10x)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

from models.errors import ServiceError
from streams.bench.common import log
from streams.bench.harness import BenchRun
from streams.bench.workloads import looped_events

BACKFILL_EVENTS, BACKFILL_EVENTS_QUICK = 1_000_000, 100_000


class Backfills(BenchRun):
    def backfill(self, ds, quick: bool) -> dict:
        """Pre-fill a topic with the looped log, then time ``interest-stream backfill`` over it (one process, CPU);
        its own report splits the time into read (consume, decode, dedup, with the stepping thread overlapped), step
        (that thread's busy time: ORT and the blocks' arrays) and write (Redis)."""
        total = BACKFILL_EVENTS_QUICK if quick else BACKFILL_EVENTS
        loops = -(-total // len(ds.events))
        env = self.names("bf")
        self.prefill(env, looped_events(ds, loops=loops), loops * len(ds.events))
        t0 = time.perf_counter()
        rep = self.run_backfill(env, self.out / "backfill-report.json", "backfill")
        wall = time.perf_counter() - t0
        log(f"backfill: {rep['applied']:,} events, {rep['users']:,} users, {rep['eps']:,.0f} ev/s ({wall:.1f}s wall)")
        return {
            "eps": rep["eps"],
            "events": rep["applied"],
            "users": rep["users"],
            "seconds": rep["seconds"],
            "wall_s": round(wall, 1),
            "split_s": {k: round(rep[f"{k}_seconds"], 2) for k in ("read", "step", "write")},
        }

    def run_backfill(self, env: dict[str, str], report: Path, name: str) -> dict:
        """``interest-stream backfill`` of the bench's model with ``env`` (and no other INTEREST_* setting), in a
        process of its own (its output in the bench's logs as NAME.log); its JSON report, also written to report."""
        full = {k: v for k, v in os.environ.items() if not k.startswith("INTEREST_")} | env
        log_path = self.logs / f"{name}.log"
        with open(log_path, "wb") as out:
            code = subprocess.call(
                [sys.executable, "-m", "streams.cli", "backfill", "--model", str(self.model), "--no-progress",
                 "--json", str(report)],
                env=full, stdout=out, stderr=subprocess.STDOUT,
            )  # fmt: skip
        if code != 0:
            raise ServiceError(f"backfill failed (exit {code}): see {log_path}")
        return json.loads(report.read_text())
