"""Teacher features in the cache (schema v2, feature KD): the pooled penultimate embedding that
`distill.teacher.hooks.PenultimateHook` captures, optionally shrunk to ``dim`` values per view by a fixed random
projection (seeded, rebuilt from the seed anywhere), and what a cache file records about it (`FeatureSpec`).

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

from distill.teacher.hooks import FeatureError, PenultimateHook, last_linear

Projection = Literal["gaussian", "orthogonal"]
_MASK = np.uint64(0xFFFFFFFFFFFFFFFF)


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

