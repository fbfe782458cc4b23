"""Dependencies point one way: the runtime never imports the operator (the rollout loop
and decision live in aurora.runtime.rollout; the operator's handlers call them)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

pytestmark = pytest.mark.unit

ROOT = Path(__file__).resolve().parents[2]


def imported_modules(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            names.add(node.module)
            names.update(f"{node.module}.{alias.name}" for alias in node.names)
    return names


def test_no_runtime_module_imports_the_operator() -> None:
    offenders = {
        str(path.relative_to(ROOT)): sorted(
            name for name in imported_modules(path) if name.startswith("aurora.operator")
        )
        for path in sorted((ROOT / "runtime").rglob("*.py"))
    }
    assert {path: names for path, names in offenders.items() if names} == {}


def test_the_rollout_decision_is_pure() -> None:
    # The decision and the policy: no Redis, no Kubernetes, no torch.
    for name in ("decision.py", "policy.py"):
        imported = imported_modules(ROOT / "runtime" / "rollout" / name)
        heavy = {m for m in imported if m.split(".")[0] in ("redis", "kopf", "kubernetes", "torch")}
        assert heavy == set(), name


def test_the_checker_sees_an_operator_import(tmp_path: Path) -> None:
    module = tmp_path / "m.py"
    module.write_text("from aurora.operator import planning\nimport aurora.operator.spec\n")
    assert {"aurora.operator", "aurora.operator.planning", "aurora.operator.spec"} <= (
        imported_modules(module)
    )
