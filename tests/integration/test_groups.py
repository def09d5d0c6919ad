"""One data stream, many students (issue 22): real shards, a real cache, real DeepSpeed on the CPU (fp32).

A group trains each student exactly as it would train alone (bitwise: same batches, own engine, own seed); a
diverging student leaves its group without touching the others; a group killed mid-epoch resumes every student
from its own last epoch; students fused into one model match the looped students within float tolerance."""

from __future__ import annotations

import fcntl
import json
import os
import signal
import subprocess
import sys

import pandas as pd
import pytest
import torch
import yaml
from conftest import train_cfg

from distill.student_train.checkpoints import _allowed_globals
from distill.student_train.config import TrainConfig
from distill.student_train.run import run

pytestmark = pytest.mark.integration

BASE = {"arch": "cnn_small", "arch_kwargs": {"width": 4}, "epochs": 2, "batch_size": 32}
THREE = [{"name": "a", "alpha": 0.5, "temperature": 2.0, "lr": 2e-3},
         {"name": "b", "alpha": 0.9, "temperature": 4.0, "lr": 4e-3},
         {"name": "c", "alpha": 0.7, "temperature": 1.0, "lr": 1e-3, "mode": "hard"}]


def _cfg(kd_data, run_dir, variants, **over):
    return TrainConfig.model_validate(train_cfg(kd_data, run_dir, base=dict(BASE, **over.pop("base", {})),
                                                variants=variants, **over))


def _best(run_dir, name):
    return torch.load(run_dir / name / "best.pt", weights_only=True)


def _last_weights(run_dir, name):
    """The module state of the student's newest checkpoint (DeepSpeed's, or a fused student's own file)."""
    ckpt = run_dir / name / "ds_ckpt"
    tag = ckpt / (ckpt / "latest").read_text()
    with torch.serialization.safe_globals(_allowed_globals()):
        if (tag / "fused_student.pt").exists():
            return torch.load(tag / "fused_student.pt", weights_only=True)["module"]
        return torch.load(tag / "mp_rank_00_model_states.pt", weights_only=True)["module"]


def _equal(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_a_group_trains_each_student_as_it_would_train_alone(kd_data, tmp_path):
    res = run(_cfg(kd_data, tmp_path / "group", THREE))
    assert res.status == "success", res.leaderboard
    plan = (tmp_path / "group" / "plan.txt").read_text()
    assert "1 group(s)" in plan and "g1: a, b, c" in plan
    board = {r["variant"]: r for r in res.leaderboard}
    assert {r["group"] for r in board.values()} == {"g1"}
    assert json.loads((tmp_path / "group" / "b" / "status.json").read_text())["group"] == "g1"
    for name in "abc":
        metrics = pd.read_csv(tmp_path / "group" / name / "metrics.csv")
        assert metrics["epoch"].tolist() == [1, 2] and (metrics["train_samples"] == 240).all()
    assert not _equal(_best(tmp_path / "group", "a"), _best(tmp_path / "group", "b"))  # they did differ

    alone = run(_cfg(kd_data, tmp_path / "alone", THREE), only="b")  # `distill train --variant b`
    assert alone.status == "success"
    assert _equal(_best(tmp_path / "alone", "b"), _best(tmp_path / "group", "b"))
    assert _equal(_last_weights(tmp_path / "alone", "b"), _last_weights(tmp_path / "group", "b"))


def test_a_diverging_student_fails_alone_and_the_others_are_untouched(kd_data, tmp_path):
    nan = {"name": "nan", "optimizer": "sgd", "lr": 1e12, "clip_grad": None}
    res = run(_cfg(kd_data, tmp_path / "with", [THREE[0], nan, THREE[1]], log_every=2))
    board = {r["variant"]: r for r in res.leaderboard}
    assert board["nan"]["status"] == "failed" and "non-finite loss" in board["nan"]["reason"], board["nan"]
    assert board["a"]["status"] == board["b"]["status"] == "done" and res.status == "partial"
    assert board["nan"]["group"] == board["a"]["group"] == "g1"
    without = run(_cfg(kd_data, tmp_path / "without", [THREE[0], THREE[1]], log_every=2))
    assert without.status == "success"
    for name in "ab":
        assert _equal(_last_weights(tmp_path / "with", name), _last_weights(tmp_path / "without", name))
        assert _equal(_best(tmp_path / "with", name), _best(tmp_path / "without", name))


def _train_cli(cfg_path, **kw) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "distill", "train", "-c", str(cfg_path), "--no-ray"],
                            env={**os.environ, "PYTHONUNBUFFERED": "1"}, **kw)


def test_a_group_killed_mid_epoch_resumes_each_student_from_its_own_last_epoch(kd_data, tmp_path):
    """The kill is gated by a pipe: the trainer logs every step into a 4 KiB pipe the test stops draining once it
    reads 'epoch 2 step 1/', so the trainer cannot get more than ~30 steps further (of 120) before SIGKILL."""
    variants = [dict(v, epochs=3, batch_size=2) for v in THREE]
    paths = {}
    for key in ("killed", "whole"):
        cfg = train_cfg(kd_data, tmp_path / key, base=BASE, variants=variants, log_every=1)
        paths[key] = tmp_path / f"{key}.yaml"
        paths[key].write_text(yaml.safe_dump(cfg))
    r, w = os.pipe()
    fcntl.fcntl(w, fcntl.F_SETPIPE_SZ, 4096)
    proc = _train_cli(paths["killed"], stdout=w, stderr=w)
    os.close(w)
    seen = []
    with os.fdopen(r, "r", errors="replace") as lines:
        for line in lines:
            seen.append(line)
            if "] epoch 2 step 1/120" in line:
                proc.send_signal(signal.SIGKILL)
                break
    proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL, "".join(seen[-30:])
    for name in "abc":  # the kill landed in epoch 2: every student had finished epoch 1 only
        assert pd.read_csv(tmp_path / "killed" / name / "metrics.csv")["epoch"].tolist() == [1]
    again = _train_cli(paths["killed"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    out = again.communicate(timeout=600)[0]
    assert again.returncode == 0, out[-3000:]
    assert "resumed after epoch 1" in out
    whole = _train_cli(paths["whole"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    assert whole.wait(timeout=600) == 0
    for name in "abc":
        assert pd.read_csv(tmp_path / "killed" / name / "metrics.csv")["epoch"].tolist() == [1, 2, 3]
        assert json.loads((tmp_path / "killed" / name / "status.json").read_text())["status"] == "done"
        assert _equal(_last_weights(tmp_path / "killed", name), _last_weights(tmp_path / "whole", name))


def test_fused_students_match_looped_ones_and_resume_from_their_own_files(kd_data, tmp_path):
    """Tolerance, and why: the fused model computes the same sums in another order (grouped convolutions, batched
    matmuls). In float32 that order matters here: the first convolution's gradient is a sum of ~30k products that
    cancel, and differs from its float64 value by ~2e-3 relative even when looped (measured; fused and looped
    agree to 1e-16 in float64, tests/unit/test_fused.py). Adam's normalised steps carry such differences along:
    after 16 steps the weights agree to 6e-3 at most (measured) and the epoch losses to 0.2%; BatchNorm running
    means, averages of activations that sum many such weights, to 0.04. Asserted: weights 1e-2 + 1% of the value,
    running statistics 0.1 + 10%, losses 1% (a schedule bug, base lr overwritten by the scheduled one, moved the
    weights by 5e-2 and the losses by 7% in this very test)."""
    looped = run(_cfg(kd_data, tmp_path / "looped", THREE, horizontal="off"))
    fused = run(_cfg(kd_data, tmp_path / "fused", THREE, horizontal="on"))
    assert looped.status == fused.status == "success"
    assert "fused into one model (same architecture): a, b, c" in (tmp_path / "fused" / "plan.txt").read_text()
    for name in "abc":
        assert (tmp_path / "fused" / name / "ds_ckpt" / "epoch1" / "fused_student.pt").exists()
        want, got = _last_weights(tmp_path / "looped", name), _last_weights(tmp_path / "fused", name)
        for key in want:
            tol = 0.1 if "running" in key else 1e-2  # running means of activations sum many such weights
            torch.testing.assert_close(got[key].float(), want[key].float(), rtol=tol, atol=tol,
                                       msg=lambda m, key=key, name=name: f"{name} {key}: {m}")
        losses = [pd.read_csv(tmp_path / d / name / "metrics.csv")["train_loss"] for d in ("looped", "fused")]
        assert ((losses[1] - losses[0]).abs() <= 0.01 * losses[0]).all(), losses
        assert _best(tmp_path / "fused", name).keys() == _best(tmp_path / "looped", name).keys()
    # an interruption after epoch 1: the fused group resumes each student from its own file, and ends where the
    # uninterrupted fused run ended (bitwise: the same fused arithmetic)
    import shutil

    shutil.copytree(tmp_path / "fused", tmp_path / "cut")
    for name in "abc":
        out = tmp_path / "cut" / name
        shutil.rmtree(out / "ds_ckpt" / "epoch1")
        (out / "ds_ckpt" / "latest").write_text("epoch0")
        (out / "metrics.csv").write_text("".join((out / "metrics.csv").read_text().splitlines(True)[:2]))
        (out / "status.json").write_text(json.dumps({"status": "interrupted"}))
    again = run(_cfg(kd_data, tmp_path / "cut", THREE, horizontal="on"))
    assert again.status == "success"
    for name in "abc":
        assert pd.read_csv(tmp_path / "cut" / name / "metrics.csv")["epoch"].tolist() == [1, 2]
        assert _equal(_last_weights(tmp_path / "cut", name), _last_weights(tmp_path / "fused", name))
