"""Augmentation views that can be replayed exactly: the teacher labels them once, students see the same pixels.

View 0 is the deterministic evaluation view (centre crop of ``crop_pct`` of the shorter side). Views 1..V-1
are random-resized-crop + optional horizontal flip, with parameters drawn from a generator seeded by
(view_seed, key, view index) so they do not depend on shard order, actor or re-runs.

``replay_view`` is the only code that turns (image, view params) into pixels.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image
from pydantic import ConfigDict, Field, model_validator
from torchvision.transforms import InterpolationMode
from torchvision.transforms.v2 import functional as F

from distill.core.config import StrictConfig

_INTERPOLATION = {"bilinear": InterpolationMode.BILINEAR, "bicubic": InterpolationMode.BICUBIC,
                  "nearest": InterpolationMode.NEAREST}


@dataclass(frozen=True)
class ViewParams:
    """One view of one image: a crop box in source pixels, then resize, then optional flip."""

    top: int
    left: int
    height: int
    width: int
    flip: bool

    def box(self) -> tuple[int, int, int, int]:
        return (self.top, self.left, self.height, self.width)


class ViewsConfig(StrictConfig):
    """How views are drawn, as the cache config gives it (`cache.views`)."""

    num_views: int = Field(4, ge=1, le=64, description="view 0 = eval view, 1..V-1 = random resized crops")
    seed: int = 0
    scale: tuple[float, float] = (0.08, 1.0)
    ratio: tuple[float, float] = (3 / 4, 4 / 3)
    flip: bool = True

    @model_validator(mode="after")
    def _ranges(self) -> ViewsConfig:
        if not 0 < self.scale[0] <= self.scale[1] <= 1:
            raise ValueError(f"scale must satisfy 0 < min <= max <= 1, got {list(self.scale)}")
        if not 0 < self.ratio[0] <= self.ratio[1]:
            raise ValueError(f"ratio must satisfy 0 < min <= max, got {list(self.ratio)}")
        return self


class ViewPolicy(ViewsConfig):
    """The views config plus the evaluation view's crop (the teacher's `crop_pct`): everything `sample_views` needs,
    recorded in every cache file and part of the teacher fingerprint. One definition of the fields and their ranges
    (`ViewsConfig`'s); frozen, so it can travel to decode processes and key caches."""

    model_config = ConfigDict(frozen=True)
    crop_pct: float = Field(0.875, gt=0.0, le=1.0, description="view 0: centre square of this share of the shorter "
                            "side")

    @classmethod
    def of(cls, views: ViewsConfig, crop_pct: float) -> ViewPolicy:
        return cls(**views.model_dump(), crop_pct=crop_pct)

    def as_dict(self) -> dict:
        """The form in file metadata and the fingerprint (unchanged since schema v1)."""
        return {"num_views": self.num_views, "seed": self.seed, "crop_pct": self.crop_pct,
                "scale": list(self.scale), "ratio": list(self.ratio), "flip": self.flip}


def eval_view(height: int, width: int, crop_pct: float) -> ViewParams:
    """Centre square of side crop_pct * shorter side: resize-then-centre-crop expressed as one crop box."""
    side = max(1, int(round(min(height, width) * crop_pct)))
    top = (height - side) // 2
    left = (width - side) // 2
    return ViewParams(top, left, side, side, False)


def _rng_for(seed: int, key: str, view: int) -> np.random.Generator:
    digest = hashlib.blake2b(f"{seed}\x00{key}\x00{view}".encode(), digest_size=8).digest()
    return np.random.default_rng(int.from_bytes(digest, "little"))


def random_resized_crop(height: int, width: int, policy: ViewPolicy, rng: np.random.Generator) -> ViewParams:
    """torchvision's RandomResizedCrop.get_params algorithm, driven by our own seeded generator."""
    area = height * width
    log_ratio = (math.log(policy.ratio[0]), math.log(policy.ratio[1]))
    flip = bool(policy.flip and rng.random() < 0.5)
    for _ in range(10):
        target_area = area * rng.uniform(policy.scale[0], policy.scale[1])
        aspect = math.exp(rng.uniform(log_ratio[0], log_ratio[1]))
        w = int(round(math.sqrt(target_area * aspect)))
        h = int(round(math.sqrt(target_area / aspect)))
        if 0 < w <= width and 0 < h <= height:
            top = int(rng.integers(0, height - h + 1))
            left = int(rng.integers(0, width - w + 1))
            return ViewParams(top, left, h, w, flip)
    in_ratio = width / height  # fallback: centre crop at the nearest allowed aspect ratio
    if in_ratio < policy.ratio[0]:
        w, h = width, int(round(width / policy.ratio[0]))
    elif in_ratio > policy.ratio[1]:
        h, w = height, int(round(height * policy.ratio[1]))
    else:
        w, h = width, height
    return ViewParams((height - h) // 2, (width - w) // 2, h, w, flip)


def sample_views(key: str, height: int, width: int, policy: ViewPolicy) -> list[ViewParams]:
    """All V views of one sample; identical for the same (seed, key, image size) on every run."""
    views = [eval_view(height, width, policy.crop_pct)]
    for v in range(1, policy.num_views):
        views.append(random_resized_crop(height, width, policy, _rng_for(policy.seed, key, v)))
    return views


def image_to_tensor(image: Image.Image, channels: int) -> torch.Tensor:
    """Decoded PIL image in any mode -> uint8 CHW tensor with the teacher's channel count (alpha dropped)."""
    mode = "L" if channels == 1 else "RGB"
    if image.mode != mode:
        image = image.convert(mode)
    return F.pil_to_tensor(image)


def match_channels(pixels: torch.Tensor, channels: int) -> torch.Tensor:
    """uint8 CHW (or NCHW) pixels with 1 channel -> `channels` copies of it (what PIL's L -> RGB conversion gives:
    R = G = B = grey), so a 3-channel student reads a grey cache's exact pixels; equal counts pass unchanged."""
    have = pixels.shape[-3]
    if have == channels:
        return pixels
    if have != 1:
        raise ValueError(f"cannot make {channels} channels from {have}: only grey (1 channel) is replicated")
    return pixels.expand(*pixels.shape[:-3], channels, *pixels.shape[-2:]).contiguous()


def replay_view(image: torch.Tensor, view: ViewParams, size: int | tuple[int, int],
                interpolation: str = "bilinear") -> torch.Tensor:
    """(uint8 CHW image, view params) -> uint8 CHW tensor of the given size: crop, resize, flip."""
    _, h, w = image.shape
    if view.top < 0 or view.left < 0 or view.top + view.height > h or view.left + view.width > w:
        raise ValueError(f"view {view} does not fit an image of {h}x{w}; the image changed since caching")
    out_size = [size, size] if isinstance(size, int) else list(size)
    out = F.resized_crop(image, view.top, view.left, view.height, view.width, out_size,
                         interpolation=_INTERPOLATION[interpolation], antialias=True)
    return F.horizontal_flip(out) if view.flip else out


def normalize(batch_u8: torch.Tensor, mean: tuple[float, ...], std: tuple[float, ...]) -> torch.Tensor:
    """uint8 (N)CHW -> float normalised with mean/std given in [0, 1] units."""
    x = batch_u8.float().div_(255.0)
    shape = (-1, 1, 1)
    m = torch.tensor(mean, dtype=x.dtype, device=x.device).view(shape)
    s = torch.tensor(std, dtype=x.dtype, device=x.device).view(shape)
    return (x - m) / s
