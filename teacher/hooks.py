"""Hooks on a teacher's classifier head (the last `nn.Linear`): its input is the pooled penultimate embedding that
feature KD uses (`PenultimateHook`), and under bf16/fp16 autocast its output is recomputed in fp32 (`Fp32Head`).

A forward pre-hook captures that input during the ordinary forward pass, so one forward gives logits and features;
this works for the registered models and for timm / torchvision classifiers alike.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from distill.core.errors import InputError


class FeatureError(InputError):
    """The teacher (or student) has no layer we can take penultimate features from."""


def last_linear(model: nn.Module, what: str = "teacher") -> tuple[str, nn.Linear]:
    """(name, module) of the last nn.Linear in registration order: the classifier of common vision models."""
    if isinstance(model, (torch.jit.ScriptModule, torch.fx.GraphModule)):
        raise FeatureError(f"feature caching needs an nn.Module {what} (`arch` + `checkpoint`); a TorchScript / "
                           "torch.export model hides its layers. Give the architecture and its state dict, or set "
                           "`features.enabled: false`")
    found = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    if not found:
        raise FeatureError(f"the {what} ({type(model).__name__}) has no nn.Linear classifier to take penultimate "
                           "features from; feature KD needs a model whose head ends in nn.Linear")
    return found[-1]


def check_features(model: nn.Module, dim: int | None) -> int:
    """Fail before any work when the teacher cannot give features of `dim`; returns its feature size."""
    _, linear = last_linear(model)
    if dim is not None and dim > linear.in_features:
        raise FeatureError(f"features.dim {dim} is larger than the teacher's penultimate size {linear.in_features}; "
                           f"set features.dim <= {linear.in_features} (or leave it empty for no projection)")
    return linear.in_features


class PenultimateHook:
    """Captures the input of one Linear on every forward; ``take()`` returns it as (N, D) and forgets it."""

    def __init__(self, linear: nn.Linear) -> None:
        self.value: torch.Tensor | None = None
        self.handle = linear.register_forward_pre_hook(self._hook)

    def _hook(self, module: nn.Module, args: tuple[Any, ...]) -> None:
        x = args[0]
        self.value = x.reshape(x.shape[0], -1, x.shape[-1]).mean(1) if x.ndim > 2 else x  # token-wise heads: pool

    def take(self) -> torch.Tensor:
        if self.value is None:
            raise FeatureError("the classifier's last Linear did not run in this forward; cannot take features")
        out, self.value = self.value, None
        return out

    def remove(self) -> None:
        self.handle.remove()


class Fp32Head:
    """Runs the classifier's last Linear in fp32 while the body runs under bf16/fp16 autocast.

    The soft labels are the head's output: in bf16 (8 bits of mantissa) logits of magnitude ~10 are rounded to
    0.06, which put 0.084 nats of error into the cached top-k log-probs and changed the top-k set of 10 of 256
    rows; the head is a tiny share of the forward. A forward hook replaces the low-precision output with the
    fp32 one computed from the same input (the discarded low-precision matmul is the price of not editing the
    user's model). Only a plain `nn.Linear` (no overridden forward) is recomputed.
    """

    def __init__(self, linear: nn.Linear) -> None:
        self.handle = linear.register_forward_hook(self._hook)

    @staticmethod
    def _hook(module: nn.Module, args: tuple[Any, ...], output: torch.Tensor) -> torch.Tensor | None:
        if output.dtype == torch.float32:  # no autocast here: nothing to fix
            return None
        x = args[0]
        assert isinstance(module, nn.Linear)  # install() hooks only a plain nn.Linear
        with torch.autocast(x.device.type, enabled=False):
            bias = module.bias.float() if module.bias is not None else None
            return nn.functional.linear(x.float(), module.weight.float(), bias)

    def remove(self) -> None:
        self.handle.remove()

    @staticmethod
    def install(model: nn.Module) -> Fp32Head | None:
        """Hook the model's head, or None where it cannot be (TorchScript/export, no Linear, custom forward)."""
        try:
            _, linear = last_linear(model)
        except FeatureError:
            return None
        return Fp32Head(linear) if type(linear).forward is nn.Linear.forward else None


def head_precision(model: nn.Module, precision: str) -> str:
    """The precision of the classifier head's output: fp32 wherever `Fp32Head` can hook it."""
    if precision == "fp32":
        return "fp32"
    hook = Fp32Head.install(model)
    if hook is None:
        return precision
    hook.remove()
    return "fp32"
