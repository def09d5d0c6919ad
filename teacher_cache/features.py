"""Teacher features for feature KD: the pooled penultimate embedding (the input of the classifier's last Linear),
and the same hook point used to keep the classifier head in fp32 under bf16/fp16 autocast (`Fp32Head`).

A forward pre-hook on the model's last ``nn.Linear`` captures that input during the ordinary forward pass, so
one forward gives logits and features; this works for the registered models and for timm / torchvision
classifiers alike. An optional fixed random projection (seeded, rebuilt from the seed anywhere) shrinks the
stored embedding to ``dim`` values per view.

The projection's random numbers come from a counter-based generator written out here (splitmix64 +
Box-Muller on plain uint64 / float64 numpy arithmetic), not from a library RNG whose stream may change between
versions: the same (seed, source_dim, dim) gives the same matrix on every machine.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import torch
from torch import nn

Projection = Literal["gaussian", "orthogonal"]
_MASK = np.uint64(0xFFFFFFFFFFFFFFFF)


class FeatureError(ValueError):
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


def _splitmix64(counter: np.ndarray) -> np.ndarray:
    """splitmix64 of each uint64 counter (wrapping arithmetic; exact on every platform)."""
    with np.errstate(over="ignore"):
        z = (counter + np.uint64(0x9E3779B97F4A7C15)) & _MASK
        z = ((z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)) & _MASK
        z = ((z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)) & _MASK
        return z ^ (z >> np.uint64(31))


def seeded_normal(seed: int, n: int) -> np.ndarray:
    """n standard normal float64 values from (seed, index) alone (Box-Muller on 53-bit uniforms)."""
    half = (n + 1) // 2
    base = np.uint64((seed * 0x2545F4914F6CDD1D) & 0xFFFFFFFFFFFFFFFF)
    with np.errstate(over="ignore"):
        idx = (np.arange(2 * half, dtype=np.uint64) + base) & _MASK
    bits = _splitmix64(idx) >> np.uint64(11)
    u = (bits.astype(np.float64) + 0.5) / float(1 << 53)  # in (0, 1): log never sees 0
    u1, u2 = u[0::2], u[1::2]
    r = np.sqrt(-2.0 * np.log(u1))
    return np.concatenate([r * np.cos(2 * np.pi * u2), r * np.sin(2 * np.pi * u2)])[:n]


def projection_matrix(source_dim: int, dim: int, seed: int, kind: Projection = "gaussian") -> np.ndarray:
    """(source_dim, dim) float32: Gaussian / sqrt(dim) (Johnson-Lindenstrauss), or orthonormal columns."""
    if dim < 1 or dim > source_dim:
        raise FeatureError(f"features.dim must be between 1 and the teacher's feature size {source_dim}, got {dim}")
    g = seeded_normal(seed, source_dim * dim).reshape(source_dim, dim)
    if kind == "gaussian":
        return (g / np.sqrt(dim)).astype(np.float32)
    q, r = np.linalg.qr(g)
    return (q * np.where(np.diag(r) < 0, -1.0, 1.0)).astype(np.float32)  # sign fix: QR is unique up to signs


@dataclass
class FeatureSpec:
    """What the cache records about its feature column (Parquet metadata `distill.features`)."""

    dim: int
    source_dim: int
    projection: str  # "none", "gaussian" or "orthogonal"
    seed: int
    layer: str

    def as_dict(self) -> dict[str, Any]:
        return {"dim": self.dim, "source_dim": self.source_dim, "projection": self.projection, "seed": self.seed,
                "layer": self.layer, "dtype": "float16", "pooled": "input of the last nn.Linear"}


class FeatureExtractor:
    """Hooks a teacher once; ``forward(x)`` returns (logits, features (N, d) float32)."""

    def __init__(self, model: nn.Module, dim: int | None, seed: int, kind: Projection = "gaussian") -> None:
        name, linear = last_linear(model)
        self.model = model
        self.hook = PenultimateHook(linear)
        d = dim or linear.in_features
        self.matrix = (torch.from_numpy(projection_matrix(linear.in_features, d, seed, kind))
                       if dim is not None else None)
        self.spec = FeatureSpec(d, linear.in_features, kind if dim is not None else "none", seed, name)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        logits = self.model(x)
        feats = self.hook.take().float()
        if self.matrix is not None:
            feats = feats @ self.matrix.to(feats.device)
        return logits, feats


def teacher_forward(model: nn.Module, extractor: FeatureExtractor | None,
                    x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The labeller's one forward: logits, plus features when the cache stores them."""
    if extractor is None:
        return model(x), None
    return extractor.forward(x)

