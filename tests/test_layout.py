"""The import layers (README, "Layout"): every module imports only from its own layer or the layers below, the
module graph has no cycle, and a project import inside a function says why it is there.

Each project ``.py`` file is parsed with :mod:`ast` (nothing is imported): the imports at module level and those
inside functions both count. A project import inside a function is allowed only with a one-line reason,
``# local: <reason>`` (e.g. keeping torch out of the config-error path), on its line or the line above it (above
a block of consecutive imports, the comment covers the block); tests are exempt from that rule (a test imports
what it tests where it needs it), not from the layers.
"""
from __future__ import annotations

import ast
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Optional

import pytest

ROOT = Path(__file__).resolve().parent.parent

LAYERS: list[tuple[str, tuple[str, ...]]] = [
    # (layer, the module prefixes it holds), bottom to top; the longest matching prefix decides.
    ("config", ("config",)),  # the dataclasses, YAML + flags, --trainer.resume: plain Python, imported by all
    ("utils", ("utils",)),  # small helpers: registry, run directory, loggers, optimisers, tuner, metrics
    ("datamodules", ("datamodules",)),
    ("analysis", ("analysis",)),  # model probing: attention, receptive fields, emergence
    ("models", ("models",)),
    ("lightningmodules", ("lightningmodules",)),
    ("callbacks", ("callbacks",)),
    ("validation", ("config.validation",)),  # asks every registry, so it sits above the components
    ("trainer", ("trainer",)),
    ("programs", ("main", "tools", "benchmarks", "tests")),
]
LOCAL_REASON = re.compile(r"#\s*local:\s*\S")
SKIPPED_DIRS = {"data", "runs", "wandb", "docs", "sweeps", "node_modules"}
NOT_CHECKED_FOR_REASONS = ("tests",)


@dataclass(frozen=True)
class Import:
    importer: str
    target: str
    line: int
    local: bool  # inside a function
    reason: bool  # a '# local: <reason>' on its line, or above it or above its block of imports


def project_files(root: Path) -> dict[str, Path]:
    """Module name → file, for every .py file of the project (hidden, data and run folders skipped)."""
    modules: dict[str, Path] = {}
    for path in sorted(root.rglob("*.py")):
        rel = path.relative_to(root)
        if any(part.startswith((".", "_")) and part != "__init__.py" or part in SKIPPED_DIRS for part in rel.parts):
            continue
        parts = list(rel.with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        if parts:
            modules[".".join(parts)] = path
    return modules


def _resolve(importer: str, is_package: bool, node: ast.ImportFrom) -> str:
    if not node.level:
        return node.module or ""
    base = importer.split(".") if is_package else importer.split(".")[:-1]
    base = base[: len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def imports_of(module: str, path: Path, modules: set[str]) -> list[Import]:
    """The project modules ``module`` imports: ``from pkg import sub`` counts as importing ``pkg.sub`` when that is
    a module, else ``pkg``; a package's ``__init__`` is only counted when the import names the package itself."""
    source = path.read_text()
    lines = source.splitlines()
    tree = ast.parse(source, filename=str(path))
    found: list[Import] = []
    tops = {name.split(".")[0] for name in modules}

    import_lines = {line for node in ast.walk(tree) if isinstance(node, (ast.Import, ast.ImportFrom))
                    for line in range(node.lineno, (node.end_lineno or node.lineno) + 1)}

    def has_reason(node: ast.stmt) -> bool:
        if any(LOCAL_REASON.search(lines[i - 1]) for i in range(node.lineno, (node.end_lineno or node.lineno) + 1)):
            return True
        above = node.lineno - 1  # upwards over the imports of the same block, to the line above them
        while above in import_lines:
            above -= 1
        return above >= 1 and bool(LOCAL_REASON.search(lines[above - 1]))

    def add(node: ast.stmt, target: str, local: bool) -> None:
        while target and target not in modules and "." in target:
            target = target.rsplit(".", 1)[0]
        imp = Import(module, target, node.lineno, local, has_reason(node))
        if target in modules and target != module and imp not in found:
            found.append(imp)

    def visit(node: ast.AST, local: bool) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.Import):
                for alias in child.names:
                    if alias.name.split(".")[0] in tops:
                        add(child, alias.name, local)
            elif isinstance(child, ast.ImportFrom):
                base = _resolve(module, path.name == "__init__.py", child)
                if base.split(".")[0] not in tops:
                    continue
                for alias in child.names:
                    add(child, f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules else base, local)
            else:
                visit(child, local or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)))

    visit(tree, False)
    return found


def layer_of(module: str) -> Optional[int]:
    best: Optional[tuple[int, int]] = None  # (prefix length, layer index)
    for index, (_, prefixes) in enumerate(LAYERS):
        for prefix in prefixes:
            if (module == prefix or module.startswith(prefix + ".")) and (best is None or len(prefix) > best[0]):
                best = (len(prefix), index)
    return None if best is None else best[1]


def _cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan's algorithm, iteratively)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []
    for start in sorted(edges):
        if start in index:
            continue
        work = [(start, iter(sorted(edges[start])))]
        index[start] = low[start] = len(index)
        stack.append(start)
        on_stack.add(start)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = len(index)
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(edges.get(child, ())))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.append(member)
                    if member == node:
                        break
                if len(component) > 1:
                    found.append(sorted(component))
    return found


def layout_problems(root: Path) -> list[str]:
    """Every breach of the layers, cycle and unexplained function-local project import under ``root``."""
    files = project_files(root)
    problems: list[str] = []
    edges: dict[str, set[str]] = {name: set() for name in files}
    for module, path in files.items():
        rel = path.relative_to(root)
        layer = layer_of(module)
        if layer is None:
            problems.append(f"{rel}: module {module} is in no layer (add it to LAYERS in tests/test_layout.py and to "
                            f"README's Layout)")
            continue
        for imp in imports_of(module, path, set(files)):
            edges[module].add(imp.target)
            target_layer = layer_of(imp.target)
            if target_layer is not None and target_layer > layer:
                problems.append(f"{rel}:{imp.line}: {module} ({LAYERS[layer][0]}) imports {imp.target} "
                                f"({LAYERS[target_layer][0]}), a higher layer")
            if imp.local and not imp.reason and not module.startswith(NOT_CHECKED_FOR_REASONS):
                problems.append(f"{rel}:{imp.line}: {module} imports {imp.target} inside a function without a "
                                f"'# local: <reason>' comment (move it to the top of the file, or say why it is local)")
    for cycle in _cycles(edges):
        problems.append(f"import cycle: {' <-> '.join(cycle)}")
    return problems


def local_project_imports(root: Path) -> list[Import]:
    """The function-local imports of project modules (library and programs, tests left out)."""
    files = project_files(root)
    return [imp for module, path in files.items() if not module.startswith(NOT_CHECKED_FOR_REASONS)
            for imp in imports_of(module, path, set(files)) if imp.local]


def test_the_project_keeps_its_layers():
    problems = layout_problems(ROOT)
    assert not problems, f"{len(problems)} layout problem(s):\n" + "\n".join(problems)


def test_every_layer_holds_code():
    modules = project_files(ROOT)
    empty = [name for index, (name, _) in enumerate(LAYERS) if not any(layer_of(m) == index for m in modules)]
    assert not empty, f"layers without modules: {empty}"


def _tree(root: Path, files: dict[str, str]) -> Path:
    for rel, text in files.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    for package in ("utils", "config", "models", "callbacks", "tools", "tests"):
        (root / package).mkdir(exist_ok=True)
        (root / package / "__init__.py").touch()
    return root


@pytest.mark.parametrize("files, expected", [
    # a helper importing a callback: a lower layer reaching up
    ({"utils/helper.py": "from callbacks.pictures import draw\n", "callbacks/pictures.py": "def draw(): pass\n"},
     ["utils/helper.py:1: utils.helper (utils) imports callbacks.pictures (callbacks), a higher layer"]),
    # the same reach, hidden inside a function (with a reason: still a breach of the layers)
    ({"models/net.py": "def f():\n    from callbacks.pictures import draw  # local: speed\n",
      "callbacks/pictures.py": ""},
     ["models/net.py:2: models.net (models) imports callbacks.pictures (callbacks), a higher layer"]),
    # two modules of one layer importing each other, one of them lazily
    ({"models/a.py": "from models import b\n", "models/b.py": "def f():\n    # local: start-up\n    import models.a\n"},
     ["import cycle: models.a <-> models.b"]),
    # a downward import inside a function without its reason
    ({"tools/run.py": "def main():\n    from config.hparams import Hparams\n", "config/hparams.py": ""},
     ["tools/run.py:2: tools.run imports config.hparams inside a function without a '# local: <reason>' comment "
      "(move it to the top of the file, or say why it is local)"]),
    # a reason that does not sit on the import, above it or above its block of imports
    ({"tools/run.py": "def main():\n    # local: keeps --help fast\n    x = 1\n    import models.net\n",
      "models/net.py": ""},
     ["tools/run.py:4: tools.run imports models.net inside a function without a '# local: <reason>' comment "
      "(move it to the top of the file, or say why it is local)"]),
    # a module outside every layer
    ({"scratch.py": "import os\n"},
     ["scratch.py: module scratch is in no layer (add it to LAYERS in tests/test_layout.py and to README's Layout)"]),
    # config.validation is above the components it asks, its package (config) is not
    ({"config/validation.py": "def v():\n    from models import net  # local: pass 1 stays torch-free\n",
      "config/loading.py": "from models import net\n", "models/net.py": ""},
     ["config/loading.py:1: config.loading (config) imports models.net (models), a higher layer"]),
    # what is allowed: downward imports, explained local ones, tests' own local imports, relative imports
    ({"tools/run.py": "from callbacks import pictures\n\n\ndef main():\n    # local: keeps --help fast\n"
                      "    from models.net import f\n    import models.net\n\n\ndef other():\n"
                      "    from models import net  # local: keeps --help fast\n",
      "callbacks/pictures.py": "from .helpers import g\n", "callbacks/helpers.py": "from models.net import f\n",
      "models/net.py": "def f(): pass\n", "tests/test_x.py": "def test():\n    from models.net import f\n"},
     []),
])
def test_the_checker_finds_each_kind_of_problem(tmp_path, files, expected):
    assert layout_problems(_tree(tmp_path, files)) == expected


def test_the_checker_sees_an_injected_violation_in_a_copy_of_this_project(tmp_path):
    """A copy of the real tree passes; the same copy with one helper importing the trainer fails, naming it."""
    import shutil

    for module, path in project_files(ROOT).items():
        target = tmp_path / path.relative_to(ROOT)
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(path, target)
    assert layout_problems(tmp_path) == layout_problems(ROOT)
    registry = tmp_path / "utils" / "registry.py"
    registry.write_text(registry.read_text() + "\n\ndef _late():\n    import trainer  # local: injected\n")
    problems = layout_problems(tmp_path)
    assert any(p.startswith("utils/registry.py:") and "imports trainer (trainer), a higher layer" in p
               for p in problems)
    assert any(p.startswith("import cycle:") and "utils.registry" in p for p in problems)
