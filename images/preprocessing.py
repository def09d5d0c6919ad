"""How a decoded image becomes a model's input: the teacher's preprocessing, as a user gives it (`PreprocessingConfig`,
any field may be left empty) and as it is resolved and recorded in every cache file (`Preprocessing`)."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Literal

from pydantic import Field

from distill.core.config import StrictConfig

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class PreprocessingConfig(StrictConfig):
    """Teacher preprocessing; any field left empty comes from the model's pretrained config, then defaults."""

    input_size: int | None = Field(None, ge=8, le=2048, description="square input size in pixels")
    crop_pct: float | None = Field(None, gt=0.0, le=1.0, description="eval view: share of the shorter side")
    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None
    interpolation: Literal["bilinear", "bicubic", "nearest"] | None = None
    channels: Literal[1, 3] | None = Field(None, description="1 = grayscale, 3 = RGB (alpha is dropped)")


@dataclass(frozen=True)
class Preprocessing:
    """Everything needed to turn a replayed crop into the teacher's input tensor."""

    input_size: int
    crop_pct: float
    mean: tuple[float, ...]
    std: tuple[float, ...]
    interpolation: str
    channels: int
    # a student's input only: decode with this many channels (the cache's), then replicate to `channels` (a grey
    # cache's student with 3 input channels sees the grey pixels its teacher labelled, in every channel)
    source_channels: int | None = None

    @property
    def decode_channels(self) -> int:
        """How many channels an image is decoded with (the pixels the teacher saw)."""
        return self.source_channels or self.channels

    def as_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["mean"], d["std"] = list(self.mean), list(self.std)
        if self.source_channels is None:  # cache metadata and fingerprints keep their form
            del d["source_channels"]
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Preprocessing:
        source = d.get("source_channels")
        return cls(int(d["input_size"]), float(d["crop_pct"]), tuple(d["mean"]), tuple(d["std"]),
                   str(d["interpolation"]), int(d["channels"]), int(source) if source is not None else None)
