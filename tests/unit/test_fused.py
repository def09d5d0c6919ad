"""Horizontal fusion: K students of one architecture as one model compute what each computes alone, and the
per-student optimizer matches torch's AdamW / SGD with DeepSpeed's clipping, student by student.

Tolerances: a grouped convolution and a batched matmul add the same products in another order than K separate
convolutions and matmuls (float32), so equality is to ~1e-5 relative, not bitwise."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from distill.core.models import create_model
from distill.student_train.fused import (
    FusedOptimizer,
    NotFusableError,
    check_fused,
    cut,
    fuse_structure,
    load_students,
    stack,
)
from distill.student_train.student import StudentRun, make_optimizer
from distill.student_train.variant import VariantConfig

ARCHS = [("cnn_small", {"width": 4}), ("resnet_mini", {"width": 4}), ("mobilenet_mini", {"width": 4}),
         ("mlp", {"hidden": 16, "input_size": 12})]


def _students(arch: str, kw: dict, k: int) -> list[nn.Module]:
    out = []
    for seed in range(k):
        torch.manual_seed(seed)
        out.append(create_model(arch, num_classes=5, in_chans=2, **kw))
    return out


def _fused(models: list[nn.Module]) -> nn.Module:
    fused = fuse_structure(models[0], len(models))
    load_students(fused, [m.state_dict() for m in models])
    return fused


def _run(arch, kw):
    torch.manual_seed(10)
    x = torch.randn(6, 2, 12, 12)
    y = torch.randint(0, 5, (6,))
    return x, y


@pytest.mark.parametrize(("arch", "kw"), ARCHS)
def test_fused_forward_and_gradients_equal_each_student(arch, kw):
    models = _students(arch, kw, 3)
    fused = _fused(models)
    x, y = _run(arch, kw)
    out = fused(x.repeat(1, 3, 1, 1)).reshape(6, 3, -1)  # train mode: BatchNorm uses the batch, per channel
    sum(F.cross_entropy(out[:, k], y) for k in range(3)).backward()
    for k, m in enumerate(models):
        want = m(x)
        F.cross_entropy(want, y).backward()
        torch.testing.assert_close(out[:, k], want, rtol=1e-5, atol=1e-5)
        sd = fused.state_dict()
        for name, p in m.named_parameters():
            fp = dict(fused.named_parameters())[name]
            torch.testing.assert_close(cut(fp.grad, k, 3, p.shape), p.grad, rtol=1e-4, atol=1e-5)
        for name, t in m.state_dict().items():  # running statistics moved exactly as each student's own
            torch.testing.assert_close(cut(sd[name], k, 3, t.shape), t, rtol=1e-5, atol=1e-6)


class _MixesChannels(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(2, 4, 3)
        self.head = nn.Linear(1, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # a mean over all channels: not per student once fused
        return self.head(self.conv(x).mean(dim=(1, 2, 3))[:, None])


def test_what_cannot_be_fused_is_refused():
    with pytest.raises(NotFusableError, match="LayerNorm"):
        fuse_structure(nn.Sequential(nn.Conv2d(2, 4, 3), nn.LayerNorm(4)), 2)
    models = [_MixesChannels(), _MixesChannels()]
    fused = _fused(models)
    with pytest.raises(NotFusableError, match="does not reproduce"):
        check_fused(fused, models, torch.randn(2, 2, 8, 8))


def _clip_like_deepspeed(model: nn.Module, max_norm: float | None) -> None:
    if not max_norm:
        return
    norm = torch.stack([p.grad.float().norm(2) for p in model.parameters()]).pow(2).sum().sqrt()
    coef = torch.clamp(max_norm / (norm + 1e-6), max=1.0)
    for p in model.parameters():
        p.grad.mul_(coef)


@pytest.mark.parametrize("kind", ["adamw", "sgd"])
def test_fused_optimizer_matches_each_students_own_optimizer(kind):
    """Each student its own lr, weight decay, momentum and clipping (one clips, one does not): 5 steps."""
    vs = [VariantConfig(optimizer=kind, lr=0.05, weight_decay=0.05, clip_grad=0.5),
          VariantConfig(optimizer=kind, lr=0.01, weight_decay=0.0, clip_grad=None, momentum=0.5),
          VariantConfig(optimizer=kind, lr=0.002, weight_decay=0.3, clip_grad=10.0)]
    models = _students("cnn_small", {"width": 4}, 3)
    fused = _fused(models)
    runs = [StudentRun(f"s{k}", v, None, None) for k, v in enumerate(vs)]  # type: ignore[arg-type]
    shapes = {n: t.shape for n, t in models[0].state_dict().items()}
    opt = FusedOptimizer(list(fused.parameters()), [len(shapes[n]) >= 2 for n, _ in fused.named_parameters()], runs)
    refs = [make_optimizer(m, v) for m, v in zip(models, vs, strict=True)]
    x, y = _run("cnn_small", {})
    fused_params = dict(fused.named_parameters())
    for _ in range(5):
        for k, m in enumerate(models):  # each student's own gradients (the fused ones are tested above)
            (F.cross_entropy(m(x), y) * (k + 1)).backward()
        for name, p in fused_params.items():  # the same gradients, fused; then each student clipped and stepped
            p.grad = stack([dict(m.named_parameters())[name].grad for m in models], p)
        opt.step()
        fused.zero_grad()
        for m, ref, v in zip(models, refs, vs, strict=True):
            _clip_like_deepspeed(m, v.clip_grad)
            ref.step()
            ref.zero_grad()
    for k, m in enumerate(models):
        for name, t in m.named_parameters():
            torch.testing.assert_close(cut(fused_params[name].detach(), k, 3, t.shape), t.detach(), rtol=1e-6,
                                       atol=1e-7)


def test_a_student_with_non_finite_gradients_is_not_updated_and_the_others_are():
    vs = [VariantConfig(lr=0.01), VariantConfig(lr=0.01), VariantConfig(lr=0.01)]
    models = _students("cnn_small", {"width": 4}, 3)
    fused = _fused(models)
    before = {n: t.clone() for n, t in fused.state_dict().items()}
    runs = [StudentRun(f"s{k}", v, None, None) for k, v in enumerate(vs)]  # type: ignore[arg-type]
    shapes = {n: t.shape for n, t in models[0].state_dict().items()}
    opt = FusedOptimizer(list(fused.parameters()), [len(shapes[n]) >= 2 for n, _ in fused.named_parameters()], runs)
    x, y = _run("cnn_small", {})
    out = fused(x.repeat(1, 3, 1, 1)).reshape(6, 3, -1)
    losses = [F.cross_entropy(out[:, k], y) for k in range(3)]
    (losses[0] + losses[1] * math.nan + losses[2]).backward()  # student 1 diverged
    opt.step()
    after = dict(fused.named_parameters())
    for name, p in after.items():
        assert torch.isfinite(p).all(), name
        assert torch.equal(cut(p.detach(), 1, 3, shapes[name]), cut(before[name], 1, 3, shapes[name])), name
    moved = [not torch.equal(cut(after[n].detach(), k, 3, shapes[n]), cut(before[n], k, 3, shapes[n]))
             for n in after for k in (0, 2)]
    assert all(moved)
    for st in opt.state.values():
        assert all(torch.isfinite(t).all() for t in st.values())
