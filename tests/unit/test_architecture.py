"""The rooms and the one-way dependencies between them (docs/architecture.md), checked on
the imports written in every module (ast; imports inside functions count too):

    aurora/commands -> entry points (runtime/local, operator/, benchmarks, chaos)
                    -> services (runtime/server, runtime/trainer, runtime/sglang, rollout loop)
                    -> core (engine, draft, llama, protocol, rollout decision, checkpoint, ...)

The runtime never imports the operator; the operator never imports torch, not even through
the runtime modules it imports. Names shared between processes are spelled once, next to the
protocol: the built-in revision names (protocol.Builtin) and the Redis keys (protocol.Keys).
"""

from __future__ import annotations

import ast
import functools
from collections.abc import Collection
from pathlib import Path

import pytest

pytestmark = pytest.mark.unit

ROOT = Path(__file__).resolve().parents[2]
FOLDERS = {"aurora": "aurora", "operator": "aurora.operator", "runtime": "aurora.runtime"}
TORCH = ("torch", "transformers", "safetensors.torch", "accelerate")

COMMANDS = ("aurora.cli", "aurora.__main__", "aurora.commands")
ENTRY_POINTS = (
    "aurora.runtime.local",
    "aurora.operator",
    "aurora.runtime.bench",
    "aurora.runtime.bench_batch",
    "aurora.runtime.bench_adapt",
    "aurora.runtime.bench_gate",
    "aurora.runtime.bench_unseen",
    "aurora.runtime.chaos",
)
SERVICES = (
    "aurora.runtime.server",
    "aurora.runtime.trainer",
    "aurora.runtime.sglang",
    "aurora.runtime.rollout.loop",
)
LAYERS = {"commands": 3, "entry point": 2, "service": 1, "core": 0}


def _within(module: str, prefixes: tuple[str, ...]) -> bool:
    return any(module == p or module.startswith(p + ".") for p in prefixes)


def layer(module: str) -> str:
    if _within(module, COMMANDS):
        return "commands"
    if _within(module, ENTRY_POINTS):
        return "entry point"
    if _within(module, SERVICES):
        return "service"
    return "core"


def find_modules(root: Path) -> dict[str, Path]:
    """Every module under `root`'s production folders, by the name Python imports it as."""
    found = {}
    for folder, package in FOLDERS.items():
        for path in sorted((root / folder).rglob("*.py")):
            parts = path.relative_to(root / folder).with_suffix("").parts
            if parts[-1] == "__init__":
                parts = parts[:-1]
            found[".".join((package, *parts))] = path
    return found


def imports_in(path: Path, module: str, known: Collection[str]) -> frozenset[str]:
    """What `module` (at `path`) imports, anywhere in it: absolute names (`from a import
    b` counts `a.b` when that is a module), plus the packages above each, which Python
    imports first. Aurora names that are not `known` modules are left out."""
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            names.add(base)
            names.update(f"{base}.{alias.name}" for alias in node.names)
    with_parents = set()
    for name in names:
        parts = name.split(".")
        with_parents.update(".".join(parts[:i]) for i in range(1, len(parts) + 1))
    return frozenset(n for n in with_parents if n in known or not n.startswith("aurora"))


@functools.cache
def modules() -> dict[str, Path]:
    return find_modules(ROOT)


@functools.cache
def imports(module: str) -> frozenset[str]:
    return imports_in(modules()[module], module, modules())


@functools.cache
def reach(module: str) -> frozenset[str]:
    """Every name `module` imports, directly or through the aurora modules it imports."""
    seen: set[str] = set()
    todo = [module]
    while todo:
        for name in imports(todo.pop()):
            if name not in seen:
                seen.add(name)
                if name in modules():
                    todo.append(name)
    return frozenset(seen)


def test_the_checker_reads_every_kind_of_import(tmp_path: Path) -> None:
    # Given a module with plain, from, relative and function-local imports
    for folder in (
        "aurora",
        "operator",
        "operator/sub",
        "runtime",
        "runtime/local",
        "runtime/rollout",
    ):
        (tmp_path / folder).mkdir(parents=True)
        (tmp_path / folder / "__init__.py").write_text("")
    for name in ("operator/spec.py", "operator/sub/handlers.py", "runtime/rollout/loop.py"):
        (tmp_path / name).write_text("")
    run = tmp_path / "runtime" / "local" / "run.py"
    run.write_text(
        "import aurora.operator.spec\n"
        "from aurora.operator.sub import handlers\n"
        "from . import config\n"
        "def later():\n    from ..rollout import loop\n"
    )
    known = find_modules(tmp_path)
    # When its imports are read, Then each is seen, with the packages Python imports first
    assert imports_in(run, "aurora.runtime.local.run", known) == {
        "aurora",
        "aurora.operator",
        "aurora.operator.spec",
        "aurora.operator.sub",
        "aurora.operator.sub.handlers",
        "aurora.runtime",
        "aurora.runtime.local",
        "aurora.runtime.rollout",
        "aurora.runtime.rollout.loop",
    }  # (config.py does not exist there: not a module, so not counted)


def test_every_production_module_is_found() -> None:
    names = modules()
    assert {"aurora.runtime.protocol", "aurora.runtime.engine", "aurora.operator.handlers"} <= set(
        names
    )
    assert layer("aurora.runtime.engine") == "core" and layer("aurora.operator.kube") == (
        "entry point"
    )


def test_the_runtime_never_imports_the_operator() -> None:
    offenders = {
        module: sorted(n for n in imports(module) if _within(n, ("aurora.operator",)))
        for module in modules()
        if _within(module, ("aurora.runtime",))
    }
    assert {m: names for m, names in offenders.items() if names} == {}


def test_the_rollout_decision_and_policy_are_pure() -> None:
    # No Redis, no Kubernetes, no torch; no Kubernetes or torch even through what they
    # import (the protocol's records they take do import redis).
    for module in ("aurora.runtime.rollout.decision", "aurora.runtime.rollout.policy"):
        direct = {n for n in imports(module) if _within(n, ("redis", "kopf", "kubernetes"))}
        assert direct == set(), module
        heavy = {n for n in reach(module) if _within(n, ("kopf", "kubernetes", *TORCH))}
        assert heavy == set(), module


def test_the_operator_never_imports_torch_even_through_the_runtime() -> None:
    offenders = {
        module: sorted(n for n in reach(module) if _within(n, TORCH))
        for module in modules()
        if _within(module, ("aurora.operator",))
    }
    assert {m: names for m, names in offenders.items() if names} == {}


def test_dependencies_point_one_way_from_commands_to_the_core() -> None:
    upward = sorted(
        f"{module} ({layer(module)}) imports {name} ({layer(name)})"
        for module in modules()
        for name in imports(module)
        if name in modules() and LAYERS[layer(name)] > LAYERS[layer(module)]
    )
    assert upward == []


# ------------------------------------------------------------------ shared names

BUILTIN_NAMES = {"none", "ngram", "scratch"}  # protocol.Builtin's values
# Modules the `trainer` helper of issue 14 is converting.
IN_PROGRESS = ("aurora.runtime.trainer", "aurora.commands.train")


def builtin_literals(modules_: list[str]) -> list[str]:
    """`module:line "name"` for each string literal that spells a built-in revision."""
    found = []
    for module in modules_:
        path = modules()[module]
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Constant) and node.value in BUILTIN_NAMES:
                found.append(f'{module}:{node.lineno} "{node.value}"')
    return found


def test_builtin_revision_names_are_spelled_only_in_protocol_builtin() -> None:
    others = [
        m for m in modules() if m != "aurora.runtime.protocol" and not _within(m, IN_PROGRESS)
    ]
    assert builtin_literals(others) == []
    # and the check sees a literal where there is one
    assert len(builtin_literals(["aurora.runtime.protocol"])) == len(BUILTIN_NAMES)


def test_builtin_revision_names_are_spelled_only_in_protocol_builtin_everywhere() -> None:
    others = [m for m in modules() if m != "aurora.runtime.protocol"]
    assert builtin_literals(others) == []


KEY_PARTS = {":traces", ":traces:dead", ":stats", ":candidates", ":desired", ":loaded"}
KEY_PARTS |= {":rollout", ":trainer", "aurora:"}


def key_spellings(modules_: list[str]) -> dict[str, str]:
    """`module:line` -> the key part, for each f-string that builds a Redis key by hand
    (a part such as `aurora:` or `:traces` next to a substituted value)."""
    found = {}
    for module in modules_:
        path = modules()[module]
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.JoinedStr):
                for value in node.values:
                    if isinstance(value, ast.Constant) and value.value in KEY_PARTS:
                        found[f"{module}:{node.lineno}"] = value.value
    return found


def test_redis_keys_are_spelled_only_in_protocol_keys() -> None:
    assert key_spellings([m for m in modules() if m != "aurora.runtime.protocol"]) == {}
    # and the check sees every key the protocol spells
    assert set(key_spellings(["aurora.runtime.protocol"]).values()) == KEY_PARTS
