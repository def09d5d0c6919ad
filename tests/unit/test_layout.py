"""The layout as a contract: the import graph (read with `ast`, function-level imports included) has no circles,
packages import in one direction only, and one function in the project renames files into place."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("core", "images", "teacher", "teacher_cache", "student_train", "compress", "deploy", "cluster", "distill")
# package -> the project packages it may import (README "Layout": cluster -> stages; compress -> student_train ->
# teacher_cache (its contract only); the rooms below the stages: teacher -> images -> core; deploy serves with the
# image room's view replay; every package -> core; core -> none of them; `distill` is the package root)
ALLOWED = {
    "core": set(),
    "images": {"core"},
    "teacher": {"core", "images"},
    "teacher_cache": {"core", "images", "teacher"},
    "student_train": {"core", "images", "teacher", "teacher_cache"},
    "compress": {"core", "images", "student_train"},
    "deploy": {"core", "images", "compress"},
    "cluster": {"core", "images", "teacher", "teacher_cache", "student_train", "compress", "deploy"},
    "distill": {"core", "images", "teacher", "teacher_cache", "student_train", "compress", "deploy", "cluster"},
}
# the one module of the cache that other stages may import (the declared contract)
CACHE_CONTRACT = "teacher_cache.contract"
SHARED_NAMES = ("models", "devices", "graceful_stop", "ray_cluster", "ray_resources", "object_store",
                "scrape_target", "metrics_server", "atomic_io")


def _modules() -> dict[str, Path]:
    """Project module name (without the installed `distill.` prefix) -> its file."""
    out = {f"distill.{p.stem}": p for p in sorted((ROOT / "distill").glob("*.py")) if p.stem != "__init__"}
    for pkg in PACKAGES[:-1]:
        for path in sorted((ROOT / pkg).rglob("*.py")):
            rel = path.relative_to(ROOT).with_suffix("")
            parts = rel.parts[:-1] if rel.name == "__init__" else rel.parts
            out[".".join(parts)] = path
    return out


def _project_name(name: str) -> str:
    """`distill.core.models` -> `core.models`: every project import goes through the one installed package."""
    return name if name.startswith("distill.__") else name.removeprefix("distill.")


def import_graph() -> dict[str, set[str]]:
    """module -> project modules it imports (anywhere in the file)."""
    mods = _modules()
    graph: dict[str, set[str]] = {m: set() for m in mods}
    for mod, path in mods.items():
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            targets: list[str] = []
            if isinstance(node, ast.Import):
                targets = [_project_name(a.name) for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                module = _project_name(node.module)
                targets = [f"{module}.{a.name}" for a in node.names] + [module]
            for t in targets:
                while t and t not in mods:
                    t = t.rpartition(".")[0]
                if t and t != mod and (t not in PACKAGES or not any(x.startswith(t + ".") and x in mods
                                                                   for x in targets)):
                    graph[mod].add(t)
    return graph


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    out: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in graph:
        if v not in index:
            visit(v)
    return out


def test_graph_sees_function_level_imports() -> None:
    g = import_graph()
    assert "core.ray_cluster" in g["teacher_cache.run"]
    assert "student_train.ray_runner" in g["student_train.run"]  # imported inside run()


def test_no_import_circles() -> None:
    assert _cycles(import_graph()) == []


def test_cycle_finder_finds_one() -> None:
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_packages_import_one_way() -> None:
    bad = sorted(f"{m} -> {t}" for m, targets in import_graph().items() for t in targets
                 if t.split(".")[0] != m.split(".")[0] and t.split(".")[0] not in ALLOWED[m.split(".")[0]])
    assert bad == []


def test_other_stages_use_only_the_declared_cache_contract() -> None:
    """Training and compress read the cache through `teacher_cache.contract` alone (reader, locate, schema, rebuild);
    the cache's internals (run, manifest, labeller, ...) can change without touching them."""
    bad = sorted(f"{m} -> {t}" for m, targets in import_graph().items() for t in targets
                 if m.split(".")[0] in ("student_train", "compress", "deploy") and t.startswith("teacher_cache")
                 and t != CACHE_CONTRACT)
    assert bad == []
    contract = import_graph()[CACHE_CONTRACT]
    assert {"teacher_cache.reader", "teacher_cache.locate", "teacher_cache.topk", "teacher_cache.schema"} <= contract


def test_shared_parts_live_in_core_only() -> None:
    for pkg in PACKAGES[1:-1]:
        for name in SHARED_NAMES:
            assert not (ROOT / pkg / f"{name}.py").exists(), f"{pkg}/{name}.py belongs in core/"
    assert all((ROOT / "core" / f"{n}.py").exists() for n in ("models", "devices", "graceful_stop", "ray_cluster",
                                                              "object_store", "metrics_server", "atomic_io"))


def test_one_function_renames_files_into_place() -> None:
    """Every durable write goes through core.atomic_io.atomic_write (temp + fsync + rename + directory fsync)."""
    renamers = []
    for mod, path in _modules().items():
        for fn in ast.walk(ast.parse(path.read_text())):
            if isinstance(fn, ast.FunctionDef | ast.AsyncFunctionDef):
                for call in ast.walk(fn):
                    if (isinstance(call, ast.Call) and isinstance(call.func, ast.Attribute)
                            and call.func.attr in ("replace", "rename")
                            and isinstance(call.func.value, ast.Name) and call.func.value.id == "os"):
                        renamers.append(f"{mod}.{fn.name}")
    assert renamers == ["core.atomic_io.atomic_write"]
