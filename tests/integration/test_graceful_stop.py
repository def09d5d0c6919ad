"""SIGTERM (what `ray job stop` sends) stops a stage cleanly: the cache records "stopped" with what was done and
frees its lock, training marks the variant "interrupted", and the same command then finishes the work with
nothing lost or duplicated. Real CLI processes, in-process stages (--no-ray); the Ray job path is in
tests/e2e/test_operations.py. The signal lands at a point the test holds the stage at (a shard that is a pipe the
test feeds, the training hold after epoch 1), never at a moment picked by the machine's speed."""

import json
import os
import signal
import subprocess
import sys
import time

import pandas as pd
import pytest
import yaml
from conftest import train_cfg
from helpers import (
    ShardGate,
    cache_cfg_dict,
    epochs_logged,
    hold_training_after,
    mnist_shard,
    save_teacher,
    shards_in_manifest,
)

from distill.core.graceful_stop import EXIT_STOPPED
from distill.images.shards import ShardReader
from distill.student_train.status import read_status
from distill.teacher_cache.locate import find_cache_dir
from distill.teacher_cache.reader import CacheReader

pytestmark = pytest.mark.integration
DISTILL = [sys.executable, "-c", "from distill.cluster.cli import main; main()"]


def _wait(pred, proc, timeout=300, what=""):
    deadline = time.monotonic() + timeout
    while not pred():
        if proc.poll() is not None:
            pytest.fail(f"the process ended (rc {proc.returncode}) before {what}:\n{proc.communicate()[0][-3000:]}")
        if time.monotonic() > deadline:
            proc.kill()
            pytest.fail(f"timed out waiting for {what}")
        time.sleep(0.05)


def test_sigterm_during_the_cache_pass_records_stopped_and_a_rerun_finishes(tmp_path):
    n = 4
    for i in range(n):
        mnist_shard(tmp_path / "in" / f"train-{i:06d}.tar", 40, offset=40 * i)
    cfg = cache_cfg_dict([str(tmp_path / "in" / "*.tar")], str(tmp_path / "cache"), save_teacher(tmp_path / "t.pt"),
                         batch_size=8, views={"num_views": 2}, decode_processes=0)
    f = tmp_path / "cache.yaml"
    f.write_text(yaml.safe_dump(json.loads(json.dumps(cfg, default=str))))
    gate = ShardGate(tmp_path / "in" / "train-000001.tar")  # shard 0 is labelled, then the run waits in shard 1
    proc = subprocess.Popen([*DISTILL, "cache", "-c", str(f), "--no-ray"], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    _wait(lambda: shards_in_manifest(tmp_path / "cache") >= 1, proc, what="the first cached shard")
    proc.send_signal(signal.SIGTERM)
    gate.release()  # EOF inside shard 1 for the labelling thread (the main thread is unwinding the stop already)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == EXIT_STOPPED, out[-3000:]
    assert "stopped by SIGTERM" in out and "re-run" in out
    cache_dir = find_cache_dir(tmp_path / "cache").parent.parent  # the fingerprint directory (not a reader's version)
    first = json.loads((cache_dir / "last_run.json").read_text())
    assert first["status"] == "stopped" and first["labelled"] == ["train-000000"], first
    gate.restore()
    # the lock was released: the same command runs at once and labels exactly the rest
    again = subprocess.run([*DISTILL, "cache", "-c", str(f), "--no-ray"], capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, (again.stdout + again.stderr)[-3000:]
    second = json.loads((cache_dir / "last_run.json").read_text())
    assert second["status"] == "success"
    assert sorted(second["labelled"] + second["unchanged"]) == [f"train-{i:06d}" for i in range(n)]
    assert not set(second["labelled"]) & set(first["labelled"])
    reader = CacheReader(cache_dir)
    keys = [k for i in range(n) for k in reader.arrays(f"train-{i:06d}").keys]
    expected = [s.key for i in range(n) for s in ShardReader(tmp_path / "in" / f"train-{i:06d}.tar")]
    assert sorted(keys) == sorted(expected)  # every key exactly once
    # and the files are the ones an uninterrupted run writes, byte for byte (checksums included)
    from distill.teacher_cache.config import CacheConfig
    from distill.teacher_cache.run import run

    straight = run(CacheConfig.model_validate({**cfg, "cache_root": str(tmp_path / "straight"), "progress": False}))
    sums = {s: e["file_sha256"] for s, e in json.loads((cache_dir / "manifest.json").read_text())["shards"].items()}
    ref = {s: e["file_sha256"] for s, e in
           json.loads((straight.cache_dir / "manifest.json").read_text())["shards"].items()}
    assert straight.fingerprint == cache_dir.name and sums == ref


def test_sigterm_during_training_marks_interrupted_and_a_rerun_resumes(kd_data, tmp_path):
    run_dir = tmp_path / "run"
    cfg = train_cfg(kd_data, run_dir, base={"arch": "cnn_small", "arch_kwargs": {"width": 4}, "epochs": 4,
                                            "batch_size": 8, "name": "st", "mode": "soft"})
    f = tmp_path / "train.yaml"
    f.write_text(yaml.safe_dump(cfg))
    metrics = run_dir / "st" / "metrics.csv"
    hold = hold_training_after(run_dir / "st", 1)  # epoch 1 is done and logged, then the variant waits
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([*DISTILL, "train", "-c", str(f), "--no-ray"], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, env=env)
    _wait(lambda: epochs_logged(metrics) >= 1, proc, what="the first epoch")
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=120)
    hold.release()
    assert proc.returncode == EXIT_STOPPED, out[-3000:]
    st = read_status(run_dir, "st")
    assert st["status"] == "interrupted" and "SIGTERM" in st["reason"], st
    assert pd.read_csv(metrics)["epoch"].tolist() == [1]
    again = subprocess.run([*DISTILL, "train", "-c", str(f), "--no-ray"], capture_output=True, text=True,
                           timeout=600, env=env)
    assert again.returncode == 0, (again.stdout + again.stderr)[-3000:]
    assert read_status(run_dir, "st")["status"] == "done"
    assert pd.read_csv(metrics)["epoch"].tolist() == [1, 2, 3, 4]  # resumed: each epoch exactly once
