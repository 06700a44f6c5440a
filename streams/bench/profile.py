"""py-spy profiles of a worker and its step process, summarised by function and by area."""

from __future__ import annotations

import contextlib
import shutil
import signal
import subprocess
import sys
from collections import Counter
from pathlib import Path

from streams.bench.common import log


def py_spy_binary() -> str | None:
    local = Path(sys.executable).with_name("py-spy")
    return str(local) if local.exists() else shutil.which("py-spy")


def start_py_spy(pid: int, out: Path, log_path: Path) -> subprocess.Popen | None:
    exe = py_spy_binary()
    if exe is None:
        log("py-spy not installed (pip install py-spy): no profile")
        return None
    with open(log_path, "wb") as f:
        return subprocess.Popen(
            [
                exe,
                "record",
                "--pid",
                str(pid),
                "--rate",
                "100",
                "--format",
                "raw",
                "--function",
                "--nonblocking",
                "--subprocesses",  # the worker's step process too
                "-o",
                str(out),
            ],
            stdout=f,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
        )


def stop_py_spy(spy: subprocess.Popen | None) -> None:
    """SIGINT makes py-spy write its profile; wait for it."""
    if spy is None:
        return
    with contextlib.suppress(ProcessLookupError):
        spy.send_signal(signal.SIGINT)
    with contextlib.suppress(subprocess.TimeoutExpired):
        spy.wait(timeout=30)


def summarize_profile(path: Path, top: int = 15) -> dict:
    """Top functions by self and inclusive share of samples, and self share by area, from py-spy's raw output."""
    self_c: Counter = Counter()
    incl: Counter = Counter()
    area: Counter = Counter()
    total = 0
    for line in path.read_text(errors="replace").splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        n = int(count)
        frames = [_no_line(f) for f in stack.split(";") if f and not f.startswith(("process ", "thread "))]
        if not frames:
            continue
        total += n
        self_c[frames[-1]] += n
        for f in set(frames):
            incl[f] += n
        area[_area(frames[-1])] += n
    if not total:
        return {"samples": 0}

    def pct(c: Counter) -> list[list]:
        return [[name, round(100 * v / total, 1)] for name, v in c.most_common(top)]

    return {"samples": total, "self_pct": pct(self_c), "inclusive_pct": pct(incl), "self_pct_by_area": pct(area)}


def _no_line(frame: str) -> str:
    """``func (path/file.py:123)`` -> ``func (path/file.py)``: one entry per function."""
    head, sep, tail = frame.rpartition(":")
    return f"{head})" if sep and tail.rstrip(")").isdigit() else frame


def _area(frame: str) -> str:
    path = frame[frame.rfind("(") + 1 :]
    for key, name in (
        ("onnxruntime", "onnxruntime"),
        ("aiokafka", "aiokafka"),
        ("kafka/", "kafka-python"),
        ("faust", "faust"),
        ("mode/", "mode"),
        ("redis", "redis-py"),
        ("prometheus_client", "prometheus"),
        ("asyncio", "asyncio"),
        ("numpy", "numpy"),
        ("streams/", "streams (ours)"),
        ("export/", "export (ours)"),
    ):
        if key in path:
            return name
    return "other"
