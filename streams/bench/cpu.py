"""CPU use of the bench's processes over a window (psutil)."""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Iterable


class CpuUse:
    """CPU used over a window (a ``with`` block), in % of one core (so up to 100 x cores): the whole machine, this
    process (the load generator) and the given processes with their children (a worker and its step process); with
    one worker, also its own process (Faust) apart from its step process; and each of ``services`` (name -> pid)."""

    def __init__(self, pids: Iterable[int] = (), services: dict[str, int] | None = None) -> None:
        import psutil

        self.services: dict[str, list] = {}
        for name, pid in (services or {}).items():
            with contextlib.suppress(psutil.Error):
                self.services[name] = [psutil.Process(pid)]
        self.mains: list = []
        self.children: list = []
        for pid in pids:
            with contextlib.suppress(psutil.Error):
                p = psutil.Process(pid)
                self.mains.append(p)
                self.children += p.children(recursive=True)
        self.me = psutil.Process()
        self.result: dict[str, float] = {}

    def _busy(self) -> tuple[float, ...]:
        import psutil

        def used(procs: list) -> float:
            total = 0.0
            for p in procs:
                with contextlib.suppress(psutil.Error):
                    total += sum(p.cpu_times()[:2])
            return total

        t = psutil.cpu_times()
        machine = sum(t) - t.idle - getattr(t, "iowait", 0.0)
        services = (used(procs) for procs in self.services.values())
        return time.perf_counter(), machine, used([self.me]), used(self.mains), used(self.children), *services

    def __enter__(self) -> CpuUse:
        self._start = self._busy()
        return self

    def __exit__(self, *exc: object) -> None:
        end = self._busy()
        wall = max(end[0] - self._start[0], 1e-9)
        machine, mine, mains, children, *services = (
            100 * (b - a) / wall for a, b in zip(self._start[1:], end[1:], strict=True)
        )
        self.result = {"machine": round(machine, 1), "load_generator": round(mine, 1), "cores": os.cpu_count() or 1}
        self.result["seconds"] = round(wall, 2)
        self.result |= {name: round(pct, 1) for name, pct in zip(self.services, services, strict=True)}
        if self.mains:
            self.result["worker"] = round(mains + children, 1)
            if len(self.mains) == 1 and self.children:
                self.result["worker_faust"] = round(mains, 1)
                self.result["step_process"] = round(children, 1)
