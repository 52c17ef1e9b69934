"""The package's structure, which reviews keep finding broken: no two modules import each other (not
even for type hints), the daemon's module map names every module, and only the pipeline moves a
snapshot's state."""

from __future__ import annotations

import ast
import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
FOLDERS = {"snapd": "snapd", "client": "snapd.client", "kernels": "snapd.kernels"}


def _modules() -> dict[str, Path]:
    out = {}
    for folder, package in FOLDERS.items():
        for path in sorted((REPO / folder).rglob("*.py")):
            rel = path.relative_to(REPO / folder).with_suffix("")
            if folder == "snapd" and rel.parts[0] in ("client", "kernels"):  # (the links to the other two)
                continue
            parts = [p for p in rel.parts if p != "__init__"]
            out[".".join([package, *parts])] = path
    return out


def _imports(path: Path, modules: dict[str, Path]) -> set[str]:
    deps = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            for alias in node.names:
                full = f"{node.module}.{alias.name}"
                deps.add(full if full in modules else node.module)
        elif isinstance(node, ast.Import):
            deps.update(alias.name for alias in node.names)
    return {d for d in deps if d in modules}


def test_no_module_imports_one_that_imports_it_back() -> None:
    modules = _modules()
    assert "snapd.client.daemon" in modules and "snapd.daemon.server" in modules
    graph = {name: _imports(path, modules) - {name} for name, path in modules.items()}
    cycles = []
    for start in graph:  # (a depth-first walk from each module: is there a way back to it?)
        seen, todo = set(), [(start, [start])]
        while todo:
            name, path = todo.pop()
            for dep in graph[name]:
                if dep == start:
                    cycles.append(" -> ".join([*path, start]))
                elif dep not in seen and not dep.startswith(f"{start}."):
                    seen.add(dep)
                    todo.append((dep, [*path, dep]))
    # a package's __init__ importing its own modules is not a cycle; anything else is
    cycles = [c for c in cycles
              if not any(b.startswith(f"{a}.") for a, b in zip(c.split(" -> "), c.split(" -> ")[1:]))]
    assert not cycles, "\n".join(cycles)


def test_the_daemons_module_map_names_every_module() -> None:
    doc = (REPO / "snapd" / "daemon" / "__init__.py").read_text()
    named = set(re.findall(r"``(\w+)``", doc))
    missing = [p.stem for p in (REPO / "snapd" / "daemon").glob("*.py") if p.stem != "__init__"
               and p.stem not in named]
    assert not missing, f"snapd/daemon/__init__.py does not name {missing}"


def test_only_the_pipeline_moves_a_snapshots_state() -> None:
    from snapd.daemon.pipeline import Pipeline
    from snapd.daemon.seal_stage import SealStage

    movers = sorted(p.name for p in (REPO / "snapd" / "daemon").glob("*.py") if ".advance(" in p.read_text())
    assert movers == ["pipeline.py", "seal_stage.py"]
    assert issubclass(Pipeline, SealStage)  # (the seal thread's part of the pipeline, not a stage of its own)
