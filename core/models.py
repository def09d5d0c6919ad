"""Architectures by name, timm-style: ``create_model(name, num_classes, in_chans, **kwargs)``.

Names: a small architecture registered here (CPU demos and tests), ``timm:<name>`` or ``torchvision:<name>``;
a bare name that is not registered here is looked up in timm, then torchvision.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from distill.core.errors import InputError

_REGISTRY: dict[str, Callable[..., nn.Module]] = {}


def register_model(fn: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
    _REGISTRY[fn.__name__] = fn
    return fn


def registered_models() -> list[str]:
    return sorted(_REGISTRY)


def _conv_bn(cin: int, cout: int, stride: int = 1, groups: int = 1, act: bool = True) -> nn.Sequential:
    layers: list[nn.Module] = [nn.Conv2d(cin, cout, 3, stride, 1, groups=groups, bias=False), nn.BatchNorm2d(cout)]
    if act:
        layers.append(nn.ReLU(inplace=True))
    return nn.Sequential(*layers)


class _Head(nn.Sequential):
    def __init__(self, cin: int, num_classes: int) -> None:
        super().__init__(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(cin, num_classes))


@register_model
def cnn_small(num_classes: int = 10, in_chans: int = 3, width: int = 16) -> nn.Module:
    """Plain 4-conv CNN (receptive field 17 px before pooling): the smallest useful student."""
    w = width
    return nn.Sequential(_conv_bn(in_chans, w), _conv_bn(w, 2 * w, 2), _conv_bn(2 * w, 4 * w, 2),
                         _conv_bn(4 * w, 4 * w, 2), _Head(4 * w, num_classes))


class _BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.conv1 = _conv_bn(cin, cout, stride)
        self.conv2 = _conv_bn(cout, cout, act=False)
        self.shortcut = (nn.Identity() if stride == 1 and cin == cout else
                         nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout)))
        self.act = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.conv2(self.conv1(x)) + self.shortcut(x))


@register_model
def resnet_mini(num_classes: int = 10, in_chans: int = 3, width: int = 16, depth: int = 1) -> nn.Module:
    """ResNet with 3 stages of `depth` basic blocks: residual connections for pruning tests and teachers."""
    w = width
    layers: list[nn.Module] = [_conv_bn(in_chans, w)]
    cin = w
    for i, cout in enumerate((w, 2 * w, 4 * w)):
        for j in range(depth):
            layers.append(_BasicBlock(cin, cout, 2 if (j == 0 and i > 0) else 1))
            cin = cout
    layers.append(_Head(cin, num_classes))
    return nn.Sequential(*layers)


class _InvertedResidual(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int, expand: int) -> None:
        super().__init__()
        hidden = cin * expand
        self.block = nn.Sequential(
            nn.Conv2d(cin, hidden, 1, bias=False), nn.BatchNorm2d(hidden), nn.ReLU6(inplace=True),
            _conv_bn(hidden, hidden, stride, groups=hidden),
            nn.Conv2d(hidden, cout, 1, bias=False), nn.BatchNorm2d(cout))
        self.residual = stride == 1 and cin == cout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.block(x)
        return out + x if self.residual else out


@register_model
def mobilenet_mini(num_classes: int = 10, in_chans: int = 3, width: int = 16, expand: int = 4) -> nn.Module:
    """MobileNetV2-style depthwise-separable network: the edge-friendly student family."""
    w = width
    return nn.Sequential(
        _conv_bn(in_chans, w),
        _InvertedResidual(w, w, 1, expand), _InvertedResidual(w, 2 * w, 2, expand),
        _InvertedResidual(2 * w, 2 * w, 1, expand), _InvertedResidual(2 * w, 4 * w, 2, expand),
        _Head(4 * w, num_classes))


@register_model
def mlp(num_classes: int = 10, in_chans: int = 3, input_size: int = 28, hidden: int = 256, depth: int = 2) -> nn.Module:
    """Fully connected network on the flattened image (small inputs only: digits, 28 px): no convolutions at all,
    so its invariances come from its data or its teacher (Hinton et al.'s MNIST distillation student)."""
    layers: list[nn.Module] = [nn.Flatten()]
    cin = in_chans * input_size * input_size
    for _ in range(depth):
        layers += [nn.Linear(cin, hidden), nn.ReLU(inplace=True)]
        cin = hidden
    layers.append(nn.Linear(cin, num_classes))
    return nn.Sequential(*layers)


class UnknownModelError(InputError):
    """An architecture name that no registry knows."""


class InputChannelsError(InputError):
    """The architecture cannot take this many input channels (torchvision models take RGB only)."""


def create_model(name: str, num_classes: int, in_chans: int = 3, **kwargs: object) -> nn.Module:
    """Build an untrained model by name; unknown names raise an error listing where we looked."""
    source, _, bare = name.partition(":") if ":" in name else ("", "", name)
    if source in ("", "distill") and bare in _REGISTRY:
        return _REGISTRY[bare](num_classes=num_classes, in_chans=in_chans, **kwargs)
    if source in ("", "timm"):
        import timm

        if timm.is_model(bare):
            extra: dict[str, Any] = dict(kwargs)
            return timm.create_model(bare, pretrained=bool(extra.pop("pretrained", False)),
                                     num_classes=num_classes, in_chans=in_chans, **extra)
    if source in ("", "torchvision"):
        import torchvision

        if bare in torchvision.models.list_models():
            if in_chans != 3:
                raise InputChannelsError(f"torchvision model '{bare}' takes 3 input channels, not {in_chans}; "
                                 "set preprocessing.channels: 3 or use a timm/registered model")
            return torchvision.models.get_model(bare, num_classes=num_classes, **kwargs)
    raise UnknownModelError(
        f"unknown architecture '{name}': not registered here ({', '.join(registered_models())}), "
        "not a timm model (timm.list_models()) and not a torchvision model "
        "(torchvision.models.list_models()); prefix with 'timm:' or 'torchvision:' to be explicit")


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def count_macs(model: nn.Module, example: torch.Tensor) -> int:
    """Multiply-accumulates per image of one forward pass at `example`'s shape (N, C, H, W): the one MAC count of
    the project (leaderboard, compress report, Pareto plot, model card).

    What it counts: the multiply-adds of convolutions and matrix products (Linear, matmul, bmm, attention), from
    PyTorch's FlopCounterMode (which counts a multiply-add as 2 FLOPs), divided by N. Not counted: BatchNorm,
    activations, pooling, additions, softmax: the elementwise work, a few percent of a conv net's arithmetic,
    which Torch-Pruning's counter included (so the same model once showed 5.56 MMACs in the leaderboard and 5.67 in
    the compress report)."""
    from torch.utils.flop_counter import FlopCounterMode

    was_training = model.training
    model.eval()
    try:
        with FlopCounterMode(display=False) as fc, torch.no_grad():
            model(example)
    finally:
        model.train(was_training)
    return int(fc.get_total_flops() // 2 // max(1, example.shape[0]))
