"""Configuration of `distill compress`: select students, prune + KD fine-tune, int8, measure."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class SelectConfig(_Strict):
    top_n: int = Field(1, ge=1, description="how many students to compress")
    by: Literal["val_top1", "pareto"] = Field("val_top1", description="best accuracy, or the accuracy/MACs front")


class PruneConfig(_Strict):
    enabled: bool = True
    target: Literal["macs", "params"] = "macs"
    ratio: float = Field(0.5, gt=0.0, lt=1.0, description="keep this fraction of the MACs (or parameters)")
    round_to: int = Field(8, ge=1, description="channel counts become multiples of this (hardware friendly)")
    finetune_epochs: int = Field(3, ge=0, description="KD fine-tune from the same cache after pruning")
    finetune_lr: float = Field(1e-3, gt=0.0)


class QuantizeConfig(_Strict):
    enabled: bool = True
    calib_samples: int = Field(256, ge=8, description="cached training samples (replayed views) to calibrate on")
    per_channel: bool = True
    method: Literal["minmax", "entropy", "percentile"] = "minmax"


class LatencyConfig(_Strict):
    repeats_b1: int = Field(50, ge=3)
    repeats_b32: int = Field(10, ge=3)
    warmup: int = Field(5, ge=1)
    threads: int | None = Field(None, ge=1, description="onnxruntime intra-op threads (default: all cores)")


class CompressConfig(_Strict):
    """`distill compress`: reads a `distill train` run (its leaderboard, checkpoints and resolved config)."""

    train_run: Path = Field(..., description="run_dir of a finished `distill train`")
    out_dir: Path
    select: SelectConfig = Field(default_factory=SelectConfig)
    prune: PruneConfig = Field(default_factory=PruneConfig)
    quantize: QuantizeConfig = Field(default_factory=QuantizeConfig)
    latency: LatencyConfig = Field(default_factory=LatencyConfig)
    val_limit: int | None = Field(None, ge=1, description="evaluate on at most this many val samples")
