"""One student variant's config: architecture + hyper-parameters (every field can be a grid axis of train.grid)."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

Mode = Literal["soft", "hard", "none", "online"]


class VariantConfig(BaseModel):
    """One student: architecture + hyperparameters. Every field can also be a grid axis."""

    model_config = ConfigDict(extra="forbid")

    name: str | None = Field(None, description="default: built from arch and the grid values")
    arch: str = "cnn_small"
    arch_kwargs: dict[str, int | float | str | bool] = Field(default_factory=dict)
    input_size: int | None = Field(None, ge=8, description="student input size (default: the teacher's)")
    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None
    mode: Mode = "soft"
    alpha: float = Field(0.9, ge=0.0, le=1.0, description="weight of the distillation term")
    temperature: float = Field(4.0, gt=0.0)
    beta: float = Field(0.0, ge=0.0, description="weight of the feature-KD loss (0 = off); needs a cache written "
                        "with cache.features.enabled: true")
    feature_loss: Literal["cosine", "mse"] = Field("cosine", description="feature-KD distance (through a learned "
                                                   "projector on the student's penultimate features)")
    views: int | None = Field(None, ge=1, description="how many cached views to cycle through (default: all)")
    epochs: int = Field(5, ge=1)
    batch_size: int = Field(64, ge=1, description="micro-batch per worker")
    grad_accum: int = Field(1, ge=1)
    optimizer: Literal["adamw", "sgd"] = "adamw"
    lr: float = Field(2e-3, gt=0.0)
    weight_decay: float = Field(0.05, ge=0.0)
    momentum: float = Field(0.9, ge=0.0, lt=1.0)
    warmup_epochs: float = Field(0.5, ge=0.0)
    min_lr_ratio: float = Field(0.01, ge=0.0, le=1.0)
    clip_grad: float | None = Field(1.0, gt=0.0)
    zero_stage: Literal[0, 1, 2, 3] = 0
    precision: Literal["fp32", "bf16"] = "fp32"
    num_workers: int = Field(1, ge=1, description="DeepSpeed data-parallel ranks (Ray Train workers)")
    cpus_per_worker: float = Field(1.0, gt=0.0)
    gpus_per_worker: float = Field(0.0, ge=0.0)
    seed: int = 0
    data_seed: int | None = Field(None, description="seed of the data order and views (default: seed); "
                                  "students of one data seed share a data stream (train.fuse), so a seed "
                                  "sweep with a fixed data_seed varies only the initial weights")

    @model_validator(mode="after")
    def _feature_kd_needs_teacher(self) -> VariantConfig:
        if self.beta > 0 and self.mode == "none":
            raise ValueError("beta > 0 (feature KD) needs the teacher cache: set mode soft/hard/online, or beta: 0 "
                             "for a no-KD baseline")
        return self

    def display_name(self, index: int) -> str:
        return self.name or f"v{index:02d}-{self.arch}-{self.mode}"
