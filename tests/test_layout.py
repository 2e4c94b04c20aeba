"""The package's architecture, checked: imports point down the layers, no private name crosses a module."""
import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src" / "multitoken"
# Lower layers first; a module may import its own layer and the layers before it.
LAYERS = ["errors", "io", "model", "data", "decoding", "hf", "training", "measure", "cli"]
# Pairs the order alone would allow but the design rules out.
FORBIDDEN = {("decoding", "data")}  # decoding sees models through the protocol only, never the corpus/tokenizer stack


def modules():
    for path in sorted(SRC.rglob("*.py")):
        parts = path.relative_to(SRC.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        yield name, ast.parse(path.read_text(encoding="utf-8"))


def layer(module: str) -> str | None:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 and parts[1] in LAYERS else None


def internal_imports(tree):
    """(imported module, names) for every `from multitoken... import ...`, lazy ones included."""
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("multitoken"):
            yield node.module, [a.name for a in node.names]
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.startswith("multitoken."):
                    yield alias.name, []


ALL = list(modules())


ENTRY_POINTS = {"multitoken", "multitoken.__main__"}  # re-export / run the public API, sit above every layer


def test_every_module_is_in_a_layer():
    outside = [name for name, _ in ALL if layer(name) is None and name not in ENTRY_POINTS]
    assert not outside, f"modules in no layer: {outside}"


@pytest.mark.parametrize("name,tree", ALL, ids=[n for n, _ in ALL])
def test_imports_point_down(name, tree):
    if name in ENTRY_POINTS:
        return
    mine = layer(name)
    for module, _ in internal_imports(tree):
        theirs = layer(module)
        assert theirs is not None, f"{name} imports {module}, which is in no layer"
        assert LAYERS.index(theirs) <= LAYERS.index(mine), f"{name} ({mine}) imports {module} ({theirs}): upward"
        assert (mine, theirs) not in FORBIDDEN, f"{name} imports {module}: {mine} must not import {theirs}"


@pytest.mark.parametrize("name,tree", ALL, ids=[n for n, _ in ALL])
def test_no_private_name_crosses_a_module(name, tree):
    for module, names in internal_imports(tree):
        private = [n for n in names if n.startswith("_")]
        assert not private, f"{name} imports private {private} from {module}"


def test_no_import_cycle_between_modules():
    graph = {name: {m for m, _ in internal_imports(tree)} for name, tree in ALL}
    state: dict[str, int] = {}

    def visit(node, path):
        state[node] = 1
        for nxt in graph.get(node, ()):
            if nxt not in graph or nxt == "multitoken" or nxt.rsplit(".", 1)[0] == node:
                continue  # a package importing its own submodules (its exports) is not a cycle
            if state.get(nxt) == 1:
                raise AssertionError("import cycle: " + " -> ".join(path + [nxt]))
            if not state.get(nxt):
                visit(nxt, path + [nxt])
        state[node] = 2

    for name in graph:
        if not state.get(name) and name != "multitoken":
            visit(name, [name])
