"""The tree's imports go one way: ``models`` <- ``export`` <- ``streams``, with no cycle anywhere.

Read from the source (every ``import`` and ``from ... import`` of the project's own modules, at module level or
inside functions), so it holds for code paths no test runs.
"""

from __future__ import annotations

import ast
from pathlib import Path

from tests.conftest import REPO

PACKAGES = ("models", "export", "streams")
LAYER = {"models": 0, "export": 1, "streams": 2}  # a module may import only its own layer or lower ones


def _module_name(path: Path) -> str:
    rel = path.relative_to(REPO).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _imports(path: Path, name: str) -> set[str]:
    """The project modules ``path`` imports (resolving relative imports and ``from pkg import module``)."""
    tree = ast.parse(path.read_text(), str(path))
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            found.add(base)
            found |= {f"{base}.{a.name}" for a in node.names}
    return {m for m in found if m.split(".")[0] in PACKAGES}


def _graph() -> dict[str, set[str]]:
    modules = {_module_name(p): p for pkg in PACKAGES for p in (REPO / pkg).rglob("*.py")}
    return {name: {m for m in _imports(path, name) if m in modules and m != name} for name, path in modules.items()}


def test_layers_import_only_downwards() -> None:
    upward = [
        f"{mod} imports {dep}"
        for mod, deps in _graph().items()
        for dep in deps
        if LAYER[dep.split(".")[0]] > LAYER[mod.split(".")[0]]
    ]
    assert not upward, "imports against the layers (models <- export <- streams):\n" + "\n".join(sorted(upward))


def test_no_import_cycles() -> None:
    graph = _graph()
    cycles: list[list[str]] = []
    state: dict[str, int] = {}  # 1 on the current path, 2 done
    path: list[str] = []

    def visit(mod: str) -> None:
        state[mod] = 1
        path.append(mod)
        for dep in sorted(graph[mod]):
            if state.get(dep) == 1:
                cycles.append([*path[path.index(dep) :], dep])
            elif dep not in state:
                visit(dep)
        path.pop()
        state[mod] = 2

    for mod in sorted(graph):
        if mod not in state:
            visit(mod)
    assert not cycles, "import cycles:\n" + "\n".join(" -> ".join(c) for c in cycles)


def test_importing_reads_no_settings_and_starts_nothing() -> None:
    """Every module imports with settings that would not validate: nothing reads them (or builds an app, or opens a
    connection) at import time; declarations only."""
    import subprocess
    import sys

    modules = sorted(_graph())
    code = "import importlib, sys\nfor m in sys.argv[1:]:\n    importlib.import_module(m)\nprint('ok')"
    env = {"PATH": "/usr/bin:/bin", "INTEREST_PARTITIONS": "not-a-number", "INTEREST_KAFKA_BOOTSTRAP": "127.0.0.1:1"}
    out = subprocess.run(
        [sys.executable, "-c", code, *modules], cwd=REPO, env=env, capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr[-3000:]
