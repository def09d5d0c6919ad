"""Exit codes a nightly job can trust, and what the reports say about failures and weak teachers; the CLI runs
in-process (click's runner) with --no-ray / ray.enabled: false on tiny real shards.

- `distill pipeline` exits 3 when a stage was partial (it exited 0), 4 with one line when a stage failed for every
  shard (a RuntimeError traceback, exit 1), and 6 when a ValueError / FileNotFoundError comes after work began
  (it exited 2, "bad input, nothing done", although the cache stage had labelled shards).
- `distill cache` does not say "the others are cached" when none was; `cache inspect` lists the failed shards.
- `distill train` reports the teacher's val top-1 and warns when the teacher is below its students.
"""

import json

import pytest
import torch
import yaml
from click.testing import CliRunner
from helpers import cache_cfg_dict, encode, mnist, mnist_shard, save_teacher, write_tar

from distill.cluster.cli import cli

pytestmark = pytest.mark.integration


def _shards(tmp_path, bad: int, good: int = 1):
    for i in range(good):
        mnist_shard(tmp_path / "in" / f"train-{i:06d}.tar", 8, offset=8 * i)
    for i in range(good, good + bad):
        p = mnist_shard(tmp_path / "in" / f"train-{i:06d}.tar", 20, offset=8 * i)
        p.write_bytes(p.read_bytes()[:3000])  # truncated: that shard fails, the others go on


def _pipeline(tmp_path, **sections) -> str:
    cache = cache_cfg_dict([str(tmp_path / "in" / "*.tar")], str(tmp_path / "cache"), save_teacher(tmp_path / "t.pt"))
    f = tmp_path / "pipeline.yaml"
    f.write_text(yaml.safe_dump(json.loads(json.dumps({"cache": cache, "metrics": {"enabled": False}, **sections},
                                                      default=str))))
    return str(f)


def test_pipeline_partial_stage_exits_3_and_inspect_lists_the_failed_shard(tmp_path):
    _shards(tmp_path, bad=1)
    r = CliRunner().invoke(cli, ["pipeline", "--config", _pipeline(tmp_path)])
    assert r.exit_code == 3, (r.output[-2000:], r.exception)
    assert "partial: stage(s) cache" in r.stderr
    for args in ([], ["--json"]):
        info = CliRunner().invoke(cli, ["cache", "inspect", str(tmp_path / "cache"), *args])
        assert info.exit_code == 0, info.output
        if args:
            failed = json.loads(info.stdout)["failed_shards"]
            assert list(failed) == ["train-000001"] and "corrupt or truncated" in failed["train-000001"]
        else:
            assert "failed       1 shard(s) in the last run (status partial)" in info.stdout
            assert "  train-000001: " in info.stdout and "corrupt or truncated" in info.stdout


def test_pipeline_stage_that_failed_for_every_shard_exits_4_in_one_line(tmp_path):
    _shards(tmp_path, bad=2, good=0)
    r = CliRunner().invoke(cli, ["pipeline", "--config", _pipeline(tmp_path)])
    assert r.exit_code == 4, (r.output[-2000:], r.exception)
    assert isinstance(r.exception, SystemExit) and "Traceback" not in r.output
    lines = r.stderr.strip().splitlines()
    assert lines[-1].startswith("error: cache stage: every shard to label failed; nothing new was cached: "
                                "train-000000: ") and "train-000001: " in lines[-1]
    # `distill cache` alone: exit 4, and it does not claim that other shards are cached
    r = CliRunner().invoke(cli, ["cache", "--config", str(tmp_path / "pipeline.yaml")])
    assert r.exit_code == 4
    assert "2 shard(s) failed and none was labelled in this run: nothing new is cached" in r.stderr
    assert "the others are cached" not in r.stderr


def test_an_error_after_work_began_is_not_bad_input(tmp_path):
    """The cache stage labels its shard, then the train stage finds no val shard: FileNotFoundError, which used to
    exit 2 ("bad config or input, found before any work"). Work was done: exit 6, one line."""
    _shards(tmp_path, bad=0)
    train = {"run_dir": str(tmp_path / "run"), "ray": {"enabled": False}, "metrics_port": None,
             "data": {"train_shards": [str(tmp_path / "in" / "*.tar")], "val_shards": [str(tmp_path / "nope-*.tar")],
                      "cache_root": str(tmp_path / "cache")},
             "base": {"arch": "cnn_small", "arch_kwargs": {"width": 4}, "epochs": 1}}
    r = CliRunner().invoke(cli, ["pipeline", "--config", _pipeline(tmp_path, train=train)])
    assert r.exit_code == 6, (r.output[-2000:], r.exception)
    assert isinstance(r.exception, SystemExit) and "Traceback" not in r.output
    assert r.stderr.strip().splitlines()[-1].startswith(
        "error: failed during the run: FileNotFoundError: no shard file matches: ")
    assert (tmp_path / "cache").exists()  # the work that was done is kept
    # the same config error with nothing done yet is still bad input
    r = CliRunner().invoke(cli, ["train", "--config", str(tmp_path / "pipeline.yaml")])
    assert r.exit_code == 2 and r.stderr.startswith("error: no shard file matches: ")


class _AlwaysZero(torch.nn.Module):
    """A teacher (TorchScript, as from another codebase) that answers class 0 for every image."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.zeros(x.shape[0], 10)
        out[:, 0] = 5.0
        return out + 0.01 * torch.arange(10.0)


def test_a_teacher_below_its_students_is_reported_and_warned_about(tmp_path):
    mnist_shard(tmp_path / "in" / "train-000000.tar", 120)
    x, y = mnist(200, offset=1000)
    keep = [i for i in range(200) if int(y[i]) != 0][:40]  # val digits 1-9: the teacher is wrong on every one
    write_tar(tmp_path / "in" / "val-000000.tar",
              [(f"val_{i:05d}", {"png": encode(x[i]), "cls": str(int(y[i])).encode()}) for i in keep])
    scripted = tmp_path / "zero.pt"
    torch.jit.script(_AlwaysZero()).save(str(scripted))
    cache = cache_cfg_dict([str(tmp_path / "in" / "*.tar")], str(tmp_path / "cache"), None)
    cache["teacher"] = {"scripted": str(scripted), "preprocessing": {**cache["teacher"]["preprocessing"],
                                                                     "crop_pct": 0.875}}
    train = {"run_dir": str(tmp_path / "run"), "ray": {"enabled": False}, "metrics_port": None, "twins": False,
             "data": {"train_shards": [str(tmp_path / "in" / "train-*.tar")],
                      "val_shards": [str(tmp_path / "in" / "val-*.tar")], "cache_root": str(tmp_path / "cache"),
                      "loader_workers": 0},
             "base": {"name": "plain", "arch": "cnn_small", "arch_kwargs": {"width": 4}, "epochs": 1,
                      "batch_size": 16, "mode": "none", "lr": 0.01}}
    f = tmp_path / "p.yaml"
    f.write_text(yaml.safe_dump(json.loads(json.dumps({"cache": cache, "train": train}, default=str))))
    assert CliRunner().invoke(cli, ["cache", "--config", str(f)]).exit_code == 0
    r = CliRunner().invoke(cli, ["train", "--config", str(f)])
    assert r.exit_code == 0, (r.output[-3000:], r.exception)
    assert "teacher: 0.00% val top-1 on 40 labelled val images (its cached view 0)" in r.stdout
    board = (tmp_path / "run" / "leaderboard.txt").read_text()
    assert "teacher: 0.00% val top-1 on 40" in board
    student = json.loads((tmp_path / "run" / "plain" / "arch.json").read_text())["val_top1"]
    assert student > 0, "the premise: the student gets at least one val digit right"
    assert "warning: the teacher (0.00% val top-1 on 40 labelled val images) is" in r.stderr
    assert "below its best student plain" in r.stderr and "warning: the teacher" in board
