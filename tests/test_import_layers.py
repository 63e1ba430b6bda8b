"""The package's layers: a module of stem_megatron imports only from its own layer or the
layers below it, no group of modules imports each other in a circle, and nothing imports the
scripts around the package (tools/, benchmarks/, tests/). Every import counts, function-level
ones too: an import moved into a function to dodge a cycle is still the cycle. Imports under
`if TYPE_CHECKING:` do not count; they never run.

The layers, lowest first:

    leaf helpers   atomic_file, repo_paths, writable, timing, modes, sharding
    config         config (the dataclasses), pipeline_split (the layer split the checks use),
                   config_validation, config_loader (YAML and overrides, then the checks)
    data           data/         tokenizer, indexed datasets, sampler
    stem tables    stem/         tables, lookups, storage tiers, row optimizer
    model          model/        the transformer and its STEM FFN
    parallel       parallel/     the layout (dims.py), process groups, DDP, comm meter
    planning       planning/     dry run, memory and parameter/FLOP accounting (no processes)
    checkpoint     checkpoint/   on-disk format, DCP save/load, offline reads
    training       training/     trainer, optimizers, state, resharding through it
    applications   hf/, generation, editing/
    entry points   cli/, train
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = "stem_megatron"
LAYERS = (
    ("leaf helpers", ("atomic_file", "repo_paths", "writable", "timing", "modes", "sharding")),
    ("config", ("config", "pipeline_split", "config_validation", "config_loader")),
    ("data", ("data",)),
    ("stem tables", ("stem",)),
    ("model", ("model",)),
    ("parallel", ("parallel",)),
    ("planning", ("planning",)),
    ("checkpoint", ("checkpoint",)),
    ("training", ("training",)),
    ("applications", ("hf", "generation", "editing")),
    ("entry points", ("cli", "train")),
)
OUTSIDE = ("tools", "benchmarks", "tests")  # scripts that use the package, never the reverse


def module_names(root: Path) -> dict[str, Path]:
    """{dotted name: file} of every module of the package under `root`."""
    names = {}
    for path in sorted((root / PACKAGE).rglob("*.py")):
        parts = path.relative_to(root).with_suffix("").parts
        if parts[-1] == "__init__":
            parts = parts[:-1]
        names[".".join(parts)] = path
    return names


def layer_of(module: str) -> int | None:
    """The index in LAYERS of `module` (None: the package root, or a module of no layer)."""
    for index, (_, prefixes) in enumerate(LAYERS):
        for prefix in prefixes:
            name = f"{PACKAGE}.{prefix}"
            if module == name or module.startswith(name + "."):
                return index
    return None


def _type_checking_only(node: ast.AST) -> bool:
    test = node.test if isinstance(node, ast.If) else None
    return isinstance(test, ast.Name | ast.Attribute) and ast.unparse(test).endswith(
        "TYPE_CHECKING"
    )


def imports_of(path: Path, module: str, known: dict[str, Path]) -> list[tuple[str, int]]:
    """(imported module, line) for every import in the file that runs, at any depth."""
    found = []
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]

    def visit(node: ast.AST) -> None:
        if _type_checking_only(node):
            for child in node.orelse:
                visit(child)
            return
        if isinstance(node, ast.Import):
            found.extend((alias.name, node.lineno) for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            for alias in node.names:  # `from pkg import mod` imports the module pkg.mod
                sub = f"{base}.{alias.name}"
                found.append((sub if sub in known else base, node.lineno))
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(ast.parse(path.read_text(), filename=str(path)))
    return found


def problems(root: Path) -> list[str]:
    """Each upward import, import of a script outside the package, module of no layer and
    import cycle of the package under `root`, as one line."""
    known = module_names(root)
    graph: dict[str, set[str]] = {name: set() for name in known}
    found = []
    for module, path in known.items():
        where = path.relative_to(root)
        layer = layer_of(module)
        if layer is None and module != PACKAGE:
            found.append(f"{where}: {module} is in no layer; add it to LAYERS")
            continue
        for target, line in imports_of(path, module, known):
            top = target.split(".")[0]
            if top in OUTSIDE:
                found.append(f"{where}:{line}: imports {target}, a script outside the package")
            if top != PACKAGE or target not in known:
                continue
            graph[module].add(target)
            other = layer_of(target)
            if layer is not None and other is not None and other > layer:
                found.append(
                    f"{where}:{line}: {module} ({LAYERS[layer][0]}) imports {target} "
                    f"({LAYERS[other][0]}), a higher layer"
                )
    found.extend(f"import cycle: {' -> '.join(cycle)}" for cycle in _cycles(graph))
    return found


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """One cycle through each strongly connected group of modules (Tarjan's algorithm)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    groups: list[list[str]] = []

    def connect(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        for nxt in sorted(graph[node]):
            if nxt not in index:
                connect(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            group = []
            while True:
                member = stack.pop()
                group.append(member)
                if member == node:
                    break
            if len(group) > 1 or node in graph[node]:
                groups.append(group)

    for node in sorted(graph):
        if node not in index:
            connect(node)
    return [_cycle_within(graph, set(group)) for group in groups]


def _cycle_within(graph: dict[str, set[str]], group: set[str]) -> list[str]:
    """A path from the group's first module back to itself through the group."""
    start = min(group)
    paths = {start: [start]}
    frontier = [start]
    while frontier:
        node = frontier.pop(0)
        for nxt in sorted(graph[node] & group):
            if nxt == start:
                return [*paths[node], start]
            if nxt not in paths:
                paths[nxt] = [*paths[node], nxt]
                frontier.append(nxt)
    raise AssertionError(f"no cycle through {start}")


def test_modules_import_only_their_layer_and_below_without_cycles():
    root = Path(__file__).resolve().parents[1]
    assert problems(root) == []


def _write(root: Path, module: str, source: str) -> None:
    path = root / (module.replace(".", "/") + ".py")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(source)


def test_the_check_reports_an_upward_import_a_cycle_and_a_script(tmp_path):
    for package in ("stem_megatron", "stem_megatron.training", "stem_megatron.model"):
        _write(tmp_path, f"{package}.__init__", "")
    _write(tmp_path, "stem_megatron.config", "def load():\n    import stem_megatron.model.a\n")
    _write(tmp_path, "stem_megatron.model.a", "from . import b\n")
    _write(tmp_path, "stem_megatron.model.b", "from stem_megatron.model.a import x\n")
    _write(
        tmp_path,
        "stem_megatron.training.c",
        "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    import stem_megatron.cli\n"
        "from tools import helper\n",
    )
    _write(tmp_path, "stem_megatron.extra", "")
    assert problems(tmp_path) == [
        "stem_megatron/config.py:2: stem_megatron.config (config) imports "
        "stem_megatron.model.a (model), a higher layer",
        "stem_megatron/extra.py: stem_megatron.extra is in no layer; add it to LAYERS",
        "stem_megatron/training/c.py:4: imports tools, a script outside the package",
        "import cycle: stem_megatron.model.a -> stem_megatron.model.b -> stem_megatron.model.a",
    ]
