"""Validation: top-1, top-5, CE loss and top-1 agreement with the teacher, summed across ranks.

The running sums live on the model's device and are all-reduced there: NCCL accepts no CPU tensors, and a
`.cpu()` / `.item()` per batch would stall the GPU on every step. The host sees the totals once, at the end.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch
import torch.distributed as dist
import torch.nn.functional as F


def to_model_input(pixels: torch.Tensor, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """Host batch -> the model's device and dtype; channels_last on CUDA (what cuDNN's fast convs want)."""
    x = pixels.to(device=device, dtype=dtype, non_blocking=True)
    return x.contiguous(memory_format=torch.channels_last) if device.type == "cuda" and x.ndim == 4 else x


def _accumulate(sums: torch.Tensor, logits: torch.Tensor, b: dict[str, torch.Tensor]) -> None:
    """Add one batch's counts into `sums` (all tensors on the same device)."""
    w = b["weight"].to(sums.dtype)
    label = b["label"]
    has = (label >= 0).to(sums.dtype) * w
    label = label.clamp_min(0)
    top5 = logits.topk(min(5, logits.shape[1]), dim=1).indices
    teacher = b["teacher_top1_view0"]
    has_t = (teacher >= 0).to(sums.dtype) * w
    sums += torch.stack([
        has.sum(),
        ((top5[:, 0] == label).to(sums.dtype) * has).sum(),
        ((top5 == label[:, None]).any(1).to(sums.dtype) * has).sum(),
        (F.cross_entropy(logits, label, reduction="none").to(sums.dtype) * has).sum(),
        w.sum(),
        ((top5[:, 0] == teacher).to(sums.dtype) * has_t).sum(),
        has_t.sum(),
    ])


def evaluate(forward: Callable[[torch.Tensor], torch.Tensor], batches: Iterable[dict[str, torch.Tensor]],
             device: torch.device, dtype: torch.dtype) -> dict[str, float | None]:
    """`forward(x) -> logits`; every rank passes its own (padded) batches; totals are all-reduced on `device`."""
    def one(b: dict[str, torch.Tensor]) -> list[torch.Tensor]:
        return [forward(to_model_input(b["pixels"], device, dtype))]

    return evaluate_many(one, 1, batches, device)[0]


def evaluate_many(forward_all: Callable[[dict[str, torch.Tensor]], list[torch.Tensor]], n: int,
                  batches: Iterable[dict[str, torch.Tensor]], device: torch.device) -> list[dict[str, float | None]]:
    """`forward_all(batch) -> n logits` (the students of a group on one batch); one all-reduce on `device` for all."""
    # per student: labelled, top1, top5, ce_sum, n, agree, with_teacher; float64 where the device has it (MPS not)
    sums = torch.zeros(n, 7, dtype=torch.float64, device=device)
    keys = ("weight", "label", "teacher_top1_view0")
    with torch.no_grad():
        for b in batches:
            targets = {k: b[k].to(device, non_blocking=True) for k in keys}
            for i, logits in enumerate(forward_all(b)):
                _accumulate(sums[i], logits.float(), targets)
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(sums)
    out = []
    for labelled, top1, top5, ce, seen, agree, with_teacher in sums.tolist():  # the one host sync
        out.append({
            "val_top1": top1 / labelled if labelled else None,
            "val_top5": top5 / labelled if labelled else None,
            "val_loss": ce / labelled if labelled else None,
            "val_teacher_agreement": agree / with_teacher if with_teacher else None,
            "val_samples": seen,
        })
    return out
