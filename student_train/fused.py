"""Horizontal fusion (HFTA, Wang et al., MLSys 2021): K students of one architecture trained as one model.

The K forward and backward passes become one computation, exact by construction for the modules the registered
architectures are made of:
- Conv2d(cin, cout, groups=g) x K -> Conv2d(K cin, K cout, groups=K g): each student's channels are its own groups;
- BatchNorm (K C channels): statistics are per channel, hence per student, as alone;
- Linear x K -> one batched matmul over a student axis (FusedLinear);
- element-wise activations, pooling, flatten(1) and residual adds act per channel.
Every fused tensor is student-major along dim 0, so student k's slice of any weight, gradient or optimizer state is
`t.view(K, -1)[k]`; that is how each student's state is cut out (best.pt, checkpoints) and put back (resume). A fused
model is compared with the students it replaces on a probe batch before use, and any other module type is refused:
those students then loop over the shared batch instead (student.LoopedUnit).

FusedOptimizer keeps each student's own hyper-parameters (lr and its schedule, weight decay, momentum), clips each
student by its own gradient norm (DeepSpeed's formula), and skips the update of a student whose gradients are not
finite: a diverging student never writes NaN into its slice, nor anywhere else.
"""

from __future__ import annotations

import copy
import logging
import math
from typing import Any

import torch
from torch import nn

from distill.core.errors import InputError
from distill.student_train.student import StudentRun, lr_lambda

log = logging.getLogger(__name__)

_PARAM_FREE = (nn.ReLU, nn.ReLU6, nn.GELU, nn.SiLU, nn.Sigmoid, nn.Tanh, nn.Hardswish, nn.Hardsigmoid, nn.LeakyReLU,
               nn.Identity, nn.Dropout, nn.AdaptiveAvgPool2d, nn.AvgPool2d, nn.MaxPool2d)


class NotFusableError(InputError):
    """These students cannot be fused (a module type or a forward that mixes channels); they loop instead."""


class FusedLinear(nn.Module):
    """K Linear(cin, cout) on [B, K*cin] -> [B, K*cout], as one batched matmul (weight [K, cout, cin])."""

    def __init__(self, k: int, cin: int, cout: int, bias: bool) -> None:
        super().__init__()
        self.k = k
        self.weight = nn.Parameter(torch.empty(k, cout, cin))
        self.bias = nn.Parameter(torch.empty(k, cout)) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b = x.shape[0]
        xs = x.reshape(b, self.k, -1).transpose(0, 1)  # [K, B, cin]
        w = self.weight.transpose(1, 2)
        out = torch.baddbmm(self.bias[:, None, :], xs, w) if self.bias is not None else torch.bmm(xs, w)
        return out.transpose(0, 1).reshape(b, -1)


def fuse_structure(template: nn.Module, k: int) -> nn.Module:
    """A module shaped like K copies of `template` side by side (weights uninitialised: load_students fills them)."""
    if isinstance(template, nn.Conv2d):
        if template.padding_mode != "zeros":
            raise NotFusableError(f"Conv2d with padding_mode={template.padding_mode}")
        conv: Any = template  # torch types a module's attributes as Tensor | Module; these are ints and tuples
        return nn.Conv2d(k * conv.in_channels, k * conv.out_channels, conv.kernel_size, conv.stride, conv.padding,
                         conv.dilation, k * conv.groups, conv.bias is not None)
    if isinstance(template, (nn.BatchNorm1d, nn.BatchNorm2d)):
        bn: Any = template
        return type(bn)(k * bn.num_features, bn.eps, bn.momentum, bn.affine, bn.track_running_stats)
    if isinstance(template, nn.Linear):
        return FusedLinear(k, template.in_features, template.out_features, template.bias is not None)
    if isinstance(template, nn.Flatten):
        if template.start_dim != 1 or template.end_dim != -1:
            raise NotFusableError("Flatten other than flatten(1)")
        return copy.deepcopy(template)
    children = list(template.named_children())
    if not children:
        if isinstance(template, _PARAM_FREE) and not list(template.parameters()):
            return copy.deepcopy(template)
        raise NotFusableError(f"module {type(template).__name__} has no fused form")
    fused = copy.copy(template)  # same class and forward; children replaced below
    fused._modules = dict(template._modules)
    fused._parameters, fused._buffers = dict(template._parameters), dict(template._buffers)
    if fused._parameters or any(b is not None for b in fused._buffers.values()):
        raise NotFusableError(f"module {type(template).__name__} holds its own tensors")
    for name, child in children:
        fused._modules[name] = fuse_structure(child, k)
    return fused


def stack(tensors: list[torch.Tensor], like: torch.Tensor) -> torch.Tensor:
    """K students' tensors -> the fused tensor (student-major along dim 0); scalars (counters) are shared."""
    if like.ndim == 0:
        return tensors[0].clone()
    return torch.stack([t.reshape(-1) for t in tensors]).reshape(like.shape)


def cut(fused: torch.Tensor, k: int, n: int, shape: torch.Size) -> torch.Tensor:
    """Student k's slice of a fused tensor, in the student's own shape."""
    if fused.ndim == 0:
        return fused.clone()
    return fused.reshape(n, -1)[k].reshape(shape).clone()


def load_students(fused: nn.Module, states: list[dict[str, torch.Tensor]]) -> None:
    own = fused.state_dict()
    fused.load_state_dict({key: stack([s[key].to(t.device, t.dtype) for s in states], t) for key, t in own.items()})


def check_fused(fused: nn.Module, models: list[nn.Module], probe: torch.Tensor) -> None:
    """The fused model must compute what its students compute (eval mode, on a probe batch), else it is refused."""
    fused.eval()
    for m in models:
        m.eval()
    with torch.no_grad():
        try:
            out = fused(probe.repeat(1, len(models), *([1] * (probe.ndim - 2)))).reshape(len(probe), len(models), -1)
        except RuntimeError as exc:  # shapes that only work per student (a forward that mixes channels)
            raise NotFusableError(f"the fused model does not reproduce its students ({exc})") from None
        for k, m in enumerate(models):
            want = m(probe)
            if out[:, k].shape != want.shape or not torch.allclose(out[:, k], want, rtol=1e-3, atol=1e-4):
                raise NotFusableError("the fused model does not reproduce its students (a forward that mixes channels)")
    fused.train()


class FusedOptimizer(torch.optim.Optimizer):
    """AdamW or nesterov SGD over fused tensors with per-student hyper-parameters, clipping and NaN masking."""

    def __init__(self, params: list[nn.Parameter], decay: list[bool], students: list[StudentRun]) -> None:
        super().__init__([{"params": params, "lr": students[0].v.lr}], {})
        vs = [s.v for s in students]
        self.kind, self.n, self.decay = vs[0].optimizer, len(vs), decay
        dev = params[0].device
        f64 = torch.float64  # per-student scalars in double, as torch's Python floats
        self.base_lr = torch.tensor([v.lr for v in vs], dtype=f64)
        self.lr = self.base_lr.clone().to(dtype=f64, device=dev)  # set by the schedule; base_lr stays
        self.wd = torch.tensor([v.weight_decay for v in vs], dtype=f64, device=dev)
        self.mom = torch.tensor([v.momentum for v in vs], dtype=f64, device=dev)
        self.clip = torch.tensor([v.clip_grad or math.inf for v in vs], device=dev)
        self.steps = torch.zeros(self.n, dtype=f64, device=dev)  # updates per student (bias correction, SGD start)
        self.mask = torch.ones(self.n, dtype=torch.bool, device=dev)  # students that step now (set by the unit)

    def _slot(self, p: torch.Tensor, name: str) -> torch.Tensor:
        st = self.state[p]
        if name not in st:
            st[name] = torch.zeros(p.shape, dtype=p.dtype, device=p.device)  # contiguous: rows are students
        return st[name]

    @torch.no_grad()
    def step(self, closure: Any = None) -> None:  # type: ignore[override]  # no closure: DeepSpeed never passes one
        params = [p for p in self.param_groups[0]["params"] if p.grad is not None]
        norm2 = sum(p.grad.reshape(self.n, -1).float().norm(dim=1) ** 2 for p in params)
        norm = torch.as_tensor(norm2, device=self.mask.device).sqrt()
        ok = self.mask & torch.isfinite(norm)
        coef = torch.clamp(self.clip / (norm + 1e-6), max=1.0)
        self.steps += ok.double()
        for p, decay in zip(self.param_groups[0]["params"], self.decay, strict=True):
            if p.grad is not None:
                self._update(p, decay, coef, ok)

    def _update(self, p: torch.Tensor, decay: bool, coef: torch.Tensor, ok: torch.Tensor) -> None:
        """torch's AdamW / SGD(nesterov) arithmetic, vectorised over the student axis (factors per student)."""
        col = (self.n, 1)
        w = p.detach().reshape(self.n, -1)  # a copy if p is not contiguous (channels_last): written back below
        assert p.grad is not None  # step() updates only parameters with a gradient
        g = p.grad.reshape(self.n, -1) * coef.reshape(col)
        lr = self.lr
        wd = self.wd if decay else torch.zeros_like(self.wd)
        keep = ok.reshape(col)
        if self.kind == "adamw":
            m, v = self._slot(p, "exp_avg").reshape(self.n, -1), self._slot(p, "exp_avg_sq").reshape(self.n, -1)
            m_new, v_new = m.lerp(g, 0.1), v * 0.999 + g * g * (1 - 0.999)
            step = self.steps.clamp_min(1)
            shrink = (1 - lr * wd).float().reshape(col)
            step_size = (lr / (1 - 0.9 ** step)).float().reshape(col)
            bc2_sqrt = (1 - 0.999 ** step).sqrt().float().reshape(col)
            denom = v_new.sqrt() / bc2_sqrt + 1e-8
            w_new = w * shrink - step_size * m_new / denom
            m.copy_(torch.where(keep, m_new, m))
            v.copy_(torch.where(keep, v_new, v))
        else:
            buf = self._slot(p, "momentum_buffer").reshape(self.n, -1)
            d = g + wd.float().reshape(col) * w
            mom = self.mom.float().reshape(col)
            buf_new = torch.where(self.steps.reshape(col) <= 1, d, buf * mom + d)
            w_new = w - lr.float().reshape(col) * (d + mom * buf_new)
            buf.copy_(torch.where(keep, buf_new, buf))
        p.detach().copy_(torch.where(keep, w_new, w).reshape(p.shape))

    def student_state(self, k: int, names: dict[torch.Tensor, str], shapes: dict[str, torch.Size]) -> dict:
        out = {}
        for p, st in self.state.items():
            out[names[p]] = {key: cut(t, k, self.n, shapes[names[p]]) for key, t in st.items()}
        return {"kind": self.kind, "slots": out, "steps": float(self.steps[k])}

    def load_student(self, k: int, saved: dict, params: dict[str, torch.Tensor]) -> None:
        for name, slots in saved["slots"].items():
            p = params[name]
            for key, t in slots.items():
                self._slot(p, key).reshape(self.n, -1)[k] = t.reshape(-1).to(p.device, p.dtype)
        self.steps[k] = saved["steps"]


class FusedSchedule:
    """Each student's own warmup + cosine schedule; a student advances only on steps it takes (host counters)."""

    def __init__(self, opt: FusedOptimizer, students: list[StudentRun], train_steps: int) -> None:
        self.opt = opt
        self.fns = [lr_lambda(max(1, s.v.epochs * train_steps // s.v.grad_accum),
                              int(s.v.warmup_epochs * train_steps / s.v.grad_accum), s.v.min_lr_ratio)
                    for s in students]
        self.taken = [0] * len(students)
        self.stepping = [True] * len(students)
        self._apply()

    def lr(self, k: int) -> float:
        return float(self.opt.base_lr[k]) * self.fns[k](self.taken[k])

    def _apply(self) -> None:
        lrs = torch.tensor([self.lr(k) for k in range(len(self.fns))], dtype=torch.float64)
        self.opt.lr.copy_(lrs.to(self.opt.lr.device, non_blocking=True))

    def step(self) -> None:  # DeepSpeed calls this after each optimizer step
        self.taken = [t + int(s) for t, s in zip(self.taken, self.stepping, strict=True)]
        self._apply()

    def state_dict(self) -> dict:
        return {"taken": list(self.taken)}

    def load_state_dict(self, state: dict) -> None:
        self.taken = list(state["taken"])
        self._apply()
