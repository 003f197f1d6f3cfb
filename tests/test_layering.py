"""The import graph of var_train/ and data_prep/ (read with `ast`, nothing imported) keeps its layers.

Layers, an import goes down or sideways, never up (ARCHITECTURE.md):
  0  leaf primitives: errors, fileio, precision, checksums (they import no other layer)
  1  var_train.models, var_train.data
  2  var_train.parallel, checkpoint, config, schedules, loss, logging, preemption, safe_dcp, compatibility
  3  train, tokenizer, evaluation, scaling, generate, dry_run
  4  commands: var_train.cli, var_train.command_line, data_prep (which may use var_train's layers 0-2 and
     the tokenizer trainer, never var_train.cli: the demo and the CLIs alone know both packages)
Every import counts, also one inside a function: a lazy import is still a dependency.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("var_train", "data_prep")

LAYERS = {
    "var_train": 0, "var_train.errors": 0, "var_train.fileio": 0, "var_train.precision": 0,
    "var_train.checksums": 0,
    "var_train.models": 1, "var_train.data": 1,
    "var_train.parallel": 2, "var_train.checkpoint": 2, "var_train.config": 2, "var_train.schedules": 2,
    "var_train.loss": 2, "var_train.logging": 2, "var_train.preemption": 2, "var_train.safe_dcp": 2,
    "var_train.compatibility": 2,
    "var_train.train": 3, "var_train.tokenizer": 3, "var_train.evaluation": 3, "var_train.scaling": 3,
    "var_train.generate": 3, "var_train.dry_run": 3,
    "var_train.cli": 4, "var_train.command_line": 4, "data_prep": 4,
}
SHARDING_MODULES = ("torch.distributed.fsdp", "torch.distributed._composable.fsdp", "torch.nn.parallel",
                    "deepspeed")
SHARDING_NAMES = {"fully_shard", "FSDPModule", "FullyShardedDataParallel", "DistributedDataParallel"}


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _modules() -> dict[str, Path]:
    return {_module_name(p): p for package in PACKAGES for p in sorted((ROOT / package).rglob("*.py"))}


def _resolve(module: str, level: int, current: str, is_package: bool) -> str:
    if level == 0:
        return module
    base = current.split(".") if is_package else current.split(".")[:-1]
    base = base[:len(base) - (level - 1)]
    return ".".join(base + ([module] if module else []))


def import_graph() -> tuple[dict[str, set[str]], dict[str, list[tuple[str, int]]]]:
    """-> (edges between project modules, every imported module name with its line, per module)."""
    modules = _modules()
    edges: dict[str, set[str]] = {name: set() for name in modules}
    raw: dict[str, list[tuple[str, int]]] = {name: [] for name in modules}
    for name, path in modules.items():
        is_package = path.name == "__init__.py"
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            targets: list[str] = []
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = _resolve(node.module or "", node.level, name, is_package)
                # `from package import submodule` depends on the submodule, anything else on `base`
                targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names]
                raw[name] += [(f"{base}:{a.name}", node.lineno) for a in node.names]
            for target in targets:
                raw[name].append((target, node.lineno))
                while target and target not in modules:  # `import a.b.c` of a project module
                    target = target.rpartition(".")[0]
                if target and target != name:
                    edges[name].add(target)
    return edges, raw


def layer_of(module: str) -> int | None:
    parts = module.split(".")
    for end in range(len(parts), 0, -1):
        if ".".join(parts[:end]) in LAYERS:
            return LAYERS[".".join(parts[:end])]
    return None


def find_cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in sorted(edges.get(node, ())):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = []
            while True:
                top = stack.pop()
                on_stack.discard(top)
                component.append(top)
                if top == node:
                    break
            if len(component) > 1:
                components.append(sorted(component))

    for node in sorted(edges):
        if node not in index:
            visit(node)
    return components


@pytest.fixture(scope="module")
def graph():
    return import_graph()


def test_every_module_has_a_layer(graph):
    edges, _ = graph
    assert [m for m in edges if layer_of(m) is None] == [], "place new top-level modules in LAYERS"


def test_no_import_cycles(graph):
    edges, _ = graph
    # a package's __init__ re-exporting its submodules is not a cycle by itself; a submodule that
    # imports its own package's __init__ while the __init__ imports it is, and is reported
    assert find_cycles(edges) == []


def test_imports_never_go_up_a_layer(graph):
    edges, _ = graph
    upward = sorted(f"{a} (layer {layer_of(a)}) imports {b} (layer {layer_of(b)})"
                    for a, targets in edges.items() for b in targets
                    if layer_of(a) is not None and layer_of(b) is not None and layer_of(b) > layer_of(a))
    assert upward == []


def test_data_prep_uses_var_train_but_not_its_commands(graph):
    edges, _ = graph
    wrong = sorted(f"{a} imports {b}" for a, targets in edges.items() if a.split(".")[0] == "data_prep"
                   for b in targets if b.startswith("var_train.")
                   and (b.startswith("var_train.cli") or (layer_of(b) == 3 and not b.startswith("var_train.tokenizer"))))
    assert wrong == []
    # and only the command layer of var_train may know data_prep at all
    knows_data_prep = sorted(a for a, targets in edges.items() if a.startswith("var_train")
                             and any(b.split(".")[0] == "data_prep" for b in targets))
    assert all(layer_of(a) == 4 for a in knows_data_prep), knows_data_prep


def test_only_parallel_knows_sharding(graph):
    _, raw = graph
    outside = sorted(f"{module}:{line} imports {target}" for module, targets in raw.items()
                     if not module.startswith("var_train.parallel")
                     for target, line in targets
                     if target.split(":")[0].startswith(SHARDING_MODULES) or target.split(":")[-1] in SHARDING_NAMES)
    assert outside == []


def test_the_checks_catch_what_they_should():
    """The graph reader and the cycle finder on hand-made cases."""
    assert find_cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert find_cycles({"a": {"b"}, "b": set()}) == []
    assert _resolve("features", 1, "var_train.evaluation.classifier", False) == "var_train.evaluation.features"
    assert _resolve("", 1, "var_train.evaluation", True) == "var_train.evaluation"
    assert _resolve("models", 2, "var_train.evaluation.scheduled", False) == "var_train.models"
    assert layer_of("var_train.models.sampling") == 1 and layer_of("data_prep.extract") == 4
