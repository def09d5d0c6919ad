"""`distill cache` as a user runs it: SIGKILL at any moment then resume; bad input fails before any work."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner
from helpers import ShardGate, cache_cfg_dict, mnist_shard, save_teacher

from distill.cluster.cli import cli
from distill.images.shards import ShardReader
from distill.teacher_cache.locate import find_cache_dir
from distill.teacher_cache.reader import CacheReader

pytestmark = pytest.mark.integration
DISTILL = [sys.executable, "-c", "from distill.cluster.cli import main; main()"]


def _write_cfg(tmp: Path, **over) -> Path:
    ckpt = str(save_teacher(tmp / "t.pt"))
    cfg = cache_cfg_dict([str(tmp / "in" / "train-{000000..000007}.tar")], str(tmp / "cache"), ckpt, **over)
    f = tmp / "cache.yaml"
    f.write_text(yaml.safe_dump(cfg))
    return f


def _distill(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run(DISTILL + list(args), capture_output=True, text=True, timeout=timeout)


def _cache_files(cache: Path) -> int:
    return len(list(cache.glob("*/*.parquet")))


def _wait_for(pred, proc: subprocess.Popen, what: str, timeout: float = 600) -> None:
    """Until `pred()` holds while the CLI runs (the gates keep it running; the timeout only catches a hang)."""
    deadline = time.monotonic() + timeout
    while not pred():
        assert proc.poll() is None, f"the run ended (rc {proc.returncode}) before {what}"
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def test_sigkill_mid_shard_and_between_shards_then_rerun_gives_every_key_once(tmp_path):
    """SIGKILL the Ray-backed CLI at two points the test holds the run at, whatever the machine's speed: inside a
    shard (its labeller has read part of it: the test fed half its bytes through a pipe) and right after a cache
    file appeared (the last shard is a pipe nobody feeds, so the run cannot end first). Then a plain run finishes
    and every key is cached exactly once, with no temp file left."""
    shards = [mnist_shard(tmp_path / "in" / f"train-{i:06d}.tar", 50, offset=50 * i) for i in range(8)]
    expected = sorted(s.key for p in shards for s in ShardReader(p))
    later = {p: p.read_bytes() for p in shards[4:]}  # the nightly grows: shards 4-7 arrive for the second run
    for p in shards[4:]:
        p.unlink()
    cfg = _write_cfg(tmp_path, batch_size=12, shards=[str(tmp_path / "in" / "*.tar")])
    cache = tmp_path / "cache"

    # 1: killed inside shard 3, half of which its labeller has been given
    gate = ShardGate(shards[3])
    proc = subprocess.Popen(DISTILL + ["cache", "-c", str(cfg)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    _wait_for(lambda: gate.readers(), proc, "a labeller to open shard 3")
    gate.feed(gate.data[: len(gate.data) // 2])  # (fits in the pipe's buffer: the labeller reads it at its pace)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    gate.restore()

    # 2: killed as soon as a new cache file appears, with shard 7 held open
    for p, data in later.items():
        p.write_bytes(data)
    gate = ShardGate(shards[7])
    before = _cache_files(cache)
    proc = subprocess.Popen(DISTILL + ["cache", "-c", str(cfg)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    _wait_for(lambda: _cache_files(cache) > before, proc, "a new cache file")
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    gate.restore()

    done = _distill("cache", "-c", str(cfg), timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    reader = CacheReader(find_cache_dir(cache))
    keys = sorted(k for s in reader.shards for k in reader.arrays(s).keys)
    assert keys == expected  # every key exactly once
    assert not list(cache.glob("*/*.tmp-*"))


def test_bad_input_fails_before_any_work_with_one_line(tmp_path):
    mnist_shard(tmp_path / "in" / "train-000000.tar", 5)
    cfg = _write_cfg(tmp_path, shards=[str(tmp_path / "in" / "train-000000.tar")])
    cases = {
        "no shard file matches": ["--set", f"shards=[{tmp_path}/in/nope-*.tar]"],
        "unknown architecture 'resnet_nope'": ["--set", "teacher.arch=resnet_nope"],
        "does not fit arch 'resnet_mini'": ["--set", "teacher.arch_kwargs.width=8"],
        "checkpoint not found": ["--set", f"teacher.checkpoint={tmp_path}/missing.pt"],
        "cache.topk:": ["--set", "topk=-1"],
        "topk=50 is larger than the teacher's 10 classes": ["--set", "topk=50"],
    }
    # in-process (click's runner: the same CLI without a new interpreter importing torch and Ray per case; eight
    # processes cost this test ~90 s on 2 cores); the subprocess path is the other tests' in this file
    for expected, extra in cases.items():
        r = CliRunner().invoke(cli, ["cache", "-c", str(cfg), *extra])
        assert r.exit_code == 2, (expected, r.output[-2000:], r.exception)
        assert expected in r.stderr, (expected, r.stderr[-2000:])
        assert "Traceback" not in r.stderr and isinstance(r.exception, SystemExit), (expected, r.exception)
        assert not (tmp_path / "cache").exists(), f"work was done before failing on: {expected}"
    # the happy path works (in-process; the subprocess path is the SIGKILL test's) and inspect reports on it
    ok = CliRunner().invoke(cli, ["cache", "-c", str(cfg), "--no-ray"])
    assert ok.exit_code == 0, ok.output[-2000:]
    info = CliRunner().invoke(cli, ["cache", "inspect", str(tmp_path / "cache"), "--json"])
    data = json.loads(info.stdout)
    assert data["rows"] == 5 and data["views"] == 3 and data["k"] == 5 and data["labelled_rows"] == 5


def test_failed_shard_gives_partial_exit_code(tmp_path):
    mnist_shard(tmp_path / "in" / "train-000000.tar", 5)
    bad = mnist_shard(tmp_path / "in" / "train-000001.tar", 20)
    bad.write_bytes(bad.read_bytes()[:3000])
    cfg = _write_cfg(tmp_path, shards=[str(tmp_path / "in" / "*.tar")])
    r = _distill("cache", "-c", str(cfg))
    assert r.returncode == 3
    assert "1 shard(s) failed" in r.stderr and "train-000001.tar: corrupt or truncated" in r.stderr
