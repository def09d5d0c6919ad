"""What a teacher is, as a user gives it: an architecture + local checkpoint, or a TorchScript / torch.export file."""

from __future__ import annotations

from pathlib import Path

from pydantic import Field, model_validator

from distill.core.config import StrictConfig
from distill.images.preprocessing import PreprocessingConfig


class TeacherConfig(StrictConfig):
    """A teacher is an architecture + local checkpoint, or a TorchScript / torch.export file."""

    arch: str | None = Field(None, description="registered, timm:<name> or torchvision:<name>")
    arch_kwargs: dict[str, int | float | str | bool] = Field(default_factory=dict)
    checkpoint: Path | None = Field(None, description="state dict file, loaded with weights_only=True")
    pretrained: bool = Field(False, description="timm pretrained weights (needs hub access)")
    scripted: Path | None = Field(None, description="TorchScript (.pt) or torch.export (.pt2) file")
    num_classes: int | None = Field(None, ge=2, description="inferred from the checkpoint when empty")
    preprocessing: PreprocessingConfig = Field(default_factory=PreprocessingConfig)

    @model_validator(mode="after")
    def _one_source(self) -> TeacherConfig:
        if (self.arch is None) == (self.scripted is None):
            raise ValueError("give exactly one of `arch` (with `checkpoint`) or `scripted`")
        if self.arch is not None and self.checkpoint is None and not self.pretrained:
            raise ValueError(f"`arch: {self.arch}` needs `checkpoint: PATH` (or `pretrained: true`); "
                             "an untrained teacher would cache noise")
        if self.scripted is not None and self.preprocessing.input_size is None:
            raise ValueError("a `scripted` teacher needs `preprocessing.input_size` (and mean/std)")
        return self
