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
        if self.scripted is not None:
            p = self.preprocessing
            missing = [f"preprocessing.{name}" for name in ("input_size", "mean", "std", "crop_pct")
                       if getattr(p, name) is None]
            if missing:  # a foreign file says nothing of its input: defaults would label the wrong pixels
                raise ValueError(f"a `scripted` teacher needs {', '.join(missing)}: a TorchScript / torch.export "
                                 "file does not record how its input was made, and defaults would feed it other "
                                 "pixels than it was trained on (e.g. input_size: 224, crop_pct: 0.875, mean: "
                                 "[0.485, 0.456, 0.406], std: [0.229, 0.224, 0.225] for ImageNet's usual ones)")
        return self
