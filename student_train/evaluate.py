"""Validation: top-1, top-5, CE loss and top-1 agreement with the teacher, summed across ranks."""

from __future__ import annotations

from collections.abc import Iterable

import torch
import torch.distributed as dist
import torch.nn.functional as F


def evaluate(forward: callable, batches: Iterable[dict[str, torch.Tensor]], device: torch.device,
             dtype: torch.dtype) -> dict[str, float | None]:
    """`forward(x) -> logits`; every rank passes its own (padded) batches; totals are all-reduced."""
    sums = torch.zeros(7, dtype=torch.float64)  # labelled, top1, top5, ce_sum, n, agree, with_teacher
    with torch.no_grad():
        for b in batches:
            logits = forward(b["pixels"].to(device=device, dtype=dtype)).float().cpu()
            w = b["weight"]
            has = (b["label"] >= 0).float() * w
            label = b["label"].clamp_min(0)
            top5 = logits.topk(min(5, logits.shape[1]), dim=1).indices
            sums[0] += has.sum()
            sums[1] += ((top5[:, 0] == label).float() * has).sum()
            sums[2] += ((top5 == label[:, None]).any(1).float() * has).sum()
            sums[3] += (F.cross_entropy(logits, label, reduction="none") * has).sum()
            sums[4] += w.sum()
            has_t = (b["teacher_top1_view0"] >= 0).float() * w
            sums[5] += ((top5[:, 0] == b["teacher_top1_view0"]).float() * has_t).sum()
            sums[6] += has_t.sum()
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(sums)
    labelled, n, with_teacher = float(sums[0]), float(sums[4]), float(sums[6])
    return {
        "val_top1": float(sums[1]) / labelled if labelled else None,
        "val_top5": float(sums[2]) / labelled if labelled else None,
        "val_loss": float(sums[3]) / labelled if labelled else None,
        "val_teacher_agreement": float(sums[5]) / with_teacher if with_teacher else None,
        "val_samples": n,
    }
