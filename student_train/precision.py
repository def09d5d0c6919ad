"""bf16 training without bf16 BatchNorm statistics, and bf16 autocast where a whole model stays fp32.

DeepSpeed's bf16 mode casts every parameter to bf16 and leaves buffers alone. A BatchNorm with bf16 weights and
fp32 running statistics is refused by the CPU kernel; casting the statistics to bf16 as well (what training did
before) makes their running average drift: bf16 keeps 8 significant bits, so near 5.0 a step of momentum x
(5.0 - mean) below 0.016 rounds away and the running mean stalls (measured 4.78 against 5.0, issue 21 §9).
Here each BatchNorm runs on its bf16 input with an fp32 copy of its weight and bias and fp32 statistics: the
mixed-dtype kernel both the CPU and cuDNN provide (what autocast does for BatchNorm), output in the input's dtype.
"""

from __future__ import annotations

import contextlib
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

_SUBCLASSES: dict[type, type] = {}


class _FP32StatsMixin:
    """forward() of a BatchNorm that keeps fp32 statistics under bf16 parameters (same arithmetic otherwise)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bn: Any = self
        bn._check_input_dim(x)
        momentum = 0.0 if bn.momentum is None else bn.momentum
        if bn.training and bn.track_running_stats and bn.num_batches_tracked is not None:
            bn.num_batches_tracked.add_(1)
            momentum = 1.0 / float(bn.num_batches_tracked) if bn.momentum is None else bn.momentum
        use_batch = bn.training or (bn.running_mean is None and bn.running_var is None)
        track = not bn.training or bn.track_running_stats
        weight = None if bn.weight is None else bn.weight.float()
        bias = None if bn.bias is None else bn.bias.float()
        return F.batch_norm(x, bn.running_mean if track else None, bn.running_var if track else None, weight, bias,
                            use_batch, momentum, bn.eps)


def _fp32_stats_class(cls: type) -> type:
    if cls not in _SUBCLASSES:
        _SUBCLASSES[cls] = type(f"{cls.__name__}FP32Stats", (_FP32StatsMixin, cls), {})
    return _SUBCLASSES[cls]


def keep_batchnorm_fp32(model: nn.Module) -> int:
    """Make every BatchNorm of `model` keep fp32 statistics whatever its parameters' dtype; returns how many.

    The state dict is unchanged (same keys, fp32 statistics), so checkpoints and best.pt load anywhere."""
    n = 0
    for module in model.modules():
        if isinstance(module, _BatchNorm) and not isinstance(module, _FP32StatsMixin):
            for name in ("running_mean", "running_var"):
                buf = getattr(module, name)
                if buf is not None and buf.dtype != torch.float32:
                    setattr(module, name, buf.float())
            module.__class__ = _fp32_stats_class(type(module))
            n += 1
    return n


def autocast(device: torch.device, enabled: bool = True) -> Any:
    """bf16 autocast on CUDA (where bf16 pays); a no-op on the CPU or when disabled."""
    if enabled and device.type == "cuda" and torch.cuda.is_bf16_supported():
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()
