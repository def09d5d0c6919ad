"""The CLI's exit code for an error: "bad input" (2) only before the command's work began; after that "failed during
the run" (6); every unit of a stage failed: 4; the cache locked by another writer: 5. One line, no traceback."""

import click
import pytest
from click.testing import CliRunner

from distill.cluster.cli import _Main
from distill.cluster.cli_common import StageFailedError
from distill.core.run_phase import begin_work
from distill.core.storage import CacheLockedError
from distill.images.shards import ShardError
from distill.teacher_cache.reader import CacheError


@click.group(cls=_Main)
def cli() -> None:
    """The real `distill` group class, with commands that fail at chosen points."""


@cli.command()
@click.argument("what")
@click.option("--after-work-began", is_flag=True)
def fail(what: str, after_work_began: bool) -> None:
    if after_work_began:
        begin_work()
    raise {"value": ValueError("bad value"), "missing": FileNotFoundError("no such file: x.tar"),
           "runtime": RuntimeError("a stage broke"), "locked": CacheLockedError("cache held by pid 7"),
           "stage": StageFailedError("cache stage: every shard to label failed"),
           "cache": CacheError("cache file x.parquet is damaged"),
           "shard": ShardError("train-0.tar is truncated")}[what]


@pytest.mark.parametrize("what,began,code,line", [
    ("value", False, 2, "error: bad value"),
    ("missing", False, 2, "error: no such file: x.tar"),
    ("value", True, 6, "error: failed during the run: ValueError: bad value (finished work is kept"),
    ("missing", True, 6, "error: failed during the run: FileNotFoundError: no such file: x.tar"),
    ("runtime", True, 6, "error: failed during the run: RuntimeError: a stage broke"),
    ("stage", True, 4, "error: cache stage: every shard to label failed"),
    ("stage", False, 4, "error: cache stage: every shard to label failed"),
    ("locked", True, 5, "refused: cache held by pid 7"),
    ("locked", False, 5, "refused: cache held by pid 7"),
    ("cache", False, 2, "error: cache file x.parquet is damaged"),  # a RuntimeError marked user input
    ("shard", True, 6, "error: failed during the run: ShardError: train-0.tar is truncated"),
])
def test_exit_code_and_one_line(what, began, code, line):
    r = CliRunner().invoke(cli, ["fail", what] + (["--after-work-began"] if began else []))
    assert r.exit_code == code, (r.output, r.exception)
    assert isinstance(r.exception, SystemExit) and "Traceback" not in r.output
    assert r.stderr.startswith(line) and len(r.stderr.strip().splitlines()) == 1, r.stderr


def test_an_unexpected_error_before_any_work_keeps_its_traceback():
    r = CliRunner().invoke(cli, ["fail", "runtime"])  # a bug, not bad input: not hidden behind one line
    assert isinstance(r.exception, RuntimeError) and r.exit_code == 1
    r = CliRunner().invoke(cli, ["fail", "shard"])  # a project error not marked user input: also kept
    assert isinstance(r.exception, ShardError) and r.exit_code == 1


def test_every_project_error_has_the_one_base():
    """The exit rule reads `DistillError.user_input` / `exit_code`: an exception class outside that base would fall
    back to the builtin rule silently. Found by reading every class statement of the package."""
    import ast
    import importlib
    from pathlib import Path

    from distill.core.errors import DistillError

    root = Path(__file__).resolve().parents[2]
    outside = []
    for folder in ("core", "images", "teacher", "teacher_cache", "student_train", "compress", "deploy", "cluster"):
        for path in (root / folder).rglob("*.py"):
            module = None
            for node in ast.walk(ast.parse(path.read_text())):
                if not isinstance(node, ast.ClassDef):
                    continue
                if not any(isinstance(b, ast.Name) and (b.id.endswith(("Error", "Exception")) or b.id == "InputError")
                           or isinstance(b, ast.Attribute) and b.attr.endswith("Error") for b in node.bases):
                    continue
                if module is None:
                    rel = path.relative_to(root).with_suffix("")
                    module = importlib.import_module("distill." + ".".join(rel.parts))
                cls = getattr(module, node.name)
                # StopRequested is a BaseException on purpose (no `except Exception` may swallow a SIGTERM)
                if issubclass(cls, Exception) and not issubclass(cls, DistillError) and node.name != "_Replaced":
                    outside.append(f"{path.relative_to(root)}:{node.name}")
    assert outside == []


def test_each_command_starts_before_work():
    runner = CliRunner()
    assert runner.invoke(cli, ["fail", "value", "--after-work-began"]).exit_code == 6
    assert runner.invoke(cli, ["fail", "value"]).exit_code == 2  # the flag does not leak into the next command
