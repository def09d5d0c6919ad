"""`distill cache` / `distill cache refresh` exit codes and CLI edges, run in-process with --no-ray."""

import json
import socket

import pytest
import torch
import yaml
from click.testing import CliRunner
from helpers import cache_cfg_dict, mnist_shard, save_teacher

from distill.cluster.cli import cli
from distill.cluster.cli_common import EXIT_BAD_INPUT, EXIT_LOCKED, EXIT_RUN_FAILED

pytestmark = pytest.mark.integration


class _CrashesOnBatches(torch.nn.Module):
    """A real TorchScript teacher that passes the load-time probe (batch 1) and fails on real batches."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[0] > 1:
            raise RuntimeError("teacher crashed on a batch")
        return torch.zeros(x.shape[0], 10)


def _cfg_file(tmp_path, **over):
    for i in range(2):
        mnist_shard(tmp_path / "in" / f"train-{i:06d}.tar", 12, offset=12 * i)
    cfg = cache_cfg_dict([str(tmp_path / "in" / "*.tar")], str(tmp_path / "cache"), save_teacher(tmp_path / "t.pt"),
                         **over)
    f = tmp_path / "cache.yaml"
    f.write_text(yaml.safe_dump(json.loads(json.dumps(cfg, default=str))))
    return f


def test_failure_during_the_run_is_not_reported_as_bad_input(tmp_path):
    scripted = tmp_path / "crash.pt"
    torch.jit.script(_CrashesOnBatches()).save(str(scripted))
    f = _cfg_file(tmp_path, teacher={"scripted": str(scripted), "preprocessing": {
        "input_size": 32, "crop_pct": 0.875, "mean": [0.13], "std": [0.31], "channels": 1}})
    res = CliRunner().invoke(cli, ["cache", "--config", str(f), "--no-ray"])
    assert res.exit_code == EXIT_RUN_FAILED, res.output
    assert "failed during the run" in res.output and "teacher crashed on a batch" in res.output
    # a config error is still exit 2, nothing done
    res = CliRunner().invoke(cli, ["cache", "--config", str(f), "--set", "topk=0"])
    assert res.exit_code == EXIT_BAD_INPUT


def test_refresh_takes_no_ray_and_address_and_shows_touched(tmp_path, monkeypatch):
    import os
    import time

    from distill.teacher_cache.manifest import DirectoryLock

    at_release = []
    real_exit = DirectoryLock.__exit__

    def exit_and_record(self, *exc):  # what last_run.json says at the moment the lock is released
        summary = self.path.parent / "last_run.json"
        at_release.append(json.loads(summary.read_text()) if summary.exists() else None)
        return real_exit(self, *exc)

    monkeypatch.setattr(DirectoryLock, "__exit__", exit_and_record)
    f = _cfg_file(tmp_path, ray={"enabled": True})
    runner = CliRunner()
    first = runner.invoke(cli, ["cache", "refresh", "--config", str(f), "--no-ray"])
    assert first.exit_code == 0, first.output
    later = time.time() + 5
    os.utime(tmp_path / "in" / "train-000000.tar", (later, later))
    res = runner.invoke(cli, ["cache", "refresh", "--config", str(f), "--no-ray"])
    assert res.exit_code == 0, res.output
    assert json.loads(res.stdout)["touched"] == ["train-000000"]
    assert at_release[-1] is not None and at_release[-1]["touched"] == ["train-000000"]  # written under the lock
    bad = runner.invoke(cli, ["cache", "refresh", "--config", str(f), "--address", "127.0.0.1:1"])
    assert bad.exit_code == EXIT_BAD_INPUT and "127.0.0.1:1" in bad.output


def test_taken_metrics_port_is_a_clear_error_before_the_lock(tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        f = _cfg_file(tmp_path, metrics={"enabled": True, "port": port})
        for cmd in (["cache"], ["cache", "refresh"]):
            res = CliRunner().invoke(cli, cmd + ["--config", str(f), "--no-ray"])
            assert res.exit_code == EXIT_BAD_INPUT, res.output
            assert f"port {port} is already in use" in res.output and "metrics.port" in res.output
    assert not (tmp_path / "cache").exists()  # nothing done, no lock taken


def test_a_cache_held_by_another_writer_exits_5_for_cache_and_refresh(tmp_path):
    """`--help` promises exit 5 ("locked by another writer") for both commands; `distill cache` used to exit 2."""
    from distill.teacher_cache.config import CacheConfig
    from distill.teacher_cache.manifest import DirectoryLock
    from distill.teacher_cache.run import map_shards, prepare

    f = _cfg_file(tmp_path)
    cfg = CacheConfig.model_validate(yaml.safe_load(f.read_text()))
    assert map_shards(cfg.shards)
    _, fp = prepare(cfg)
    with DirectoryLock(tmp_path / "cache" / fp):  # the other writer
        for cmd in (["cache"], ["cache", "refresh"]):
            res = CliRunner().invoke(cli, cmd + ["--config", str(f), "--no-ray"])
            assert res.exit_code == EXIT_LOCKED, (cmd, res.output)
            assert "refused:" in res.output and "being written by another job" in res.output


def test_cache_wait_waits_for_the_writer_and_the_exit_5_message_says_how(tmp_path):
    """The README's `distill cache --wait` (before: only `distill cache refresh --wait` existed)."""
    import os
    import subprocess
    import sys
    import time

    from helpers import _pids_holding

    from distill.teacher_cache.config import CacheConfig
    from distill.teacher_cache.manifest import DirectoryLock
    from distill.teacher_cache.run import prepare

    f = _cfg_file(tmp_path)
    _, fp = prepare(CacheConfig.model_validate(yaml.safe_load(f.read_text())))
    lock = DirectoryLock(tmp_path / "cache" / fp).__enter__()  # the other writer
    try:
        res = CliRunner().invoke(cli, ["cache", "--config", str(f), "--no-ray"])
        assert res.exit_code == EXIT_LOCKED and "with --wait" in res.output, res.output
        proc = subprocess.Popen([sys.executable, "-m", "distill", "cache", "--wait", "-c", str(f), "--no-ray"],
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=dict(os.environ))
        deadline = time.monotonic() + 300
        while proc.pid not in _pids_holding((tmp_path / "cache" / fp / ".lock").stat()):  # it waits on the lock
            assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()[0][-3000:]
            time.sleep(0.1)
    finally:
        lock.__exit__(None, None, None)
    out = proc.communicate(timeout=300)[0]
    assert proc.returncode == 0, out[-3000:]
    assert json.loads(out[out.index("{"):out.rindex("}") + 1])["labelled"] == 2
