"""The package's shape: imports run one way (read from the source, nothing executed), and the
`cfs` entry point stays light."""

import ast
import subprocess
import sys

import pytest

from .conftest import REPO

PACKAGE = REPO / "cfs_lightning"
LAYERS = [
    {"cfs_lightning", "tokens", "io", "commands", "loading", "streams"},  # leaves: import nothing of ours
    {"chat", "evaluation", "checkpoints", "scores"},
    {"tasks"},
    {"sampling", "shards"},  # the artifacts every stage shares
    {"replay", "rewrite", "data", "training"},  # the stages: none imports another
    {"callbacks"},
    {"experiments"},  # orchestration: the only layer that imports every other
    {"cli"},
]
"""Top-level units (a module or a sub-package) from the bottom up; a unit imports only units of
lower layers and its own modules."""


def _module_name(path) -> str:
    parts = path.relative_to(REPO).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports() -> dict[str, set[str]]:
    """module -> the modules of ours it imports anywhere in its file (function-local ones too)."""
    graph = {}
    for path in PACKAGE.rglob("*.py"):
        name = _module_name(path)
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        found = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
                found.add(target)
                for alias in node.names:  # `from . import x` may name a submodule
                    sub = REPO / target.replace(".", "/") / alias.name
                    if sub.with_suffix(".py").is_file() or sub.is_dir():
                        found.add(f"{target}.{alias.name}")
            elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("cfs_lightning"):
                found.add(node.module)
            elif isinstance(node, ast.Import):
                found.update(a.name for a in node.names if a.name.startswith("cfs_lightning"))
        graph[name] = found - {name}
    return graph


def _unit(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else parts[0]


def _layer(unit: str) -> int:
    for i, layer in enumerate(LAYERS):
        if unit in layer:
            return i
    raise AssertionError(f"{unit!r} is in no layer of tests/test_layout.py: place it")


def test_imports_run_one_way():
    backward = []
    for module, targets in _imports().items():
        here = _unit(module)
        for target in targets:
            there = _unit(target)
            if there != here and _layer(there) >= _layer(here):
                backward.append(f"{module} imports {target} (layer {_layer(there)} >= {_layer(here)})")
    assert not backward, "\n".join(sorted(backward))


def test_no_import_cycle():
    graph = _imports()
    state: dict[str, int] = {}

    def visit(node, path):
        state[node] = 1
        for nxt in graph.get(node, ()):
            if state.get(nxt) == 1:
                pytest.fail("import cycle: " + " -> ".join(path[path.index(nxt):] + [nxt]))
            if nxt not in state:
                visit(nxt, path + [nxt])
        state[node] = 2

    for module in sorted(graph):
        if module not in state:
            visit(module, [module])


def test_every_unit_has_a_layer():
    units = {_unit(m) for m in _imports()}
    assert units <= set().union(*LAYERS), units - set().union(*LAYERS)


def _loaded_after(code: str) -> set[str]:
    out = subprocess.run([sys.executable, "-c", f"import sys\n{code}\nprint(' '.join(sys.modules))"],
                         cwd=REPO, capture_output=True, text=True, check=True).stdout.split()
    return {m.split(".")[0] for m in out}


def test_cfs_help_imports_no_torch():
    loaded = _loaded_after("from cfs_lightning.cli import main\nmain(['--help'])")
    assert not loaded & {"torch", "lightning", "transformers", "datasets", "lm_eval", "jsonargparse"}


@pytest.mark.parametrize("command, absent", [("generate", {"lm_eval", "lightning"}),
                                             ("report", {"torch", "lightning", "lm_eval"}),
                                             ("init", {"lightning", "lm_eval"})])
def test_a_command_imports_only_what_it_needs(command, absent):
    loaded = _loaded_after(f"from cfs_lightning.commands import function\nfunction({command!r})")
    assert not loaded & absent


MAX_FILE_LINES, MAX_FUNCTION_LINES = 300, 60


def test_files_and_functions_stay_small():
    """A file is one concept and a function one step: no module over 300 lines, no function
    (its docstring included) over 60."""
    too_long = []
    for path in sorted(PACKAGE.rglob("*.py")):
        text = path.read_text()
        name = path.relative_to(REPO)
        if text.count("\n") > MAX_FILE_LINES:
            too_long.append(f"{name}: {text.count(chr(10))} lines")
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                lines = node.end_lineno - node.lineno + 1
                if lines > MAX_FUNCTION_LINES:
                    too_long.append(f"{name}:{node.lineno} {node.name}: {lines} lines")
    assert not too_long, "\n".join(too_long)


def test_the_layout_doc_shows_the_layers_this_test_enforces():
    """docs/layout.md's table: a row whose layer cell starts with a number opens a layer; the
    units of each layer are the ones `LAYERS` holds, in the same order of layers."""
    import re

    layers: list[set[str]] = []
    for line in (REPO / "docs/layout.md").read_text().splitlines():
        cells = [c.strip() for c in line.strip("|").split("|")]
        if len(cells) != 3 or not line.startswith("| ") or cells[0] == "layer" or cells[0].startswith("---"):
            continue
        if re.match(r"\d", cells[0]):
            layers.append(set())
        name = cells[1].strip("`").removesuffix(".py").removesuffix("/")
        layers[-1].add("cfs_lightning" if name == "__init__" else name)
    assert layers == LAYERS
