"""Training survives damaged state: sealed checkpoints with fallback, weights_only resume, rank-local failures
under torchrun, ASHA's real early stop, infeasible resources refused in seconds (issue 10)."""

import json
import os
import shutil
import subprocess
import sys
import time

import pandas as pd
import pytest
import torch
import yaml
from conftest import train_cfg

from distill.student_train.config import TrainConfig
from distill.student_train.run import run
from distill.student_train.status import finished, read_status, write_status

pytestmark = pytest.mark.integration


class _Evil:
    """Unpickling this creates a marker file: stands for any code a planted checkpoint would run."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def _cfg(kd_data, run_dir, epochs):
    return TrainConfig.model_validate(train_cfg(kd_data, run_dir, base={
        "name": "ck", "arch": "cnn_small", "arch_kwargs": {"width": 4}, "epochs": epochs, "batch_size": 32}))


def _epochs(run_dir):
    return pd.read_csv(run_dir / "ck" / "metrics.csv")["epoch"].tolist()


def test_checkpoints_sealed_pruned_fallback_and_no_unpickling(kd_data, tmp_path):
    run_dir = tmp_path / "run"
    ckpt = run_dir / "ck" / "ds_ckpt"
    assert run(_cfg(kd_data, run_dir, 3)).status == "success"
    assert sorted(p.name for p in ckpt.iterdir() if p.is_dir()) == ["epoch1", "epoch2"]  # only the last 2 kept
    assert (ckpt / "latest").read_text() == "epoch2"
    assert json.loads((ckpt / "epoch2" / "distill_digests.json").read_text())

    # a damaged last tag (crash mid-save, full disk): resume falls back to the tag before
    states = ckpt / "epoch2" / "mp_rank_00_model_states.pt"
    states.write_bytes(states.read_bytes()[:100])
    write_status(run_dir, "ck", "running")  # the run was interrupted
    assert run(_cfg(kd_data, run_dir, 4)).status == "success"
    assert _epochs(run_dir) == [1, 2, 3, 3, 4]  # epoch 3 again (from epoch2's tag = after epoch 2), then 4

    # a planted pickle: refused whether or not its digest was forged, and its code never runs
    marker = tmp_path / "pwned"
    states = ckpt / "epoch3" / "mp_rank_00_model_states.pt"
    torch.save({"module": _Evil(marker)}, states)
    write_status(run_dir, "ck", "running")
    res = run(_cfg(kd_data, run_dir, 5))  # digest mismatch: skipped, resumes from epoch2's tag
    assert res.status == "success" and not marker.exists()
    assert _epochs(run_dir)[-2:] == [4, 5]
    tag = ckpt / "epoch4"
    states = tag / "mp_rank_00_model_states.pt"
    torch.save({"module": _Evil(marker)}, states)
    digests = json.loads((tag / "distill_digests.json").read_text())
    from distill.core.atomic_io import file_sha256

    digests[states.name] = file_sha256(states)  # someone who can write the file can rewrite its digest too
    (tag / "distill_digests.json").write_text(json.dumps(digests))
    write_status(run_dir, "ck", "running")
    res = run(_cfg(kd_data, run_dir, 6))
    assert not marker.exists(), "resume ran code from a checkpoint"
    row = res.leaderboard[0]
    assert row["status"] == "failed" and "refused to load" in row["reason"] and "epoch4" in row["reason"]


def test_damaged_status_json_does_not_wedge_later_runs(kd_data, tmp_path):
    run_dir = tmp_path / "run"
    assert run(_cfg(kd_data, run_dir, 1)).status == "success"
    (run_dir / "ck" / "status.json").write_text("")  # what a full disk left behind
    res = run(_cfg(kd_data, run_dir, 1))  # resumes: the checkpoint says epoch 1 of 1 is done
    assert res.status == "success" and _epochs(run_dir) == [1]
    assert read_status(run_dir, "ck")["status"] == "done"


def test_torchrun_rank_local_failure_ends_with_status(kd_data, tmp_path):
    """Rank 0 cannot write metrics.csv after epoch 1 (like ENOSPC on rank 0) while rank 1 trains on."""
    cfg = train_cfg(kd_data, tmp_path / "run", base={"arch": "cnn_small", "arch_kwargs": {"width": 4}, "epochs": 3,
                                                     "batch_size": 16, "name": "ddp"})
    (tmp_path / "run" / "ddp" / "metrics.csv").mkdir(parents=True)
    f = tmp_path / "train.yaml"
    f.write_text(yaml.safe_dump(cfg))
    distill = shutil.which("distill", path=os.path.dirname(sys.executable))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
           "--master_port", "29583", distill, "train", "-c", str(f), "--variant", "ddp"]
    # the job must end (a hang here is a failure the timeout turns into an error, not a speed limit)
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert r.returncode != 0
    st = read_status(tmp_path / "run", "ddp")
    assert st["status"] == "failed" and st["reason"].startswith("rank 0: IsADirectoryError"), (st, r.stderr[-2000:])
    # the next launch resumes both ranks from the epoch-1 checkpoint (one tag agreed by all ranks)
    (tmp_path / "run" / "ddp" / "metrics.csv").rmdir()
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    assert read_status(tmp_path / "run", "ddp")["status"] == "done"
    assert pd.read_csv(tmp_path / "run" / "ddp" / "metrics.csv")["epoch"].tolist() == [2, 3]


def test_asha_stops_a_weak_variant(kd_data, tmp_path, ray_local):
    cfg = train_cfg(kd_data, tmp_path / "run", ray={"enabled": True},
                    base={"arch": "cnn_small", "arch_kwargs": {"width": 4}, "epochs": 2, "batch_size": 8,
                          "warmup_epochs": 0, "num_workers": 1, "cpus_per_worker": 0.5},
                    variants=[{"name": "good", "lr": 5e-3}, {"name": "weak", "optimizer": "sgd", "lr": 1e-12}],
                    tune={"max_concurrent": 1, "cpus_per_trial": 0.05, "max_failures": 0, "asha": True,
                          "asha_grace_epochs": 1, "asha_reduction_factor": 2.0})
    res = run(TrainConfig.model_validate(cfg))
    board = {r["variant"]: r for r in res.leaderboard}
    assert board["good"]["status"] == "done" and board["good"]["epochs"] == 2
    weak = read_status(tmp_path / "run", "weak")
    assert weak["status"] == "stopped" and "stopped early by ASHA after 1 epoch" in weak["reason"], board
    rows = {n: pd.read_csv(tmp_path / "run" / n / "metrics.csv") for n in ("good", "weak")}
    assert rows["weak"]["val_top1"][0] < rows["good"]["val_top1"][0]  # the premise: weak really is worse
    assert finished(tmp_path / "run", "weak")  # ASHA's stop is final: not retrained by the next run


def test_infeasible_resources_fail_fast(kd_data, tmp_path, ray_local):
    from helpers import cache_cfg_dict

    from distill.core.ray_cluster import InfeasibleResourcesError
    from distill.teacher_cache.config import CacheConfig
    from distill.teacher_cache.run import run as cache_run

    class Hog:  # holds the cluster's CPUs, as another job would (defined here: Ray ships it by value)
        def ping(self):
            return True

    cfg = cache_cfg_dict(kd_data["train"], str(tmp_path / "cache"), kd_data["teacher"]["checkpoint"])
    # refused without waiting: the start deadline is far beyond the test's timeout, so only the feasibility check
    # (not a deadline, not the machine's speed) can end this call in time
    cfg["ray"] = {**cfg.get("ray", {}), "enabled": True, "gpus_per_actor": 1, "actor_start_deadline_s": 86400}
    with pytest.raises(InfeasibleResourcesError) as info:
        cache_run(CacheConfig.model_validate(cfg))
    assert "needs CPU=1, GPU=1" in str(info.value) and "GPU=0 in total" in str(info.value)

    # feasible on paper but never placed (another job holds the CPUs): a deadline, not an endless wait
    deadline = time.monotonic() + 600  # actors of earlier tests may still be exiting; placement groups must not stay
    while ray_local.available_resources().get("CPU", 0) < 2 and time.monotonic() < deadline:
        time.sleep(0.5)
    assert ray_local.available_resources().get("CPU", 0) == 2, "an earlier test left CPUs reserved"
    hog = ray_local.remote(num_cpus=2)(Hog).remote()
    ray_local.get(hog.ping.remote(), timeout=600)
    cfg["ray"] = {**cfg["ray"], "gpus_per_actor": 0, "cpus_per_actor": 1, "actor_start_deadline_s": 5}
    try:
        res = cache_run(CacheConfig.model_validate(cfg))
        assert res.status == "failure" and res.failed
        assert all("none started within 5 s (ray.actor_start_deadline_s)" in m for m in res.failed.values())
    finally:
        ray_local.kill(hog)

    tcfg = train_cfg(kd_data, tmp_path / "run", ray={"enabled": True},
                     base={"arch": "cnn_small", "epochs": 1, "num_workers": 1, "cpus_per_worker": 0.5,
                           "gpus_per_worker": 1},
                     tune={"start_timeout_s": 86400})  # as above: only the feasibility check ends it in time
    with pytest.raises(InfeasibleResourcesError, match="variant .* needs .*GPU=1"):
        run(TrainConfig.model_validate(tcfg))
