"""The project installs as ONE package, `distill`: every folder of the repository that holds a sub-package is
mapped under it in pyproject.toml, and every project import goes through `distill.` (an import of a bare `core`
or `deploy` would reach into whatever else of that name the user's environment has)."""

from __future__ import annotations

import ast
from pathlib import Path

import tomllib

ROOT = Path(__file__).resolve().parents[2]
SETUP = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]


def _installed_name(folder: Path) -> str | None:
    """The package name a repository folder installs as, from the package-dir mapping (None: not installed)."""
    rel = folder.relative_to(ROOT).as_posix()
    best = max((src for src in SETUP["package-dir"].values() if rel == src or rel.startswith(src + "/")),
               key=len, default=None)
    if best is None:
        return None
    name = next(n for n, src in SETUP["package-dir"].items() if src == best)
    return ".".join([name, *Path(rel).relative_to(best).parts]) if rel != best else name


def test_every_package_folder_is_installed() -> None:
    folders = {init.parent for src in SETUP["package-dir"].values() for init in (ROOT / src).rglob("__init__.py")}
    names = {_installed_name(f) for f in folders}
    assert None not in names
    assert sorted(names) == sorted(SETUP["packages"]), "list the new sub-package in pyproject.toml's packages"
    assert all(n == "distill" or n.startswith("distill.") for n in names)


def test_project_imports_go_through_the_distill_package() -> None:
    bare = {n.removeprefix("distill.").split(".")[0] for n in SETUP["package-dir"] if n != "distill"}
    offenders = []
    folders = [*SETUP["package-dir"].values(), "tests", "bench"]
    for path in sorted(p for folder in folders for p in (ROOT / folder).rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                     else [node.module] if isinstance(node, ast.ImportFrom) and node.module and not node.level
                     else [])
            offenders += [f"{path.relative_to(ROOT)}:{node.lineno} {n}" for n in names if n.split(".")[0] in bare]
    assert offenders == []


def test_the_mapping_is_what_the_finder_reads() -> None:
    """The check above must be able to fail: a folder outside the mapping has no installed name."""
    assert _installed_name(ROOT / "core" / "storage") == "distill.core.storage"
    assert _installed_name(ROOT / "tests") is None
