"""The dependency rule, checked on the source: `reconcile -> desired/scaling/api`, never
back; no import cycle; the operator never imports the dev-only local cluster package, the
trainer, torch or pytest (CONTRIBUTING.md, "Dependencies")."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.unit

PACKAGE = Path(__file__).resolve().parents[2] / "operator" / "lepton_operator"

# What each layer of lepton_operator may import of lepton_operator.
ALLOWED = {
    "api": {"api"},
    "desired": {"api", "desired"},
    "scaling": {"api", "scaling"},
    "metrics": {"api"},
    "reconcile": {"api", "desired", "scaling", "reconcile", "metrics"},
    "cli": set(),  # subcommands are loaded by name (importlib)
}
PURE_LAYERS = ("api", "desired", "scaling")
NEVER_IN_PURE = ("kopf", "kubernetes", "urllib3", "aiohttp")
NEVER_IN_OPERATOR = ("lepton_localcluster", "lepton_trainer", "torch", "pytest")


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports_of(path: Path) -> set[str]:
    """Every module a file imports, at any depth of the file (lazy imports count too)."""
    name = module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module
            found.add(target)
            # `from pkg import module` imports pkg.module when it is one.
            for alias in node.names:
                candidate = f"{target}.{alias.name}"
                if (PACKAGE.parent / candidate.replace(".", "/")).with_suffix(".py").exists() or (
                    PACKAGE.parent / candidate.replace(".", "/")
                ).is_dir():
                    found.add(candidate)
    return found


def graph() -> dict[str, set[str]]:
    return {module_name(p): imports_of(p) for p in sorted(PACKAGE.rglob("*.py"))}


def layer(module: str) -> str:
    return module.split(".")[1] if "." in module else ""


def test_layers_import_only_what_the_dependency_rule_allows():
    wrong = []
    for module, targets in graph().items():
        if module == "lepton_operator":
            continue
        allowed = ALLOWED[layer(module)]
        for target in targets:
            if target.startswith("lepton_operator.") and layer(target) not in allowed:
                wrong.append(f"{module} imports {target}")
            top = target.split(".")[0]
            if layer(module) in PURE_LAYERS and top in NEVER_IN_PURE:
                wrong.append(f"{module} (pure) imports {target}")
            if top in NEVER_IN_OPERATOR:
                wrong.append(f"{module} imports {target} (not part of the operator)")
    assert wrong == []


def test_no_import_cycles():
    full = graph()
    g = {module: {t for t in targets if t in full} for module, targets in full.items()}
    cycles = []
    state: dict[str, int] = {}  # 1: on the stack, 2: done

    def visit(node: str, stack: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(g[node]):
            if nxt.startswith(node + ".") or node.startswith(nxt + "."):
                continue  # a package and its own modules
            if state.get(nxt) == 1:
                cycles.append(" -> ".join(stack[stack.index(nxt) :] + [nxt]))
            elif nxt not in state:
                visit(nxt, stack + [nxt])
        state[node] = 2

    for module in sorted(g):
        if module not in state:
            visit(module, [module])
    assert cycles == []


def test_the_checker_sees_a_backward_import(tmp_path):
    # The walk must really resolve imports, or the two tests above prove nothing.
    assert "lepton_operator.reconcile.plan" in imports_of(PACKAGE / "reconcile" / "loop.py")
    assert "lepton_operator.api.models" in imports_of(PACKAGE / "desired" / "names.py")  # relative import
    assert layer("lepton_operator.reconcile.plan") not in ALLOWED["desired"]


def test_the_operator_cli_loads_without_dev_tools_trainer_or_torch():
    # What the operator image runs: `lepton-operator run` and its sibling subcommands.
    code = (
        "import sys, lepton_operator.cli as cli; cli.build_parser(); "
        "import lepton_operator.reconcile.handlers; "
        f"bad = sorted(m for m in sys.modules if m.split('.')[0] in {NEVER_IN_OPERATOR!r}); "
        "print(bad); sys.exit(1 if bad else 0)"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr


def test_test_modules_have_unique_basenames():
    # pytest's default import mode puts each test directory on sys.path: two test modules
    # with one basename in different directories cannot be collected in one session.
    tests = Path(__file__).resolve().parents[1]
    names = [p.name for p in tests.rglob("test_*.py")]
    assert sorted({n for n in names if names.count(n) > 1}) == []
