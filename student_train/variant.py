"""One student variant's config: architecture + hyper-parameters (every field can be a grid axis of train.grid)."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Literal

from pydantic import Field, field_validator, model_validator

from distill.core.config import StrictConfig, absolute

if TYPE_CHECKING:
    from distill.student_train.losses import Loss

Mode = Literal["soft", "hard", "none", "online"]


class VariantConfig(StrictConfig):
    """One student: architecture + hyperparameters. Every field can also be a grid axis."""

    name: str | None = Field(None, description="default: built from arch and the grid values")
    arch: str = "cnn_small"
    arch_kwargs: dict[str, int | float | str | bool] = Field(default_factory=dict)
    input_size: int | None = Field(None, ge=8, description="student input size (default: the teacher's)")
    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None
    channels: Literal[1, 3] | None = Field(None, description="student input channels (default: the cache's); 3 "
                                           "on a grey (1-channel) cache replicates its grey pixels to 3 channels, "
                                           "for architectures that take only RGB (torchvision) or RGB weights")
    init_checkpoint: Path | None = Field(None, description="start from this local state dict (e.g. ImageNet "
                                         "weights of the same architecture; loaded with weights_only=True): a "
                                         "classifier head of another class count is replaced, a stem of other "
                                         "input channels adapted (summed to grey / replicated to RGB)")
    mode: Mode = "soft"
    alpha: float = Field(0.9, ge=0.0, le=1.0, description="weight of the distillation term")
    temperature: float = Field(4.0, gt=0.0)
    beta: float = Field(0.0, ge=0.0, description="weight of the feature-KD loss (0 = off); needs a cache written "
                        "with cache.features.enabled: true")
    feature_loss: Literal["cosine", "mse"] = Field("cosine", description="feature-KD distance (through a learned "
                                                   "projector on the student's penultimate features)")
    loss: dict[str, dict[str, float | str]] | None = Field(
        None, description="explicit loss terms, replacing the mode's alpha/temperature/beta recipe: {term: {weight: w, "
        "<param>: value}}, e.g. {kd: {weight: 0.7, temperature: 2}, ce: {weight: 0.3}}; terms are registered in "
        "student_train/losses.py (kd, hard_kd, ce, feat, ...); the mode still says where the teacher comes from "
        "(soft/hard: the cache, online: live)")
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

    @field_validator("init_checkpoint")
    @classmethod
    def _absolute(cls, path: Path | None) -> Path | None:
        """A relative path means what it meant where the user typed it (Ray workers run elsewhere)."""
        return absolute(path)  # type: ignore[return-value]

    @model_validator(mode="after")
    def _feature_kd_needs_teacher(self) -> VariantConfig:
        if self.beta > 0 and self.mode == "none":
            raise ValueError("beta > 0 (feature KD) needs the teacher cache: set mode soft/hard/online, or beta: 0 "
                             "for a no-KD baseline")
        if self.loss is not None:
            from distill.student_train.losses import create_loss

            needs = create_loss(terms=self.loss).needs  # unknown terms or parameters fail here, listing valid ones
            teacher = sorted(needs & {"teacher_logp", "teacher_top1", "teacher_feat"})
            if teacher and self.mode == "none":
                raise ValueError(f"loss terms reading {teacher} need a teacher: set mode soft/hard/online")
            if self.beta > 0:
                raise ValueError("give feature KD either as beta (with the mode's recipe) or as a `feat` term in "
                                 "`loss`, not both")
        return self

    @property
    def feature_kd(self) -> bool:
        """The student trains a feature projector against cached teacher features (beta > 0, or a `feat` term)."""
        return self.beta > 0 or bool(self.loss and float(self.loss.get("feat", {}).get("weight", 0)) > 0)

    def make_loss(self) -> Loss:
        """The student's loss (student_train/losses.py): its explicit `loss` terms, else its mode's recipe."""
        from distill.student_train.losses import create_loss

        return create_loss(self.mode, self.alpha, self.temperature, self.beta, self.feature_loss, self.loss)

    def display_name(self, index: int) -> str:
        return self.name or f"v{index:02d}-{self.arch}-{self.mode}"
