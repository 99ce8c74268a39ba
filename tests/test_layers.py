"""The package's layers, read from the source with ``ast`` (imports at module level and inside
functions alike): library modules below, command modules (``python -m vitok_fast.<tool>``,
those with a ``__main__`` block) on top, the kernels at the bottom, no import cycles.
docs/design.md, "Architecture", says why."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# Commands the README documents; the test derives the set from the source and checks these are in it.
KNOWN_COMMANDS = {"encode", "decode", "evaluate", "reconstruct", "latent_stats", "sample",
                  "selftest", "plots"}


def _module_files() -> dict[str, Path]:
    """Module name -> file: vitok_fast/*.py, kernels/*.py (installed as vitok_fast.kernels),
    train/*.py (scripts, named train.<file>)."""
    files = {}
    for folder, package in (("vitok_fast", "vitok_fast"), ("kernels", "vitok_fast.kernels"),
                            ("train", "train")):
        for path in sorted((ROOT / folder).glob("*.py")):
            files[package if path.stem == "__init__" else f"{package}.{path.stem}"] = path
    return files


FILES = _module_files()


def _is_command(tree: ast.Module) -> bool:
    """A module-level ``if __name__ == "__main__":``."""
    for node in tree.body:
        if isinstance(node, ast.If) and isinstance(node.test, ast.Compare):
            sides = [node.test.left, *node.test.comparators]
            if any(isinstance(s, ast.Name) and s.id == "__name__" for s in sides) and \
                    any(isinstance(s, ast.Constant) and s.value == "__main__" for s in sides):
                return True
    return False


def _known(name: str) -> str | None:
    """The longest prefix of a dotted name that is one of our modules."""
    parts = name.split(".")
    for k in range(len(parts), 0, -1):
        if ".".join(parts[:k]) in FILES:
            return ".".join(parts[:k])
    return None


def _imports(module: str, tree: ast.Module) -> set[str]:
    """Our modules that ``module`` imports anywhere in its source."""
    package = module if FILES[module].stem == "__init__" else module.rpartition(".")[0]
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found |= {_known(alias.name) for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: from . import x / from .x import y
                anchor = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                base = f"{anchor}.{base}" if base else anchor
            for alias in node.names:  # from pkg import submodule, or a name of pkg
                found.add(_known(f"{base}.{alias.name}") or _known(base))
    found.discard(None)
    found.discard(module)
    return found


def _graph() -> tuple[dict[str, set[str]], set[str]]:
    graph, commands = {}, set()
    for module, path in FILES.items():
        tree = ast.parse(path.read_text(), filename=str(path))
        graph[module] = _imports(module, tree)
        if module.startswith("vitok_fast") and _is_command(tree):
            commands.add(module)
    return graph, commands


def _cycle(graph: dict[str, set[str]], nodes: set[str]) -> list[str] | None:
    """One import cycle among ``nodes`` as [a, b, ..., a], or None."""
    state: dict[str, int] = {}  # 1 on the current path, 2 done
    path: list[str] = []

    def visit(node):
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph[node] & nodes):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            if nxt not in state:
                found = visit(nxt)
                if found:
                    return found
        state[node] = 2
        path.pop()
        return None

    for node in sorted(nodes):
        if node not in state:
            found = visit(node)
            if found:
                return found
    return None


GRAPH, COMMANDS = _graph()
LIBRARY = {m for m in GRAPH if m.startswith("vitok_fast")} - COMMANDS


def test_commands_are_found_from_the_source():
    assert {f"vitok_fast.{c}" for c in KNOWN_COMMANDS} <= COMMANDS
    assert not COMMANDS & {"vitok_fast", "vitok_fast.model", "vitok_fast.dit", "vitok_fast.cli"}
    # the parser sees imports inside functions too (encode imports the model in main)
    assert "vitok_fast.model" in GRAPH["vitok_fast.encode"]
    assert "vitok_fast.pretrained" in GRAPH["vitok_fast.model"]


def test_library_modules_import_no_command_module():
    bad = {m: sorted(GRAPH[m] & COMMANDS) for m in sorted(LIBRARY) if GRAPH[m] & COMMANDS}
    assert not bad, f"library modules importing command modules (move the shared code into " \
                    f"the library): {bad}"


def test_command_modules_import_no_other_command_module():
    bad = {m: sorted(GRAPH[m] & COMMANDS) for m in sorted(COMMANDS) if GRAPH[m] & COMMANDS}
    assert not bad, f"command modules importing other command modules: {bad}"


def test_library_import_graph_has_no_cycle():
    cycle = _cycle(GRAPH, LIBRARY)
    assert cycle is None, f"import cycle among library modules: {' -> '.join(cycle)}"


def test_kernels_import_only_kernels():
    for module in (m for m in GRAPH if m.startswith("vitok_fast.kernels")):
        outside = sorted(m for m in GRAPH[module] if not m.startswith("vitok_fast.kernels"))
        assert not outside, f"{module} imports {outside}: the kernels import only each other"


def test_train_scripts_import_no_command_module():
    bad = {m: sorted(GRAPH[m] & COMMANDS) for m in GRAPH if m.startswith("train.")
           and GRAPH[m] & COMMANDS}
    assert not bad, f"train/ scripts importing command modules: {bad}"


def test_cycle_finder_reports_a_cycle():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert _cycle(graph, set(graph)) == ["a", "b", "c", "a"]
    assert _cycle({"a": {"b"}, "b": set()}, {"a", "b"}) is None
