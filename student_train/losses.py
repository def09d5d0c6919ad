"""Distillation losses, by name: ``create_loss(mode, alpha=..., temperature=..., beta=..., feature_loss=...)``.

Every loss takes the student logits and a batch dict and returns {"loss", "kd_loss", "task_loss", "feat_loss"}.
Batch fields: ``label`` (N,) int64 with -1 where unlabelled; ``teacher_logp`` (N, C) teacher log-probabilities
at the loss's temperature (soft/online); ``teacher_top1`` (N,) int64 (hard); ``weight`` (N,) float, 0 for
padding rows that only keep ranks in step. Feature KD (beta > 0) also reads ``student_feat`` (N, d): the
student's penultimate features through its learned projector, and ``teacher_feat`` (N, d): the cached teacher
embedding of the same view; loss = the logit loss + beta * feature distance (cosine or mse).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

Batch = dict[str, torch.Tensor]
LossFn = Callable[[torch.Tensor, Batch], dict[str, torch.Tensor]]


def _weighted_mean(per_sample: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    return (per_sample * weight).sum() / weight.sum().clamp_min(1e-8)


def task_ce(logits: torch.Tensor, batch: Batch) -> torch.Tensor:
    """Cross-entropy on the true labels; unlabelled (-1) and padding rows contribute nothing."""
    label = batch["label"]
    has = (label >= 0).float() * batch["weight"]
    ce = F.cross_entropy(logits.float(), label.clamp_min(0), reduction="none")
    return _weighted_mean(ce, has)


def kd_kl(logits: torch.Tensor, teacher_logp: torch.Tensor, temperature: float, weight: torch.Tensor) -> torch.Tensor:
    """T^2 * KL(teacher_T || student_T), per-sample then weighted mean (Hinton et al.)."""
    student_logp = F.log_softmax(logits.float() / temperature, dim=1)
    p = teacher_logp.exp()
    kl = (p * (teacher_logp - student_logp)).nan_to_num(0.0).sum(dim=1)  # 0 * log 0 terms are 0
    return _weighted_mean(kl, weight) * temperature**2


def soft_loss(alpha: float, temperature: float) -> LossFn:
    def fn(logits: torch.Tensor, batch: Batch) -> dict[str, torch.Tensor]:
        kd = kd_kl(logits, batch["teacher_logp"], temperature, batch["weight"])
        task = task_ce(logits, batch) if alpha < 1 else torch.zeros((), device=logits.device)
        return {"loss": alpha * kd + (1 - alpha) * task, "kd_loss": kd, "task_loss": task}

    return fn


def hard_loss(alpha: float, temperature: float) -> LossFn:
    """Hard-label distillation: the teacher's argmax is the target, mixed with the true label by (1 - alpha)."""
    del temperature

    def fn(logits: torch.Tensor, batch: Batch) -> dict[str, torch.Tensor]:
        ce = F.cross_entropy(logits.float(), batch["teacher_top1"], reduction="none")
        kd = _weighted_mean(ce, batch["weight"])
        task = task_ce(logits, batch) if alpha < 1 else torch.zeros((), device=logits.device)
        return {"loss": alpha * kd + (1 - alpha) * task, "kd_loss": kd, "task_loss": task}

    return fn


def plain_ce(alpha: float, temperature: float) -> LossFn:
    del alpha, temperature

    def fn(logits: torch.Tensor, batch: Batch) -> dict[str, torch.Tensor]:
        task = task_ce(logits, batch)
        return {"loss": task, "kd_loss": torch.zeros((), device=logits.device), "task_loss": task}

    return fn


def feature_distance(student: torch.Tensor, teacher: torch.Tensor, kind: str) -> torch.Tensor:
    """Per-sample distance: 1 - cosine similarity (scale-free), or the mean squared difference per dim."""
    s, t = student.float(), teacher.float()
    if kind == "cosine":
        return 1.0 - F.cosine_similarity(s, t, dim=1, eps=1e-8)
    if kind == "mse":
        return (s - t).pow(2).mean(dim=1)
    raise ValueError(f"unknown feature_loss '{kind}'; valid: {list(FEATURE_LOSSES)}")


FEATURE_LOSSES = ("cosine", "mse")


def with_feature_kd(fn: LossFn, beta: float, kind: str) -> LossFn:
    """Add beta * feature distance (weighted like the other terms) to a logit loss; beta 0 adds a zero term."""
    if kind not in FEATURE_LOSSES:
        raise ValueError(f"unknown feature_loss '{kind}'; valid: {list(FEATURE_LOSSES)}")

    def wrapped(logits: torch.Tensor, batch: Batch) -> dict[str, torch.Tensor]:
        out = fn(logits, batch)
        if beta > 0:
            feat = _weighted_mean(feature_distance(batch["student_feat"], batch["teacher_feat"], kind),
                                  batch["weight"])
            out["loss"] = out["loss"] + beta * feat
        else:
            feat = torch.zeros((), device=logits.device)
        out["feat_loss"] = feat
        return out

    return wrapped


_LOSSES: dict[str, Callable[[float, float], LossFn]] = {
    "soft": soft_loss, "online": soft_loss, "hard": hard_loss, "none": plain_ce,
}


def create_loss(mode: str, alpha: float = 0.9, temperature: float = 4.0, beta: float = 0.0,
                feature_loss: str = "cosine") -> LossFn:
    if mode not in _LOSSES:
        raise ValueError(f"unknown distillation mode '{mode}'; valid: {sorted(_LOSSES)}")
    return with_feature_kd(_LOSSES[mode](alpha, temperature), beta, feature_loss)
