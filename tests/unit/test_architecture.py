"""The layout's import principles (README "Layout"), checked on the source with ``ast``:

* every ``rasa_megatron`` import names a module that exists;
* data flows one way: core -> Hugging Face -> training (with ``tasks/``, the default job's data) ->
  convert -> engines -> cli;
* the core imports no framework beyond torch (no transformers, peft, safetensors, deepspeed, megatron);
* ``deepspeed`` is imported only under ``rasa_megatron/deepspeed/`` and ``rasa_megatron/convert/``,
  ``megatron`` only under ``rasa_megatron/megatron/`` and ``rasa_megatron/convert/`` (nor by
  ``examples/``, ``tools/`` or ``bench/``, which go through the package);
* ``training/`` imports neither engine (nor convert or cli), and neither engine imports the other;
* no import cycles between modules; no module over 450 lines.

Imports inside functions count as much as those at the top of a file: a lazy import is still a
dependency. Each check returns its violations; the last test feeds the checks a small tree that
breaks every rule, so none of them can pass by reading nothing.
"""
import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
MAX_LINES = 450

#: tier of each part of the package: a module may import its own tier and lower ones
TIERS = {"core": 0, "hf": 1, "training": 2, "eval": 3, "convert": 3, "deepspeed": 4, "megatron": 4, "cli": 5}
CORE = {"config", "functional", "pool", "layers", "experts", "parallel_layout", "ops"}
HF = {"__init__", "inject", "adapter", "models", "analysis"}
TRAINING = {"training", "tasks"}
FRAMEWORKS = ("deepspeed", "megatron", "transformers", "peft", "safetensors", "datasets", "lm_eval")
FRAMEWORK_HOMES = {"deepspeed": ("deepspeed", "convert"), "megatron": ("megatron", "convert")}
FORBIDDEN = {"training": ("deepspeed", "megatron", "convert", "cli"),
             "eval": ("deepspeed", "megatron", "convert", "cli"), "deepspeed": ("megatron",),
             "megatron": ("deepspeed",)}


def part_of(module: str) -> str:
    """``rasa_megatron.training.loop`` -> ``training``; core and Hugging Face modules by name."""
    parts = module.split(".")
    head = parts[1] if len(parts) > 1 else "__init__"
    if head in CORE:
        return "core"
    if head in HF:
        return "hf"
    if head in TRAINING:
        return "training"
    if head in TIERS:
        return head
    raise AssertionError(f"{module}: not in the layout; put it in a tier of tests/unit/test_architecture.py")


def module_name(path: Path, root: Path) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__" and len(parts) > 1:
        parts = parts[:-1]
    return ".".join(parts)


def imports_of(path: Path, root: Path, modules) -> set[str]:
    """Absolute names ``path`` imports (relative imports resolved; ``from pkg import sub`` also ``pkg.sub``)."""
    this = module_name(path, root)
    package = this if path.name == "__init__.py" else this.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                source = ".".join(base[:len(base) - node.level + 1] + ([node.module] if node.module else []))
            else:
                source = node.module
            found.add(source)
            found.update(f"{source}.{a.name}" for a in node.names if f"{source}.{a.name}" in modules)
    return found


def collect(root: Path) -> tuple[dict, dict]:
    """``(modules, imports)``: every module of ``root/rasa_megatron`` and what each imports, plus the
    scripts of ``examples/``, ``tools/`` and ``bench/`` (keyed by their path)."""
    modules = {module_name(p, root): p for p in sorted((root / "rasa_megatron").rglob("*.py"))}
    imports = {name: imports_of(path, root, modules) for name, path in modules.items()}
    for folder in ("examples", "tools", "bench"):
        for path in sorted((root / folder).rglob("*.py")):
            imports[str(path.relative_to(root))] = imports_of(path, root, modules)
    return modules, imports


def unresolved(modules, imports) -> list[str]:
    return [f"{name} imports {target}, which does not exist" for name, targets in imports.items()
            for target in targets if target.split(".")[0] == "rasa_megatron" and target not in modules]


def against_the_flow(modules, imports) -> list[str]:
    return [f"{name} ({part_of(name)}) imports {target} ({part_of(target)})"
            for name, targets in imports.items() if name in modules
            for target in targets if target in modules and TIERS[part_of(target)] > TIERS[part_of(name)]]


def core_beyond_torch(modules, imports) -> list[str]:
    return [f"{name} imports {target}" for name, targets in imports.items()
            if name in modules and part_of(name) == "core" for target in targets
            if target.split(".")[0] in FRAMEWORKS or (target in modules and part_of(target) != "core")]


def frameworks_out_of_place(modules, imports) -> list[str]:
    return [f"{name} imports {target}" for name, targets in imports.items() for target in targets
            if target.split(".")[0] in FRAMEWORK_HOMES
            and (name not in modules or part_of(name) not in FRAMEWORK_HOMES[target.split(".")[0]])]


def engines_crossed(modules, imports) -> list[str]:
    return [f"{name} imports {target}" for name, targets in imports.items()
            if name in modules and part_of(name) in FORBIDDEN for target in targets
            if target in modules and part_of(target) in FORBIDDEN[part_of(name)]]


def cycles(modules, imports) -> list[str]:
    edges = {name: sorted(t for t in imports[name] if t in modules and t != name) for name in modules}
    state, stack, found = {}, [], []

    def visit(node):
        state[node] = "open"
        stack.append(node)
        for target in edges[node]:
            if state.get(target) == "open":
                found.append(" -> ".join(stack[stack.index(target):] + [target]))
            elif target not in state:
                visit(target)
        stack.pop()
        state[node] = "done"

    for name in edges:
        if name not in state:
            visit(name)
    return found


def too_long(modules) -> list[str]:
    return [f"{name}: {n} lines" for name, path in modules.items()
            if (n := len(path.read_text().splitlines())) > MAX_LINES]


CHECKS = {"imports resolve": unresolved, "data flows one way": against_the_flow, "core imports torch only": core_beyond_torch,
          "frameworks stay in their engine and convert/": frameworks_out_of_place,
          "training imports no engine; engines not each other": engines_crossed, "no import cycles": cycles}


@pytest.fixture(scope="module")
def project():
    return collect(ROOT)


@pytest.mark.parametrize("rule", list(CHECKS))
def test_import_principle(project, rule):
    violations = CHECKS[rule](*project)
    assert not violations, f"{rule}:\n" + "\n".join(violations)


def test_no_module_over_450_lines(project):
    modules, _ = project
    assert not too_long(modules), f"split these by concern: {too_long(modules)}"


def test_every_check_catches_its_violation(tmp_path):
    """A tree that breaks each rule once: every check reports it."""
    package = tmp_path / "rasa_megatron"
    for folder in ("training", "deepspeed", "megatron"):
        (package / folder).mkdir(parents=True)
        (package / folder / "__init__.py").write_text("")
    (package / "__init__.py").write_text("")
    (package / "functional.py").write_text("import torch\n\ndef f():\n    from transformers import AutoModel\n")
    (package / "training" / "loop.py").write_text("from ..deepspeed import engine\n")
    (package / "deepspeed" / "engine.py").write_text("from ..megatron.layers import X\nimport megatron.core\n")
    (package / "megatron" / "layers.py").write_text("from . import pools\nfrom ..gone import x\n")
    (package / "megatron" / "pools.py").write_text("from .layers import X\n" + "x = 1\n" * (MAX_LINES + 1))
    (tmp_path / "tools").mkdir()
    (tmp_path / "tools" / "t.py").write_text("import deepspeed\n")
    modules, imports = collect(tmp_path)
    assert "rasa_megatron.training.loop (training) imports rasa_megatron.deepspeed (deepspeed)" in against_the_flow(
        modules, imports)
    assert core_beyond_torch(modules, imports) == ["rasa_megatron.functional imports transformers"]
    assert sorted(frameworks_out_of_place(modules, imports)) == [
        "rasa_megatron.deepspeed.engine imports megatron.core", "tools/t.py imports deepspeed"]
    assert "rasa_megatron.deepspeed.engine imports rasa_megatron.megatron.layers" in engines_crossed(modules, imports)
    assert cycles(modules, imports) == ["rasa_megatron.megatron.layers -> rasa_megatron.megatron.pools -> "
                                        "rasa_megatron.megatron.layers"]
    assert unresolved(modules, imports) == ["rasa_megatron.megatron.layers imports rasa_megatron.gone, which does "
                                            "not exist"]
    assert too_long(modules) == [f"rasa_megatron.megatron.pools: {MAX_LINES + 2} lines"]
