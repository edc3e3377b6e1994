"""The package's layers, read from the code: imports only go down, and no module is long.

    core (0) <- algo, tasks (1) <- engines (2) <- eval (3) <- train (4) <- study, distill (5) <- cli (6)

A module may import from its own package and from packages of lower layers, never from a
higher layer or from a sibling package of the same layer. Every import counts: at the top
of a module, inside a function, or under `if TYPE_CHECKING`. docs/ARCHITECTURE.md draws it.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src" / "meml"
LAYERS = {"core": 0, "algo": 1, "tasks": 1, "engines": 2, "eval": 3, "train": 4, "study": 5, "distill": 5, "cli": 6}
MAX_LINES = 400


def package_of(module: str) -> str | None:
    """'meml.train.loop' -> 'train'; 'meml' itself -> None."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 and parts[0] == "meml" else None


def module_name(path: Path, src: Path = SRC) -> str:
    rel = path.relative_to(src.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def imports_of(path: Path, src: Path = SRC) -> list[tuple[int, str]]:
    """(line, imported module) for every import of a meml module in the file."""
    tree = ast.parse(path.read_text(), filename=str(path))
    found = []
    this = module_name(path, src)
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(node.lineno, a.name) for a in node.names if a.name.split(".")[0] == "meml"]
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative import: resolve against this module's package
                base = this.split(".")[: len(this.split(".")) - node.level + (1 if path.name == "__init__.py" else 0)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if target.split(".")[0] != "meml":
                continue
            if target != "meml":
                found.append((node.lineno, target))
            # `from meml.core import a` may name a submodule: meml.core.a (kept where it is one)
            found += [(node.lineno, f"{target}.{a.name}") for a in node.names]
    return found


def upward_imports(src: Path = SRC) -> list[str]:
    problems = []
    for path in sorted(src.rglob("*.py")):
        here = package_of(module_name(path, src))
        seen = set()
        for line, target in imports_of(path, src):
            there = package_of(target)
            if there is None or there == here or (line, there) in seen:
                continue
            seen.add((line, there))
            target = ".".join(target.split(".")[:3]) if here is not None else target
            if here is None:
                problems.append(f"{path.relative_to(src.parent)}:{line}: meml/__init__ imports {target}")
                continue
            if here not in LAYERS or there not in LAYERS:
                problems.append(f"{path.relative_to(src.parent)}:{line}: {here} or {there} is not a layer of LAYERS")
            elif LAYERS[there] >= LAYERS[here]:
                kind = "a sibling of the same layer" if LAYERS[there] == LAYERS[here] else "a higher layer"
                problems.append(
                    f"{path.relative_to(src.parent)}:{line}: {here} (layer {LAYERS[here]}) imports {target}, {kind} "
                    f"({there}, layer {LAYERS[there]})"
                )
    return problems


def import_cycles(src: Path = SRC) -> list[list[str]]:
    """Cycles among modules (strongly connected components of more than one module)."""
    graph: dict[str, set[str]] = {}
    names = {module_name(p, src) for p in src.rglob("*.py")}
    for path in src.rglob("*.py"):
        me = module_name(path, src)
        graph[me] = {t for _, t in imports_of(path, src) if t in names and t != me}
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    cycles = []

    def visit(v: str) -> None:  # Tarjan
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                cycles.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return cycles


def test_imports_only_go_down():
    assert upward_imports() == []


def test_no_import_cycles():
    assert import_cycles() == []


def test_no_module_over_400_lines():
    long = {str(p.relative_to(SRC)): n for p in SRC.rglob("*.py") if (n := len(p.read_text().splitlines())) > MAX_LINES}
    assert long == {}


def test_every_package_is_a_layer():
    packages = {p.name for p in SRC.iterdir() if p.is_dir() and (p / "__init__.py").exists()}
    assert packages == set(LAYERS)


def test_the_check_catches_an_upward_import(tmp_path):
    fake = tmp_path / "meml"
    for pkg, text in {
        "core": "from meml.train.loop import train\n",
        "train": "from meml.core.types import Example\n",
    }.items():
        (fake / pkg).mkdir(parents=True)
        (fake / pkg / "__init__.py").write_text("")
        (fake / pkg / "mod.py").write_text(text)
    (fake / "__init__.py").write_text("")
    assert upward_imports(fake) == [
        "meml/core/mod.py:1: core (layer 0) imports meml.train.loop, a higher layer (train, layer 4)"
    ]


@pytest.mark.parametrize(
    "text",
    [
        "import meml.cli.app\n",
        "from meml.cli import app\n",
        "from meml import cli\n",
        "if True:\n    def f():\n        from meml.cli.app import main\n",
    ],
)
def test_every_form_of_import_is_read(tmp_path, text):
    fake = tmp_path / "meml"
    (fake / "eval").mkdir(parents=True)
    (fake / "eval" / "__init__.py").write_text("")
    (fake / "eval" / "mod.py").write_text(text)
    (fake / "__init__.py").write_text("")
    assert len(upward_imports(fake)) == 1


def test_a_cycle_is_found(tmp_path):
    fake = tmp_path / "meml"
    (fake / "core").mkdir(parents=True)
    (fake / "__init__.py").write_text("")
    (fake / "core" / "__init__.py").write_text("")
    (fake / "core" / "a.py").write_text("from meml.core.b import x\n")
    (fake / "core" / "b.py").write_text("from meml.core import a\n")
    assert import_cycles(fake) == [["meml.core.a", "meml.core.b"]]


def named_modules(text: str) -> set[str]:
    """Modules a page names: as `package/module.py`, or in a tree line `package/  a.py b.py`."""
    import re

    packages = "|".join(LAYERS)
    named = set(re.findall(rf"\b((?:{packages})/[a-z0-9_]+\.py)\b", text))
    for line in text.splitlines():
        tree = re.match(rf"^\s+({packages})/\s+(.*)$", line)
        if tree:
            named |= {f"{tree.group(1)}/{name}" for name in re.findall(r"\b([a-z0-9_]+\.py)\b", tree.group(2))}
    return named


def test_the_architecture_doc_and_the_readme_name_every_module():
    """docs/ARCHITECTURE.md and the README's file tree name every module of src/meml, and
    every module they name exists."""
    root = SRC.parents[1]
    modules = {str(p.relative_to(SRC)) for p in SRC.rglob("*.py") if p.name not in ("__init__.py", "__main__.py")}
    for where in ("docs/ARCHITECTURE.md", "README.md"):
        named = named_modules((root / where).read_text())
        assert sorted(modules - named) == [], f"{where} does not name these modules"
        assert sorted(named - modules) == [], f"{where} names modules that do not exist"
