"""Epoch loss means: the CE term is averaged over labelled rows only, everything else over all rows."""

import pytest
import torch
import torch.nn.functional as F

from distill.student_train.epoch_losses import EpochLosses
from distill.student_train.losses import create_loss


def _batch(logits: torch.Tensor, labels: list[int], weight: list[float] | None = None) -> dict[str, torch.Tensor]:
    n = len(labels)
    return {"label": torch.tensor(labels), "weight": torch.tensor(weight or [1.0] * n),
            "teacher_logp": {2.0: F.log_softmax(torch.randn(n, logits.shape[1]) / 2, dim=1)}}  # at the loss's T


def test_task_loss_is_the_mean_ce_of_labelled_rows_beside_a_pool():
    torch.manual_seed(0)
    loss_fn = create_loss("soft", alpha=0.5, temperature=2.0)
    acc = EpochLosses(torch.device("cpu"))
    logits = [torch.randn(4, 10) for _ in range(3)]
    batches = [_batch(logits[0], [-1, -1, -1, -1]),        # pool rows only: no CE term
               _batch(logits[1], [3, 1, 4, 1]),            # labelled rows only
               _batch(logits[2], [5, -1, 9, -1], [1.0, 1.0, 1.0, 0.0])]  # mixed, one padding row
    outs = []
    for lg, b in zip(logits, batches, strict=True):
        out = loss_fn(lg, b)
        acc.add(out, b)
        outs.append(out)
    got = acc.means()
    labelled = torch.cat([logits[1], logits[2][[0, 2]]])
    ce_ref = F.cross_entropy(labelled, torch.tensor([3, 1, 4, 1, 5, 9]))
    assert got["task_loss"] == pytest.approx(float(ce_ref), rel=1e-6)  # 6 labelled rows, not 11 rows
    assert got["train_samples"] == 11
    kd_ref = (4 * outs[0]["kd_loss"] + 4 * outs[1]["kd_loss"] + 3 * outs[2]["kd_loss"]) / 11
    assert got["kd_loss"] == pytest.approx(float(kd_ref), rel=1e-6)


def test_all_labelled_epoch_task_loss_equals_the_plain_loss():
    torch.manual_seed(1)
    loss_fn = create_loss("none")
    acc = EpochLosses(torch.device("cpu"))
    for _ in range(2):
        lg = torch.randn(5, 10)
        b = _batch(lg, [0, 1, 2, 3, 4])
        acc.add(loss_fn(lg, b), b)
    got = acc.means()
    assert got["task_loss"] == pytest.approx(got["train_loss"]) and got["train_samples"] == 10


def test_an_epoch_without_labelled_rows_reports_zero_task_loss():
    acc = EpochLosses(torch.device("cpu"))
    lg = torch.randn(3, 10)
    b = _batch(lg, [-1, -1, -1])
    acc.add(create_loss("soft", alpha=0.5, temperature=2.0)(lg, b), b)
    assert acc.means()["task_loss"] == 0.0 and acc.means()["kd_loss"] > 0
