"""The command line: a subcommand that needs an extra the install lacks says which, in one line."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from tests.conftest import REPO


def _run(args: list[str], hide: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(hide)}
    return subprocess.run(
        [sys.executable, "-m", "streams.cli", *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=120
    )


def test_missing_extra_is_one_clear_line(tmp_path: Path) -> None:
    hide = tmp_path / "no-torch"
    hide.mkdir()  # as in a worker-only install: torch cannot be imported
    (hide / "torch.py").write_text('raise ModuleNotFoundError("No module named \'torch\'", name="torch")\n')
    out = _run(["train", "--dataset", "movielens-100k", "--data", "x", "--out", str(tmp_path / "m")], hide)
    assert out.returncode == 2
    assert out.stderr.strip() == (
        "interest-stream train: needs torch, which this install lacks: pip install 'interest-stream[train]'"
    )
    assert "Traceback" not in out.stderr


def test_worker_side_commands_do_not_need_torch(tmp_path: Path) -> None:
    hide = tmp_path / "no-torch"
    hide.mkdir()
    (hide / "torch.py").write_text('raise ModuleNotFoundError("No module named \'torch\'", name="torch")\n')
    for command in ("worker", "lookup", "verify", "replay", "services"):
        out = _run([command, "--help"], hide)
        assert out.returncode == 0, (command, out.stderr[-2000:])
