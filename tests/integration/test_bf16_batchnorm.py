"""BatchNorm statistics stay fp32 under bf16 training (issue 21 §9), through the real training path on the CPU.

The student's first layer is a BatchNorm with momentum=None (its running mean = the mean of its batch means), fed
inputs around 5.6 (the student's own normalisation, mean -1, std 0.2). In bf16 the running mean is rounded to 8
significant bits after every update (steps of 1/32 near 5.6), so it ends 0.01-0.02 away from the true mean; in
fp32 it equals the mean of the batch means of the (bf16) inputs to float precision.
"""

from __future__ import annotations

import pytest
import torch
from conftest import train_cfg
from torch import nn

from distill.student_train.config import TrainConfig
from distill.student_train.job_plan import plan_job
from distill.student_train.train_loop import Stream, WorkerContext, _loader, _spec, train_variant

pytestmark = pytest.mark.integration


def test_bf16_training_keeps_batchnorm_running_mean_exact(kd_data, tmp_path):
    cfg = TrainConfig.model_validate(train_cfg(kd_data, tmp_path / "run", base={
        "name": "bn", "epochs": 1, "batch_size": 32, "precision": "bf16", "mean": [-1.0], "std": [0.2],
        "mode": "none", "views": 1}))
    job = plan_job(cfg)
    [(name, v)] = cfg.expand()
    torch.manual_seed(0)
    model = nn.Sequential(nn.BatchNorm2d(1, momentum=None), nn.Conv2d(1, 4, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                          nn.Flatten(), nn.Linear(4, 10))
    train_variant(name, v, job, WorkerContext(), model=model)
    running = torch.load(tmp_path / "run" / "bn" / "best.pt", weights_only=True)["0.running_mean"]
    # the same batches, as the student saw them: bf16 inputs, one mean per batch, averaged
    means = [b["pixels"].to(torch.bfloat16).double().mean() for b in _loader(
        _spec(job, Stream(v, 1, 1, 0), job.train, 0, True, WorkerContext()), torch.device("cpu"))]
    want = torch.stack(means).mean()
    assert 5.0 < want < 6.5  # the premise: inputs where bf16 has steps of 1/32
    assert abs(float(running) - float(want)) < 1e-4, (float(running), float(want))
