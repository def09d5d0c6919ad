"""The driver labels shards while the local Ray cluster it starts, and its teacher actors, come up (issue 31;
teacher_cache/head_start.py). Real `distill cache` processes, each starting its own local Ray cluster on
127.0.0.1; what the driver labels and what the actors label must be one cache, the same as an in-process pass."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import yaml
from helpers import ShardGate, cache_cfg_dict, mnist_shard, save_teacher

from distill.core import hooks_for_tests
from distill.core.graceful_stop import EXIT_STOPPED
from distill.teacher_cache.locate import find_cache_dir
from distill.teacher_cache.reader import CacheReader

pytestmark = pytest.mark.integration
DISTILL = [sys.executable, "-c", "from distill.cluster.cli import main; main()"]
STEMS = [f"train-{i:06d}" for i in range(4)]


def _setup(tmp: Path) -> Path:
    for i, stem in enumerate(STEMS):
        mnist_shard(tmp / "in" / f"{stem}.tar", 12, offset=12 * i)
    ckpt = save_teacher(tmp / "t.pt")
    cfg = cache_cfg_dict([str(tmp / "in" / "train-*.tar")], tmp / "cache", ckpt,
                         ray={"enabled": True, "num_actors": 1, "cpus_per_actor": 1})
    f = tmp / "cache.yaml"
    f.write_text(yaml.safe_dump(cfg))
    return f


def _env(**extra: str) -> dict[str, str]:
    """A local cluster of its own for each run: no address to join."""
    env = {k: v for k, v in os.environ.items() if k != hooks_for_tests.DRIVER_SHARDS}
    return {**env, "RAY_ADDRESS": "", "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", **extra}


def _summary(cache: Path) -> dict:
    return json.loads((find_cache_dir(cache) / "last_run.json").read_text())


def test_the_driver_labels_while_ray_starts_and_the_actors_take_the_rest(tmp_path):
    cfg = _setup(tmp_path)
    # one shard for the driver whatever the machine's speed; the actors must take the other three
    proc = subprocess.run([*DISTILL, "cache", "-c", str(cfg)], capture_output=True, text=True, timeout=600,
                          env=_env(**{hooks_for_tests.DRIVER_SHARDS: "1"}))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "labelled 1 shard(s) in this process while Ray and the teacher actors started; 3 left" in proc.stderr
    summary = _summary(tmp_path / "cache")
    assert summary["status"] == "success" and sorted(summary["labelled"]) == STEMS
    assert summary["labelled_on_driver"] == ["train-000000"] and summary["ray_start_seconds"] > 0

    local = subprocess.run([*DISTILL, "cache", "-c", str(cfg), "--no-ray", "--set", f"cache_root={tmp_path / 'local'}"],
                           capture_output=True, text=True, timeout=600, env=_env())
    assert local.returncode == 0, local.stderr[-3000:]
    in_process = _summary(tmp_path / "local")
    assert in_process["labelled_on_driver"] == []
    assert summary["fingerprint"] == in_process["fingerprint"]  # one teacher, one recipe: the same cache
    ra, rb = CacheReader(find_cache_dir(tmp_path / "cache")), CacheReader(find_cache_dir(tmp_path / "local"))
    assert ra.shards == rb.shards == STEMS
    for s in STEMS:
        a, b = ra.arrays(s), rb.arrays(s)
        assert a.keys == b.keys and np.array_equal(a.crops, b.crops) and np.array_equal(a.flips, b.flips)
        assert np.array_equal(a.topk_ids[..., 0], b.topk_ids[..., 0])
        np.testing.assert_allclose(a.topk_logits.astype(np.float32), b.topk_logits.astype(np.float32), atol=2e-3)


def test_sigterm_while_the_driver_labels_keeps_its_shard_and_a_rerun_finishes(tmp_path):
    cfg = _setup(tmp_path)
    gate = ShardGate(tmp_path / "in" / f"{STEMS[0]}.tar")  # the driver takes the first shard and waits inside it
    err = tmp_path / "stderr.txt"
    with open(err, "w") as stderr:
        proc = subprocess.Popen([*DISTILL, "cache", "-c", str(cfg)], stdout=subprocess.DEVNULL, stderr=stderr,
                                env=_env())
        try:
            deadline = time.monotonic() + 600
            # SIGTERM once Ray is up (inside ray.init, Ray's own handler ends the process) and the driver is inside
            while not (gate.readers() and "Ray: connected in" in err.read_text()):
                assert proc.poll() is None, err.read_text()[-3000:]
                assert time.monotonic() < deadline, "timed out waiting for Ray and the driver's first shard"
                time.sleep(0.05)
            assert gate.readers() == [proc.pid]  # the driver itself holds the shard, not an actor
            proc.send_signal(signal.SIGTERM)
            gate.feed_all()  # the driver finishes the shard in hand, records it, then stops
            assert proc.wait(timeout=600) == EXIT_STOPPED, err.read_text()[-3000:]
        finally:
            if proc.poll() is None:
                proc.kill()
    summary = _summary(tmp_path / "cache")
    assert summary["status"] == "stopped", summary
    assert summary["labelled"] == ["train-000000"] and summary["labelled_on_driver"] == ["train-000000"]
    gate.restore()

    again = subprocess.run([*DISTILL, "cache", "-c", str(cfg)], capture_output=True, text=True, timeout=600,
                           env=_env())
    assert again.returncode == 0, again.stderr[-3000:]
    reader = CacheReader(find_cache_dir(tmp_path / "cache"))
    keys = sorted(k for s in reader.shards for k in reader.arrays(s).keys)
    assert len(keys) == len(set(keys)) == 12 * len(STEMS)  # every key once
