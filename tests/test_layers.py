"""The import graph of rl_diffusion, pretrain and rewards: no circle, and layers that point one way
(docs/design.md, section 2). Every import counts: at the top of a module, inside a function, under
TYPE_CHECKING, and importlib.import_module("literal")."""

from __future__ import annotations

import ast
import functools
from fnmatch import fnmatch
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("rl_diffusion", "pretrain", "rewards")

# Bottom to top; a module may import its own layer and those below. Patterns are fnmatch's.
LAYERS = (
    (  # data and math
        "rl_diffusion",
        "rl_diffusion.errors",
        "rl_diffusion.schedules",
        "rl_diffusion.diffusion",
        "rl_diffusion.flow",
        "rl_diffusion.processes",
        "rl_diffusion.models",
        "rl_diffusion.models.*",
        "rl_diffusion.metrics",
        "rl_diffusion.image_metrics",
        "rl_diffusion.sampling",
        "rl_diffusion.path_kl",
        "rl_diffusion.lora",
        "rl_diffusion.precision",
        "rl_diffusion.distributed",
        "rl_diffusion.config",
        "rl_diffusion.checkpoint",
        "rl_diffusion.runlock",
        "rl_diffusion.memory",
        "rl_diffusion.figures",
        "rl_diffusion.flops",
        "pretrain",
        "pretrain.datasets",
        "pretrain.images",
        "pretrain.data",
    ),
    ("pretrain.train", "rewards", "rewards.*", "rl_diffusion.targets", "rl_diffusion.env"),  # pretraining, rewards
    ("rl_diffusion.finetune", "rl_diffusion.algos"),  # fine-tuning's config and the algorithm registry
    ("rl_diffusion.run", "rl_diffusion.evaluation", "rl_diffusion.agent_sampling"),  # a run's services
    ("rl_diffusion.algos.*",),  # the algorithms
    ("rl_diffusion.cli", "rl_diffusion.ablate", "rl_diffusion.frontier", "rl_diffusion.diffusers_io"),  # commands
)


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported(path: Path, modules: set[str]) -> set[str]:
    """The project modules that the module at `path` imports anywhere in its source."""
    me = module_name(path)
    package = me if path.name == "__init__.py" else me.rpartition(".")[0]
    names: list[str] = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: from . import x, from ..y import z
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            names += [base, *(f"{base}.{alias.name}" for alias in node.names)]
        elif isinstance(node, ast.Call) and getattr(node.func, "attr", getattr(node.func, "id", "")) == "import_module":
            names += [a.value for a in node.args[:1] if isinstance(a, ast.Constant) and isinstance(a.value, str)]
    found = set()
    for name in names:
        while name and name not in modules:  # a.b.func -> a.b
            name = name.rpartition(".")[0]
        if name and name != me:
            found.add(name)
    return found


@functools.cache
def import_graph() -> dict[str, set[str]]:
    files = [path for package in PACKAGES for path in (ROOT / package).rglob("*.py")]
    modules = {module_name(path) for path in files}
    return {module_name(path): imported(path, modules) for path in files}


def circles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = stack[stack.index(v) :]
            del stack[stack.index(v) :]
            if len(component) > 1:
                found.append(sorted(component))

    for v in graph:
        if v not in index:
            visit(v)
    return found


def layer(module: str) -> int:
    for level, patterns in enumerate(LAYERS):
        if any(fnmatch(module, pattern) for pattern in patterns):
            return level
    raise AssertionError(f"{module} is in no layer of tests/test_layers.py: add it where it belongs")


def test_the_graph_is_read() -> None:
    graph = import_graph()
    assert {"rl_diffusion.diffusion", "rl_diffusion.models"} <= graph["rl_diffusion.checkpoint"]
    assert "rl_diffusion.path_kl" in graph["rl_diffusion.evaluation"]  # an import inside a function


def test_no_module_imports_itself_through_others() -> None:
    graph = import_graph()
    found = circles(graph)
    message = "\n".join(
        f"import circle: {', '.join(c)}\n"
        + "\n".join(f"  {m} imports {', '.join(sorted(graph[m] & set(c)))}" for m in c)
        for c in found
    )
    assert not found, message


def test_no_module_imports_a_higher_layer() -> None:
    upward = [
        f"{module} (layer {layer(module)}) imports {target} (layer {layer(target)})"
        for module, targets in sorted(import_graph().items())
        for target in sorted(targets)
        if layer(target) > layer(module)
    ]
    assert not upward, "\n".join(upward)
