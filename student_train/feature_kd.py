"""Feature KD on the student side: a learned projector from the student's penultimate features to the teacher's.

The projector is a training aid only. It lives in one nn.Module with the student so DeepSpeed optimises and
checkpoints both (resume keeps it), and it is dropped when the student is exported: best.pt and arch.json hold
the plain student, so compress and deploy never see it.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from distill.core.errors import InputError
from distill.teacher.hooks import PenultimateHook, last_linear
from distill.teacher_cache.contract import SCHEMA_VERSION, CacheReader

STUDENT_PREFIX = "student."


class FeatureKDError(InputError):
    """A variant asks for feature KD that its cache cannot serve; says how to fix it."""


class StudentWithProjector(nn.Module):
    """``forward(x)`` -> logits (evaluation, unchanged); ``forward(x, with_features=True)`` -> (logits, proj)."""

    def __init__(self, student: nn.Module, teacher_dim: int) -> None:
        super().__init__()
        self.student = student
        _, linear = last_linear(student, "student")
        self.projector = nn.Linear(linear.in_features, teacher_dim)
        self._hook = PenultimateHook(linear)

    def forward(self, x: torch.Tensor, with_features: bool = False) -> Any:
        logits = self.student(x)
        feats = self._hook.take()
        if not with_features:
            return logits
        return logits, self.projector(feats.to(self.projector.weight.dtype))


def wrap_student(model: nn.Module, feature_kd: bool, teacher_dim: int | None, variant: str) -> nn.Module:
    """The module DeepSpeed trains: the student alone, or student + projector for feature KD."""
    if not feature_kd:
        return model
    if teacher_dim is None:
        raise FeatureKDError(f"variant {variant}: beta > 0 but the cache has no teacher features; set "
                             "`cache.features.enabled: true` and re-run `distill cache`")
    return StudentWithProjector(model, teacher_dim)


def plain_student_state(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A wrapper's state dict -> the plain student's (projector dropped); a plain state dict passes through."""
    if not any(k.startswith(STUDENT_PREFIX) for k in state):
        return state
    return {k.removeprefix(STUDENT_PREFIX): t for k, t in state.items() if k.startswith(STUDENT_PREFIX)}


def forward_train(engine: Any, x: torch.Tensor, batch: dict[str, torch.Tensor], feature_kd: bool) -> torch.Tensor:
    """Student forward for the loss; with feature KD it also puts the projected features into the batch."""
    if not feature_kd:
        return engine(x)
    logits, proj = engine(x, with_features=True)
    batch["student_feat"] = proj
    if "teacher_feat" not in batch:  # a zero-weight placeholder batch: the projector still joins the step
        batch["teacher_feat"] = torch.zeros(proj.shape, dtype=torch.float32)
    return logits


def cache_feature_dim(reader: CacheReader, stems: list[str], variants: list[str]) -> int:
    """The feature dim every train shard's cache file stores; raise naming the file and the fix when one lacks it."""
    dims = set()
    for stem in stems:
        meta = reader.meta(stem)
        if meta.feature_dim is None:
            why = (f"schema v{meta.schema_version} file without teacher features" if meta.schema_version >= 2
                   else f"schema v{meta.schema_version} file (v{SCHEMA_VERSION} can store features)")
            raise FeatureKDError(
                f"variants {', '.join(variants)} ask for feature KD (beta > 0), but {reader.path(stem)} is a {why}. "
                "Fix: set `cache.features.enabled: true` and re-run `distill cache` (it writes a new fingerprint "
                "directory), then train from it; or set beta: 0")
        dims.add(meta.feature_dim)
    if len(dims) != 1:
        raise FeatureKDError(f"{reader.directory}: cache files disagree on the feature dim {sorted(dims)}; "
                             "re-run `distill cache`")
    return dims.pop()
