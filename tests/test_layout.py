"""The package's layout as a checked rule (docs/design.md): which part may import which, no
import cycle, no JAX where it must not start, and each config name list equal to its registry.

Read from the source with `ast`, so it holds for imports inside functions as well."""

import ast
import pathlib

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1] / "minids_jax"
JAX = ("jax", "flax", "optax", "orbax")
# The commands users type (`python -m minids_jax.X`) may import any part, and late.
COMMANDS = {"inspect", "prepare", "plot", "config.__main__", "hf.__main__"}
# part -> the parts it may import (besides itself). A part is a top-level module or a package.
ALLOWED = {
    "errors": set(),
    "config": {"errors"},
    "workdir": {"errors"},
    "cli": {"config", "errors", "workdir"},
    "startup": {"config", "errors", "workdir"},
    "kernels": {"config"},
    "model": {"config", "kernels"},
    "data": {"config", "errors", "workdir"},
    "sharding": {"config"},
    "checkpoint": {"config", "errors", "workdir", "sharding", "kernels", "model"},
    "generation": {"config", "kernels", "model", "data", "sharding"},
    "training": {"config", "errors", "workdir", "kernels", "model", "data", "sharding",
                 "checkpoint", "plot"},
    "hf": {"config", "errors", "workdir", "sharding", "kernels", "model", "checkpoint", "data"},
}
# Imported before startup.py has chosen the GPUs: never JAX, or (cli, startup) only late.
NO_JAX = {"config", "data", "workdir", "errors"}
LATE_JAX = {"cli", "startup"}


def modules() -> dict[str, pathlib.Path]:
    """{'model.moe': path, 'config': path of config/__init__.py, ...}"""
    found = {}
    for path in ROOT.rglob("*.py"):
        name = ".".join(path.relative_to(ROOT).with_suffix("").parts)
        found[name.removesuffix(".__init__")] = path
    found.pop("__init__")  # the lazy public API: names resolved on first use
    return found


def imports(name: str, path: pathlib.Path) -> tuple[set[str], list[tuple[str, bool]]]:
    """(the project modules `name` imports, [(a third-party root, at module level)])."""
    package = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
    tree = ast.parse(path.read_text())
    module_level = {id(node) for node in tree.body}
    project, outside, known = set(), [], modules()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(["minids_jax"] + package[:len(package) - node.level + 1]
                                + ([base] if base else []))
            # `from minids_jax.data import chat` names the module data.chat
            targets = [f"{base}.{alias.name}"
                       if f"{base}.{alias.name}".removeprefix("minids_jax.") in known
                       else base for alias in node.names]
        else:
            continue
        for target in targets:
            if target.split(".")[0] == "minids_jax":
                project.add(target.removeprefix("minids_jax").lstrip("."))
            else:
                outside.append((target.split(".")[0], id(node) in module_level))
    resolved = set()
    for target in project:  # `from minids_jax.model import lora` names the module model.lora
        while target and target not in known:
            target = target.rpartition(".")[0]
        if target and target != name:
            resolved.add(target)
    return resolved, outside


def part(module: str) -> str:
    return module.split(".")[0]


GRAPH = {name: imports(name, path) for name, path in modules().items()}


def test_every_part_is_in_the_rule():
    assert {part(name) for name in GRAPH} - COMMANDS <= set(ALLOWED) | {"inspect", "prepare",
                                                                        "plot"}


@pytest.mark.parametrize("name", sorted(n for n in GRAPH if n not in COMMANDS))
def test_imports_follow_the_rule(name):
    allowed = ALLOWED[part(name)] | {part(name)}
    wrong = sorted(target for target in GRAPH[name][0] if part(target) not in allowed)
    assert not wrong, f"{name} ({part(name)}/) may not import {wrong}"


def test_no_module_imports_the_project_late_except_commands():
    """JAX starts late only in commands; elsewhere an import inside a function hides an edge."""
    late = []
    for name, path in modules().items():
        if name in COMMANDS:
            continue
        tree = ast.parse(path.read_text())
        top = {id(node) for node in tree.body}
        late += [f"{name}:{node.lineno}" for node in ast.walk(tree)
                 if isinstance(node, ast.ImportFrom) and id(node) not in top
                 and (node.level or (node.module or "").startswith("minids_jax"))]
    assert not late


def test_no_import_cycle():
    state, cycles = {}, []

    def visit(node, stack):
        state[node] = "open"
        for target in GRAPH[node][0]:
            if state.get(target) == "open":
                cycles.append(stack[stack.index(target):] + [target])
            elif target not in state:
                visit(target, stack + [target])
        state[node] = "done"

    for node in GRAPH:
        if node not in state:
            visit(node, [node])
    assert not cycles, " ; ".join(" -> ".join(cycle) for cycle in cycles)


@pytest.mark.parametrize("name", sorted(n for n in GRAPH if part(n) in NO_JAX | LATE_JAX))
def test_no_jax_before_the_devices_are_chosen(name):
    """config/, data/, workdir and errors never import JAX, cli and startup only inside the
    functions that run after the GPU choice: the commands import them before it."""
    project, outside = GRAPH[name]
    at_all = part(name) in NO_JAX
    assert not [root for root, top in outside if root in JAX and (top or at_all)]
    assert not [target for target in project if part(target) not in NO_JAX | LATE_JAX]


def test_config_name_lists_equal_their_registries():
    from minids_jax import kernels
    from minids_jax.config import model as model_config
    from minids_jax.config import run as run_config
    from minids_jax.model.attention import KERNELS
    from minids_jax.model.block import ATTENTION_CLASSES
    from minids_jax.model.dispatch import DISPATCHES
    from minids_jax.model.scan import REMAT_POLICIES

    assert set(model_config.ATTENTION_KINDS) == set(ATTENTION_CLASSES)
    assert set(run_config.MOE_DISPATCHES) - {"dropless"} == set(DISPATCHES)
    assert set(run_config.REMAT_POLICIES) - {"none"} == set(REMAT_POLICIES)
    assert set(run_config.ATTENTION_KERNELS) - {"auto"} == set(KERNELS)
    assert kernels.DROPLESS_DISPATCH.keys() <= {"cpu", "gpu", "tpu"}
