"""KD losses against a dense reference computed straight from full teacher logits."""

import pytest
import torch
import torch.nn.functional as F

from distill.student_train.losses import create_loss
from distill.teacher_cache.topk import pack_topk, rebuild_log_probs


def _setup(n=16, c=10, seed=0):
    g = torch.Generator().manual_seed(seed)
    teacher = torch.randn(n, c, generator=g) * 3
    student = torch.randn(n, c, generator=g) * 2
    label = torch.randint(0, c, (n,), generator=g)
    return teacher, student, label


def _batch(teacher, label, k, temperature, weight=None):
    ids, vals, tail = pack_topk(teacher, k)
    c = teacher.shape[1]
    logp = rebuild_log_probs(ids.to(torch.int16), vals.half(), tail, c, temperature)
    return {"label": label, "teacher_logp": {temperature: logp}, "teacher_top1": ids[:, 0],
            "weight": torch.ones(len(label)) if weight is None else weight}


def _dense_reference(teacher, student, label, alpha, t):
    p = F.softmax(teacher / t, 1)
    kl = (p * (F.log_softmax(teacher / t, 1) - F.log_softmax(student / t, 1))).sum(1).mean()
    return alpha * t * t * kl + (1 - alpha) * F.cross_entropy(student, label)


@pytest.mark.parametrize("alpha,t", [(1.0, 1.0), (0.9, 4.0), (0.5, 2.0), (0.0, 3.0)])
def test_soft_loss_with_full_k_equals_dense_reference(alpha, t):
    teacher, student, label = _setup()
    out = create_loss("soft", alpha, t)(student, _batch(teacher, label, 10, t))
    ref = _dense_reference(teacher, student, label, alpha, t)
    assert torch.allclose(out["loss"], ref, rtol=2e-3, atol=2e-4)
    assert torch.allclose(out["task_loss"], F.cross_entropy(student, label)) or alpha == 1.0


def test_temperature_scaling_and_alpha_mixing():
    teacher, student, label = _setup()
    kd = {t: create_loss("soft", 1.0, t)(student, _batch(teacher, label, 10, t))["kd_loss"] for t in (1.0, 4.0)}
    ref4 = 16 * (F.softmax(teacher / 4, 1) * (F.log_softmax(teacher / 4, 1) - F.log_softmax(student / 4, 1))).sum(1)
    assert torch.allclose(kd[4.0], ref4.mean(), rtol=2e-3)
    mixed = create_loss("soft", 0.3, 4.0)(student, _batch(teacher, label, 10, 4.0))
    assert torch.allclose(mixed["loss"], 0.3 * mixed["kd_loss"] + 0.7 * mixed["task_loss"])


def test_topk_cache_error_shrinks_with_k():
    teacher, student, label = _setup(c=100)
    teacher[:, :3] += 12  # a confident teacher, as after training
    dense = _dense_reference(teacher, student, label, 1.0, 2.0)
    errs = [abs(float(create_loss("soft", 1.0, 2.0)(student, _batch(teacher, label, k, 2.0))["loss"] - dense))
            for k in (3, 10, 50, 100)]
    assert errs[0] > errs[1] > errs[2] > errs[3]
    assert errs[3] / float(dense) < 1e-3


def test_hard_mode_targets_teacher_argmax():
    teacher, student, label = _setup()
    out = create_loss("hard", 0.75, 9.0)(student, _batch(teacher, label, 3, 1.0))
    ref = 0.75 * F.cross_entropy(student, teacher.argmax(1)) + 0.25 * F.cross_entropy(student, label)
    assert torch.allclose(out["loss"], ref, rtol=1e-5)


def test_padding_rows_and_unlabelled_rows_contribute_nothing():
    teacher, student, label = _setup(n=8)
    w = torch.tensor([1, 1, 1, 1, 0, 0, 0, 0], dtype=torch.float32)
    full = create_loss("soft", 0.5, 2.0)(student, _batch(teacher, label, 10, 2.0, w))
    half = create_loss("soft", 0.5, 2.0)(student[:4], _batch(teacher[:4], label[:4], 10, 2.0))
    assert torch.allclose(full["loss"], half["loss"], rtol=1e-5)
    unl = label.clone()
    unl[::2] = -1
    ce = create_loss("none")(student, {"label": unl, "weight": torch.ones(8)})["loss"]
    assert torch.allclose(ce, F.cross_entropy(student[1::2], label[1::2]), rtol=1e-5)


def test_unknown_mode_lists_valid_ones():
    with pytest.raises(ValueError, match=r"unknown distillation mode 'soft2'; valid: \['hard', 'none'"):
        create_loss("soft2")


@pytest.mark.parametrize("mode", ["soft", "hard"])
def test_unlabelled_rows_give_zero_ce_weight_and_a_correct_kd_term(mode):
    """Rows with label -1 (new data without labels): KD on every row, CE on the labelled rows only."""
    teacher, student, label = _setup(n=12)
    unl = torch.tensor([i % 3 != 0 for i in range(12)])  # two of three rows unlabelled
    label = torch.where(unl, torch.full_like(label, -1), label)
    student = student.clone().requires_grad_(True)
    alpha, t = 0.7, 2.0
    out = create_loss(mode, alpha, t)(student, _batch(teacher, label, 10, t))
    if mode == "soft":
        p = F.softmax(teacher / t, 1)
        kd_ref = t * t * (p * (F.log_softmax(teacher / t, 1) - F.log_softmax(student / t, 1))).sum(1).mean()
    else:
        kd_ref = F.cross_entropy(student, teacher.argmax(1))
    ce_ref = F.cross_entropy(student[~unl], label[~unl])  # dense reference over the labelled rows only
    assert torch.allclose(out["kd_loss"], kd_ref, rtol=2e-3, atol=2e-4)
    assert torch.allclose(out["task_loss"], ce_ref, rtol=1e-5)
    assert torch.allclose(out["loss"], alpha * kd_ref + (1 - alpha) * ce_ref, rtol=2e-3, atol=2e-4)
    (grad_ce,) = torch.autograd.grad(out["task_loss"], student, retain_graph=True)
    assert torch.all(grad_ce[unl] == 0) and grad_ce[~unl].abs().sum() > 0  # zero CE weight on unlabelled rows
    (grad_kd,) = torch.autograd.grad(out["kd_loss"], student)
    assert grad_kd[unl].abs().sum() > 0  # ... while the teacher still teaches them


def test_all_unlabelled_batch_has_zero_task_loss_and_plain_ce_learns_nothing():
    teacher, student, label = _setup(n=8)
    label = torch.full_like(label, -1)
    student = student.clone().requires_grad_(True)
    out = create_loss("soft", 0.5, 4.0)(student, _batch(teacher, label, 10, 4.0))
    assert float(out["task_loss"].detach()) == 0.0 and torch.isfinite(out["loss"])
    none = create_loss("none")(student, _batch(teacher, label, 10, 4.0))
    (g,) = torch.autograd.grad(none["loss"], student)
    assert torch.all(g == 0)
