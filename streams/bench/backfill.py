"""``backfill_eps``: the backfill over ML-100K looped to at least 1,000,000 events (100,000 with --quick), on CPU,
against the product's one-worker rate of the same run (target: >= 10x)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

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
        report_path = self.out / "backfill-report.json"
        full = {k: v for k, v in os.environ.items() if not k.startswith("INTEREST_")} | env
        t0 = time.perf_counter()
        with open(self.logs / "backfill.log", "wb") as out:
            code = subprocess.call(
                [sys.executable, "-m", "streams.cli", "backfill", "--model", str(self.model), "--no-progress",
                 "--json", str(report_path)],
                env=full, stdout=out, stderr=subprocess.STDOUT,
            )  # fmt: skip
        wall = time.perf_counter() - t0
        if code != 0:
            raise ServiceError(f"backfill failed (exit {code}): see {self.logs / 'backfill.log'}")
        rep = json.loads(report_path.read_text())
        log(f"backfill: {rep['applied']:,} events, {rep['users']:,} users, {rep['eps']:,.0f} ev/s ({wall:.1f}s wall)")
        return {
            "eps": rep["eps"],
            "events": rep["applied"],
            "users": rep["users"],
            "seconds": rep["seconds"],
            "wall_s": round(wall, 1),
            "split_s": {k: round(rep[f"{k}_seconds"], 2) for k in ("read", "step", "write")},
        }
