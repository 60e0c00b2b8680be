"""The code a stage depends on: its entry module's import closure inside this package.

Both orchestrators declare these files (a Snakemake input, a DVC dependency) and a training run's
identity hashes them, so an edit to any module a stage can execute reruns that stage in both tools,
and one that it cannot execute reruns nothing. Found statically (every `import` statement, at any
depth, also inside functions: a lazy import runs when the function does), except in the CLI, where
only the module level counts: `cola` imports each stage's module inside that stage's handler.
"""

from __future__ import annotations

import ast
import functools
from pathlib import Path

PACKAGE = "cola_audio"
PACKAGE_DIR = Path(__file__).resolve().parent
REPO = PACKAGE_DIR.parents[1]  # the checkout the package is installed (editable) from
CLI = f"{PACKAGE}.cli"


def module_file(module: str) -> Path | None:
    """The source file of `cola_audio.x.y` (a module or a package's __init__), or None."""
    parts = module.split(".")
    if parts[0] != PACKAGE:
        return None
    base = PACKAGE_DIR.joinpath(*parts[1:])
    for candidate in (base.with_suffix(".py"), base / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None


def _with_parents(module: str) -> list[str]:
    """Importing a.b.c runs a/__init__, a/b/__init__ and a/b/c: every prefix."""
    parts = module.split(".")
    return [".".join(parts[: i + 1]) for i in range(len(parts))]


@functools.cache
def direct_imports(module: str, module_level_only: bool = False) -> frozenset[str]:
    """The package's modules that `module` imports (a `from m import name` counts m.name where
    that is a module of its own)."""
    path = module_file(module)
    if path is None:
        return frozenset()
    tree = ast.parse(path.read_text(), filename=str(path))
    nodes = tree.body if module_level_only else ast.walk(tree)
    found: set[str] = set()
    for node in nodes:
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = _absolute(node, module, path)
            if base is None:
                continue
            found.add(base)
            found.update(f"{base}.{alias.name}" for alias in node.names)
    return frozenset(
        parent
        for name in found
        if name.split(".")[0] == PACKAGE
        for parent in _with_parents(name)
        if module_file(parent) is not None
    )


def _absolute(node: ast.ImportFrom, module: str, path: Path) -> str | None:
    if not node.level:
        return node.module
    package = module.split(".") if path.name == "__init__.py" else module.split(".")[:-1]
    base = package[: len(package) - node.level + 1]
    return ".".join([*base, *([node.module] if node.module else [])])


def closure(entry: str) -> list[str]:
    """Repository-relative paths of every package file `cola <stage>` can execute when the stage's
    module is `entry` (e.g. "pretrain"): the CLI's module-level imports, then `entry`'s closure."""
    seen: set[str] = set()
    todo = [*_with_parents(CLI), *direct_imports(CLI, module_level_only=True)]
    todo += _with_parents(f"{PACKAGE}.{entry}")
    while todo:
        module = todo.pop()
        if module in seen:
            continue
        seen.add(module)
        if module != CLI:
            todo.extend(direct_imports(module))
    files = {module_file(m) for m in seen}
    return sorted(p.relative_to(PACKAGE_DIR.parents[1]).as_posix() for p in files if p)
