"""best.pt: written on the first epoch with or without validation, at train losses above and below 1."""

import json
from pathlib import Path

import pytest
import torch

from distill.images.preprocessing import Preprocessing
from distill.student_train.config import VariantConfig
from distill.student_train.job import JobSpec
from distill.student_train.student import epoch_score, is_better, save_best


def _job(tmp_path: Path) -> JobSpec:
    prep = Preprocessing(32, 0.875, (0.5,), (0.5,), "bilinear", 1)
    return JobSpec(run_dir=tmp_path, cache_dir=tmp_path, train=[], val=[], num_classes=10, num_views=1,
                   teacher_prep=prep)


@pytest.mark.parametrize("loss", [2.7, 0.4])
def test_without_validation_first_epoch_writes_best(tmp_path, loss):
    """Before the fix: loss 2.7 never beat the initial -1 (no best.pt); loss 0.4 raised KeyError 'val_top1'."""
    row = {"epoch": 1, "train_loss": loss}
    what, score = epoch_score(row)
    assert what == "neg_train_loss" and score == -loss
    assert is_better(score, None)
    save_best(torch.nn.Linear(3, 10).state_dict(), VariantConfig(), _job(tmp_path), tmp_path, row, what, score)
    assert set(torch.load(tmp_path / "best.pt", weights_only=True)) == {"weight", "bias"}
    info = json.loads((tmp_path / "arch.json").read_text())
    assert info["val_top1"] is None and info["best_by"] == "neg_train_loss" and info["best_score"] == -loss
    assert not list(tmp_path.glob("*.tmp"))


@pytest.mark.parametrize("loss", [2.7, 0.4])
def test_with_validation_the_score_is_val_top1(tmp_path, loss):
    row = {"epoch": 1, "train_loss": loss, "val_top1": 0.3, "val_teacher_agreement": 0.9}
    assert epoch_score(row) == ("val_top1", 0.3)
    assert is_better(0.3, None) and is_better(0.31, 0.3) and not is_better(0.3, 0.3)
    save_best(torch.nn.Linear(3, 10).state_dict(), VariantConfig(), _job(tmp_path), tmp_path, row, "val_top1", 0.3)
    assert json.loads((tmp_path / "arch.json").read_text())["val_top1"] == 0.3


def test_unlabelled_validation_falls_back_to_teacher_agreement():
    assert epoch_score({"train_loss": 3.0, "val_top1": None, "val_teacher_agreement": 0.7}) == \
        ("val_teacher_agreement", 0.7)
    assert is_better(-3.0, -3.5) and not is_better(-3.5, -3.0)
