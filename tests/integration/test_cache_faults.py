"""Issue 21 items 12, 14, 15: a broken labeller, a hung shard and a crashing decode process, with real processes.

The faults that need what this machine lacks (a GPU whose context breaks) or that no shippable sample causes
reliably (a codec crash) come from teacher_cache/hooks_for_tests.py, switched on by environment variables that
only tests set; the hung read is a real FIFO that the test never writes.
"""

import json
import os
import subprocess
import sys

import pytest
import yaml
from helpers import ROOT, cache_cfg_dict, encode, mnist, mnist_shard, save_teacher, write_tar

from distill.core import hooks_for_tests
from distill.images.decode_pool import CRASHED
from distill.teacher_cache.config import CacheConfig
from distill.teacher_cache.reader import CacheReader, read_errors
from distill.teacher_cache.run import run

pytestmark = pytest.mark.integration
DISTILL = [sys.executable, "-c", "from distill.cluster.cli import main; main()"]


def _ray_cfg(tmp_path, **ray):
    ckpt = save_teacher(tmp_path / "t.pt")
    d = cache_cfg_dict([str(tmp_path / "in" / "*.tar")], tmp_path / "cache", ckpt, decode_processes=0)
    d["ray"] = {"enabled": True, "num_actors": 1, "cpus_per_actor": 0.5, "max_shard_retries": 1, **ray}
    return CacheConfig.model_validate(d)


def test_a_broken_labeller_is_replaced_and_its_shard_retried(tmp_path, ray_local, monkeypatch):
    """Item 12: a labeller with a sticky error (here a CUDA-style one, injected: no GPU here) used to go back to
    the pool and fail its shard and every later one; now its actor is replaced and the shard retried."""
    for i in range(3):
        mnist_shard(tmp_path / "in" / f"s{i}.tar", 6, offset=6 * i)
    gate = tmp_path / "break-the-first-labeller"
    gate.write_text("")
    monkeypatch.setenv(hooks_for_tests.BREAK_LABELLER, str(gate))
    res = run(_ray_cfg(tmp_path))
    assert not gate.exists()  # one labeller took it and broke
    assert res.status == "success", res.failed
    assert sorted(res.labelled) == ["s0", "s1", "s2"] and sum(res.retried.values()) == 1


def test_a_hung_shard_is_killed_at_its_deadline_retried_then_failed(tmp_path, ray_local):
    """Item 14: a shard whose read blocks forever (a FIFO nobody writes) used to hang the run. The deadline is
    scaled to the shard's size: 2 s for the empty FIFO, hours for the real shards (so their speed is moot)."""
    for i in range(2):
        mnist_shard(tmp_path / "in" / f"s{i}.tar", 6, offset=6 * i)
    os.mkfifo(tmp_path / "in" / "stuck.tar")
    res = run(_ray_cfg(tmp_path, shard_timeout_s=2.0, shard_timeout_s_per_mb=1e6))
    assert res.status == "partial" and sorted(res.labelled) == ["s0", "s1"]
    assert res.retried == {"stuck": 1}
    assert "no result within 2 s on 2 attempt(s)" in res.failed["stuck"]
    assert "ray.shard_timeout_s" in res.failed["stuck"]


def test_a_sample_that_crashes_its_decode_process_is_a_bad_sample(tmp_path):
    """Item 15: the dead worker's chunk used to be decoded again inside the labeller, so the crash killed the
    labeller (here: the `distill cache --no-ray` process) on every retry. Now the sample is recorded and skipped."""
    marker = "distill-test-crash-this-decoder"
    x, y = mnist(10)
    samples = [(f"k{i:02d}", {"png": encode(x[i]), "cls": str(int(y[i])).encode()}) for i in range(10)]
    samples.insert(3, ("crasher", {"png": encode(x[0]) + marker.encode(), "cls": b"1"}))  # a valid PNG + marker
    write_tar(tmp_path / "in" / "s.tar", samples)
    ckpt = str(save_teacher(tmp_path / "t.pt"))
    cfg = cache_cfg_dict([str(tmp_path / "in" / "*.tar")], str(tmp_path / "cache"), ckpt, decode_processes=1)
    (tmp_path / "cache.yaml").write_text(yaml.safe_dump(json.loads(json.dumps(cfg, default=str))))
    env = {**os.environ, hooks_for_tests.CRASH_DECODER: marker}
    proc = subprocess.run([*DISTILL, "cache", "--config", str(tmp_path / "cache.yaml"), "--no-ray"], cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, f"rc {proc.returncode}: {proc.stderr[-3000:]}"
    cache_dir = next((tmp_path / "cache").glob("*/manifest.json")).parent
    assert [(e["key"], e["reason"]) for e in read_errors(cache_dir)] == [("crasher", CRASHED)]
    assert CacheReader(cache_dir).arrays("s").keys == [f"k{i:02d}" for i in range(10)]
