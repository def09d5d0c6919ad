"""Student training on real shards + a real cache: DeepSpeed in-process, torchrun x2, Ray Tune + Train."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
import yaml
from conftest import train_cfg

from distill.core.models import create_model
from distill.student_train.config import TrainConfig
from distill.student_train.data import DataJoinError
from distill.student_train.run import run
from distill.teacher_cache.reader import CacheError

pytestmark = pytest.mark.integration


def test_all_modes_in_process(kd_data, tmp_path):
    variants = [{"name": "soft", "mode": "soft", "views": 2}, {"name": "hard", "mode": "hard"},
                {"name": "none", "mode": "none"}, {"name": "online", "mode": "online", "arch": "mobilenet_mini"},
                {"name": "bf16-zero2", "precision": "bf16", "zero_stage": 2, "epochs": 2}]
    res = run(TrainConfig.model_validate(train_cfg(kd_data, tmp_path / "run", variants=variants)))
    assert res.status == "success", res.leaderboard
    board = {r["variant"]: r for r in res.leaderboard}
    assert set(board) == {"soft", "hard", "none", "online", "bf16-zero2"}
    for name, row in board.items():
        metrics = pd.read_csv(tmp_path / "run" / name / "metrics.csv")
        assert (metrics["train_samples"] == 240).all(), name  # every train sample exactly once per epoch
        assert (metrics["val_samples"] == 40).all()
        assert row["params"] > 0 and row["macs"] > 0 and 0 <= row["val_top1"] <= 1
        info = json.loads((tmp_path / "run" / name / "arch.json").read_text())
        model = create_model(info["arch"], info["num_classes"], info["in_chans"], **info["arch_kwargs"])
        model.load_state_dict(torch.load(tmp_path / "run" / name / "best.pt", weights_only=True))
    assert len(pd.read_csv(tmp_path / "run" / "bf16-zero2" / "metrics.csv")) == 2
    lb = pq.read_table(tmp_path / "run" / "leaderboard.parquet").to_pylist()
    assert {r["variant"] for r in lb} == set(board)
    def written() -> dict:  # what a variant that trained again would rewrite
        return {(n, f): (tmp_path / "run" / n / f).stat().st_mtime_ns
                for n in board for f in ("metrics.csv", "best.pt", "status.json")}

    before = written()
    again = run(TrainConfig.model_validate(train_cfg(kd_data, tmp_path / "run", variants=variants)))
    assert written() == before  # finished variants are skipped: no epoch, checkpoint or status written again
    assert [r["epochs"] for r in again.leaderboard] == [r["epochs"] for r in res.leaderboard]


def test_join_errors_name_the_shard(kd_data, tmp_path):
    root = kd_data["root"]
    extra = tmp_path / "shards2"
    extra.mkdir(exist_ok=True)
    from helpers import mnist_shard

    mnist_shard(extra / "train-000099.tar", 10)
    cfg = train_cfg(kd_data, tmp_path / "r", data={**train_cfg(kd_data, tmp_path)["data"],
                                                   "train_shards": [str(extra / "train-000099.tar")]})
    with pytest.raises(DataJoinError, match="train-000099.tar: no cache file"):
        run(TrainConfig.model_validate(cfg))
    # a shard rewritten after caching
    changed = extra / "train-000001.tar"
    shutil.copy(root / "shards" / "train-000001.tar", changed)
    mnist_shard(changed, 60, offset=999)
    cfg["data"]["train_shards"] = [str(changed)]
    with pytest.raises(DataJoinError, match="train-000001.tar: changed since it was cached"):
        run(TrainConfig.model_validate(cfg))
    # a teacher that did not write this cache
    from helpers import save_teacher

    other = save_teacher(tmp_path / "other.pt", seed=5)
    cfg = train_cfg(kd_data, tmp_path / "r", teacher={**kd_data["teacher"], "checkpoint": str(other)})
    with pytest.raises(CacheError, match="no cache written by the configured teacher"):
        run(TrainConfig.model_validate(cfg))


def test_unknown_schema_version_names_the_file(kd_data, tmp_path):
    cache = tmp_path / "cache"
    shutil.copytree(kd_data["cache_dir"], cache / kd_data["cache_dir"].name)
    d = cache / kd_data["cache_dir"].name
    from distill.images.shards import file_sha256
    from distill.teacher_cache.manifest import Manifest

    m = Manifest.load(d)
    f = d / m.shards["train-000000"].file  # content-addressed: s-<sha>.parquet
    t = pq.read_table(f)
    meta = dict(t.schema.metadata)
    meta[b"distill.schema_version"] = b"99"
    pq.write_table(t.replace_schema_metadata(meta), f)
    m.shards["train-000000"].file_sha256 = file_sha256(f)
    m.shards["train-000000"].file_bytes = f.stat().st_size
    m.save(d)
    cfg = train_cfg(kd_data, tmp_path / "r")
    cfg["data"]["cache_root"] = str(cache)
    cfg["data"]["train_shards"] = [kd_data["train"][0].replace("*", "000000")]
    with pytest.raises(CacheError, match=rf"{f.name}: cache schema version 99 is not supported"):
        run(TrainConfig.model_validate(cfg))


def test_torchrun_two_processes(kd_data, tmp_path):
    cfg = train_cfg(kd_data, tmp_path / "run", base={"arch": "cnn_small", "arch_kwargs": {"width": 4}, "epochs": 2,
                                                     "batch_size": 16, "name": "ddp", "zero_stage": 1})
    f = tmp_path / "train.yaml"
    f.write_text(yaml.safe_dump(cfg))
    distill = shutil.which("distill", path=os.path.dirname(sys.executable))
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr",
                        "127.0.0.1", "--master_port", "29581", distill, "train", "-c", str(f), "--variant", "ddp"],
                       capture_output=True, text=True, timeout=400)
    assert r.returncode == 0, r.stderr[-3000:]
    metrics = pd.read_csv(tmp_path / "run" / "ddp" / "metrics.csv")
    assert list(metrics["epoch"]) == [1, 2]
    assert (metrics["train_samples"] == 240).all()  # both ranks together: every sample once
    assert "ddp" in r.stdout and "done" in r.stdout


def test_ray_tune_two_variants_one_nan(kd_data, tmp_path, ray_local):
    cfg = train_cfg(kd_data, tmp_path / "run", ray={"enabled": True},
                    base={"arch": "cnn_small", "arch_kwargs": {"width": 4}, "epochs": 2, "batch_size": 32,
                          "num_workers": 2, "cpus_per_worker": 0.45},
                    variants=[{"name": "good"}, {"name": "nan", "optimizer": "sgd", "lr": 1e12, "clip_grad": None}],
                    tune={"max_concurrent": 2, "cpus_per_trial": 0.05, "max_failures": 0, "asha": True,
                          "asha_grace_epochs": 1}, metrics_port=0)
    from distill.student_train.ray_runner import live_placement_groups

    before = live_placement_groups()
    res = run(TrainConfig.model_validate(cfg))
    # nothing stays reserved after the sweep (a failed trial's worker group used to keep its CPUs): removal was
    # asked for every group; a starved GCS may take a while to mark them removed (the bound is against a hang)
    deadline = time.monotonic() + 120
    while live_placement_groups() - before and time.monotonic() < deadline:
        time.sleep(0.5)
    assert not live_placement_groups() - before
    board = {r["variant"]: r for r in res.leaderboard}
    assert board["good"]["status"] == "done" and board["good"]["epochs"] == 2
    assert board["nan"]["status"] == "failed" and "non-finite loss" in board["nan"]["reason"]
    assert res.status == "partial"
    metrics = pd.read_csv(tmp_path / "run" / "good" / "metrics.csv")
    assert (metrics["train_samples"] == 240).all()
    # one trial for both (one stream): one scrape target per rank of the group, the series carry each variant
    assert board["good"]["group"] == board["nan"]["group"] == "g1"
    targets = sorted(p.name for p in (tmp_path / "run" / "metrics_targets").iterdir())
    assert "g1-rank0.json" in targets and "g1-rank1.json" in targets


def test_ray_resume_after_worker_killed(kd_data, tmp_path, ray_local):
    cfg = train_cfg(kd_data, tmp_path / "run", ray={"enabled": True},
                    base={"name": "resume", "arch": "cnn_small", "arch_kwargs": {"width": 4}, "epochs": 4,
                          "batch_size": 8, "num_workers": 1, "cpus_per_worker": 0.5},
                    tune={"max_failures": 2})
    import threading

    from helpers import hold_training_after

    killed = {}
    out = tmp_path / "run" / "resume"
    hold = hold_training_after(out, 1)  # the worker waits after epoch 1 until it is killed: it cannot finish first

    def killer():
        deadline = time.monotonic() + 600  # only against a hang: the hold keeps the worker there
        while time.monotonic() < deadline:
            csv = out / "metrics.csv"
            if csv.exists() and len(csv.read_text().splitlines()) >= 2:  # header + epoch 1
                pid = int((out / "worker-rank0.pid").read_text())
                os.kill(pid, signal.SIGKILL)
                killed["pid"] = pid
                hold.release()  # the restarted worker resumes after epoch 1 and is never held
                return
            time.sleep(0.05)

    t = threading.Thread(target=killer, daemon=True)
    t.start()
    try:
        res = run(TrainConfig.model_validate(cfg))
    finally:
        hold.release()
    t.join(timeout=60)
    assert killed, "the worker was never killed; the test did not test resume"
    row = res.leaderboard[0]
    assert row["status"] == "done", row
    metrics = pd.read_csv(tmp_path / "run" / "resume" / "metrics.csv")
    assert metrics["epoch"].tolist() == [1, 2, 3, 4]  # killed after epoch 1 was sealed: resumed, nothing redone
    new_pid = int((tmp_path / "run" / "resume" / "worker-rank0.pid").read_text())
    assert new_pid != killed["pid"]


_ = pa
