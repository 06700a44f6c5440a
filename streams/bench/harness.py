"""One bench run's processes and names: the broker and Redis addresses, fresh topics, groups, Redis dbs per
measurement, worker processes and the hidden subcommands' processes, all stopped at the end."""

from __future__ import annotations

import subprocess
import sys
import time
import uuid
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from models.errors import ServiceError
from streams.bench.common import REPO, SESSION_TIMEOUT_S, Plan, log, wait_for
from streams.local.services import WorkerProcess, metric_total, spawn_worker


@dataclass
class BenchRun:
    out: Path
    plan: Plan
    model: Path
    data: Path
    bootstrap: str = ""
    redis_base: str = ""
    service_pids: dict[str, int] = field(default_factory=dict)  # the broker's and Redis', for CpuUse
    run_id: str = field(default_factory=lambda: uuid.uuid4().hex[:6])
    procs: list[subprocess.Popen] = field(default_factory=list)
    _db: int = 0
    _runs: int = 0

    @property
    def logs(self) -> Path:
        return self.out / "logs"

    # ---- names and settings -----------------------------------------------------------------------------------
    def names(self, tag: str, input_topic: str | None = None) -> dict[str, str]:
        """INTEREST_* variables of one run: its own group, output topics, Redis db and prefix."""
        self._db = self._db % 15 + 1
        self._runs += 1
        base = f"bench-{self.run_id}-{tag}{self._runs}"  # never two runs on one set of topics
        return {
            "INTEREST_KAFKA_BOOTSTRAP": self.bootstrap,
            "INTEREST_REDIS_URL": f"{self.redis_base}/{self._db}",
            "INTEREST_INPUT_TOPIC": input_topic or f"{base}-clicks",
            "INTEREST_OUTPUT_TOPIC": f"{base}-interests",
            "INTEREST_DLQ_TOPIC": f"{base}-dlq",
            "INTEREST_REKEY_TOPIC": f"{base}-rekeyed",
            "INTEREST_APP_ID": base,
            "INTEREST_REDIS_PREFIX": f"b{self.run_id}{tag}{self._runs}:",
            "INTEREST_MODEL_PATH": str(self.model),
            "INTEREST_PARTITIONS": "8",
            "INTEREST_SESSION_TIMEOUT_S": SESSION_TIMEOUT_S,
            "INTEREST_WEB_PORT": "0",
            "INTEREST_DEVICE": "cpu",
            "INTEREST_DATA_DIR": str((self.logs / "faust").resolve()),
        }

    @staticmethod
    def settings(env: dict[str, str]):
        from streams.settings import get_settings

        return get_settings(**{k[len("INTEREST_") :].lower(): v for k, v in env.items()})

    # ---- processes ----------------------------------------------------------------------------------------------
    def start_worker(self, env: dict[str, str], name: str) -> WorkerProcess:
        w = spawn_worker(env, self.logs / f"{name}.log", cwd=REPO)
        self.procs.append(w.proc)
        return w

    def wait_ready(self, workers: list[WorkerProcess]) -> None:
        for w in workers:

            def up(w=w) -> bool:
                if not w.alive():
                    tail = w.log.read_text(errors="replace")[-2000:]
                    raise ServiceError(f"worker exited with {w.proc.returncode}: {tail}")
                return metric_total(w.samples(), "interest_events_in_total") >= 0

            wait_for(up, 120, f"worker metrics ({w.log})", 0.2)

    def prefill(self, env: dict[str, str], events: Iterable[dict[str, object]], total: int) -> float:
        """Produce ``events`` into the run's input topic (creating its topics); returns events/s of the producer."""
        from streams.tools.replay import produce

        t0 = time.perf_counter()
        sent = produce(self.settings(env), iter(events), total, None, False)
        eps = sent / (time.perf_counter() - t0)
        log(f"pre-filled {env['INTEREST_INPUT_TOPIC']} with {sent:,} events ({eps:,.0f}/s)")
        return eps

    def spawn(self, command: str, *args: str) -> subprocess.Popen:
        """``python -m streams.bench COMMAND --bootstrap <broker> ARGS`` (a hidden subcommand) in its own process,
        output to ``DIR/logs/COMMAND.log``; stopped with the others at the end."""
        with open(self.logs / f"{command}.log", "wb") as out:
            proc = subprocess.Popen(
                [sys.executable, "-m", "streams.bench", command, "--bootstrap", self.bootstrap, *args],
                cwd=REPO,
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
            )
        self.procs.append(proc)
        return proc
