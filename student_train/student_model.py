"""A student's network: its architecture built for the cache's classes and its input channels, optionally started
from a local checkpoint (`init_checkpoint`).

Why a local checkpoint: small students are usually distilled from pretrained weights (an ImageNet MobileNet), not
from a random init; nothing here downloads them, the user points at a state dict they have. It is loaded with
`weights_only=True` (a pickle is refused, never run) and must be the same architecture: every tensor is taken as it
is except the classifier head when the class count differs (it keeps the student's fresh init, drawn from its seed)
and the stem when the input channels differ (adapted with timm's `adapt_input_conv`: an RGB stem summed over its
channels for a grey student, which is exact for a grey image replicated to RGB). Anything else that does not fit is
an error naming the tensors.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from distill.core.atomic_io import file_sha256
from distill.core.errors import InputError
from distill.core.models import create_model
from distill.student_train.variant import VariantConfig


class InitCheckpointError(InputError):
    """A student's init_checkpoint cannot be read or does not fit its architecture; the message says which."""


def build_student(v: VariantConfig, num_classes: int, channels: int) -> tuple[nn.Module, dict[str, Any] | None]:
    """(the student's model, what its init checkpoint gave it or None); call after seeding (the head's init)."""
    model = create_model(v.arch, num_classes=num_classes, in_chans=channels, **v.arch_kwargs)
    if v.init_checkpoint is None:
        return model, None
    return model, load_init_checkpoint(model, Path(v.init_checkpoint))


def _state_dict(blob: object, path: Path) -> dict[str, torch.Tensor]:
    """A plain state dict, or one under 'state_dict' / 'model' (how training scripts commonly save them)."""
    if isinstance(blob, dict):
        for key in ("state_dict", "model"):
            if isinstance(blob.get(key), dict):
                blob = blob[key]
                break
    if not isinstance(blob, dict) or not blob or not all(isinstance(t, torch.Tensor) for t in blob.values()):
        raise InitCheckpointError(f"init_checkpoint {path}: not a state dict (name -> tensor); save one with "
                                  "torch.save(model.state_dict(), path)")
    return blob


def _module_name(model: nn.Module, module: nn.Module | None) -> str | None:
    return next((n for n, m in model.named_modules() if m is module), None) if module is not None else None


def head_and_stem(model: nn.Module) -> tuple[str | None, str | None]:
    """(the classifier's module name, the stem convolution's): timm's get_classifier() else the last Linear; the
    first Conv2d."""
    get = getattr(model, "get_classifier", None)
    head = get() if callable(get) else None
    if not isinstance(head, nn.Linear):
        head = next((m for m in reversed(list(model.modules())) if isinstance(m, nn.Linear)), None)
    stem = next((m for m in model.modules() if isinstance(m, nn.Conv2d)), None)
    return _module_name(model, head), _module_name(model, stem)


def load_init_checkpoint(model: nn.Module, path: Path) -> dict[str, Any]:
    """Load `path` into `model` (in place): head replaced when the class count differs, stem adapted when the input
    channels differ; returns the record arch.json and the leaderboard keep."""
    from timm.models import adapt_input_conv

    if not path.is_file():
        raise InitCheckpointError(f"init_checkpoint {path} not found; fix the variant's `init_checkpoint`")
    try:
        blob = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # pickle refusals and damaged files raise many types
        raise InitCheckpointError(f"init_checkpoint {path}: cannot be read with weights_only=True "
                                  f"({exc.__class__.__name__}: {str(exc).splitlines()[0][:200]}); it must hold "
                                  "tensors only: torch.save(model.state_dict(), path)") from None
    given, own = _state_dict(blob, path), model.state_dict()
    head, stem = head_and_stem(model)
    head_keys = {f"{head}.weight", f"{head}.bias"} if head else set()
    stem_key = f"{stem}.weight" if stem else None
    out: dict[str, torch.Tensor] = {}
    replaced, adapted, problems = [], None, []
    for key, mine in own.items():
        theirs = given.get(key)
        if theirs is None:
            if key in head_keys:  # a headless checkpoint (timm num_classes=0): the head stays fresh
                replaced.append(key)
            else:
                problems.append(f"{key} missing")
        elif theirs.shape == mine.shape:
            out[key] = theirs.to(mine.dtype)
        elif key in head_keys:
            replaced.append(key)
        elif key == stem_key and theirs.ndim == 4 and theirs.shape[:1] + theirs.shape[2:] == mine.shape[:1] + \
                mine.shape[2:] and theirs.shape[1] in (1, 3):
            out[key] = adapt_input_conv(mine.shape[1], theirs, base_chans=theirs.shape[1]).to(mine.dtype)
            adapted = f"{key}: {theirs.shape[1]} -> {mine.shape[1]} input channels"
        else:
            problems.append(f"{key} is {tuple(theirs.shape)} there, {tuple(mine.shape)} here")
    problems += [f"{k} is not in this architecture" for k in given if k not in own]
    if problems:
        more = f" (and {len(problems) - 6} more)" if len(problems) > 6 else ""
        raise InitCheckpointError(
            f"init_checkpoint {path} does not fit this student ({len(problems)} tensors): {'; '.join(problems[:6])}"
            f"{more}. Only the classifier head ({head}) may differ in class count and the stem ({stem}) in input "
            "channels: use the checkpoint's own architecture and arch_kwargs")
    model.load_state_dict({**own, **out})
    shapes = {k: list(given[k].shape) for k in replaced if k in given}
    return {"path": str(path), "sha256": file_sha256(path), "head_replaced": replaced,
            "head_shapes_in_checkpoint": shapes, "stem_adapted": adapted}
