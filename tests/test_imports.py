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


# streams/ by purpose, lowest first: the service core (and the settings, logging and Kafka plumbing it uses), then the
# Faust runtime, the operator tools and the reader API, then local services and the demo, then the bench and the CLI
STREAMS_PARTS = (
    ("streams.settings", "streams.logs", "streams.kafka", "streams.core"),
    ("streams.runtime", "streams.tools", "streams.lookup"),
    ("streams.local",),
    ("streams.bench", "streams.cli", "streams"),
)


def _part(mod: str) -> int:
    for rank, prefixes in enumerate(STREAMS_PARTS):
        if any(mod == p or mod.startswith(p + ".") for p in prefixes):
            return rank
    raise AssertionError(f"{mod} belongs to no part of streams/; add it to STREAMS_PARTS")


def test_streams_parts_import_only_downwards() -> None:
    graph = _graph()
    upward = [
        f"{mod} imports {dep}"
        for mod, deps in graph.items()
        if mod.startswith("streams")
        for dep in deps
        if dep.startswith("streams") and _part(dep) > _part(mod)
    ]
    assert not upward, "imports against the parts of streams/:\n" + "\n".join(sorted(upward))


def test_the_service_core_has_no_faust() -> None:
    """The hot path's code (events, processor, state, metrics) runs without Faust: only the runtime knows it is a
    Faust app (and ``streams.kafka``, which renders the one connection config for Faust too, imports it only there)."""
    with_faust = [
        str(path.relative_to(REPO))
        for prefix in ("streams/core", "streams/settings.py")
        for path in ([REPO / prefix] if prefix.endswith(".py") else sorted((REPO / prefix).rglob("*.py")))
        if any(m.split(".")[0] == "faust" for m in _all_imports(path))
    ]
    assert not with_faust, f"these import faust: {with_faust}"


def _all_imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(), str(path))
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            found.add(node.module)
    return found


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

    modules = sorted(m for m in _graph() if not m.endswith("__main__"))  # a __main__ runs when imported
    code = "import importlib, sys\nfor m in sys.argv[1:]:\n    importlib.import_module(m)\nprint('ok')"
    env = {"PATH": "/usr/bin:/bin", "INTEREST_PARTITIONS": "not-a-number", "INTEREST_KAFKA_BOOTSTRAP": "127.0.0.1:1"}
    out = subprocess.run(
        [sys.executable, "-c", code, *modules], cwd=REPO, env=env, capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr[-3000:]
