"""Sparse soft labels: pack full logits into top-k + tail, rebuild the distribution at any temperature.

Packing keeps, per view, the k largest logits (shifted by the full log-sum-exp, i.e. log-probabilities at
T=1) and the log-sum-exp of the C-k logits outside the top-k. Reconstruction treats the tail as uniform: every
tail class gets logit ``tail_lse - log(C-k)``, which keeps the tail's total mass exact at T=1.

What is exact and what is not (tested in tests/unit/test_topk.py) -- the rebuild is NOT the teacher's
distribution, at any T, unless k = C:
- Exact at T=1, up to storage rounding: the k top probabilities and the total tail mass m. Logits are stored
  as float16 log-probabilities: a value v is off by at most |v| * 2**-11, so each top-k probability is off by
  a relative factor of at most exp(|v| * 2**-11) - 1 (< 0.5% for v >= -10). The tail lse is float32.
- Lost: the shape of the tail. It is spread uniformly, so at T=1 KL(full || rebuilt) = m * KL(tail || uniform)
  <= m * log(C-k). At T != 1 the tempered tail mass is approximate as well.
- Measured on a real 1000-class teacher at k=10: KL(full_T || rebuilt_T) is about 0.3 nats at T=1 and about
  0.03 nats at T=4 (higher temperatures flatten the true tail towards the uniform one). Raise k when the
  tail matters to the student; k = C rebuilds exactly (up to rounding).
"""

from __future__ import annotations

import math

import torch


def pack_topk(logits: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Full logits (N, C) -> (ids (N,k) int64, shifted top-k logits (N,k) fp32, tail lse (N,) fp32).

    Runs on the logits' device: on a GPU only the packed (N, k) tensors need to come back to the host.
    """
    if logits.ndim != 2:
        raise ValueError(f"expected logits of shape (N, C), got {tuple(logits.shape)}")
    n, c = logits.shape
    if not 1 <= k <= c:
        raise ValueError(f"top-k must be between 1 and the number of classes ({c}), got {k}")
    z = logits.float()
    z = z - torch.logsumexp(z, dim=1, keepdim=True)
    vals, ids = torch.topk(z, k, dim=1)
    if k == c:
        tail = torch.full((n,), float("-inf"), device=z.device)
    else:
        masked = z.scatter(1, ids, float("-inf"))
        tail = torch.logsumexp(masked, dim=1)
    return ids, vals, tail


def rebuild_log_probs(
    ids: torch.Tensor,
    topk_logits: torch.Tensor,
    tail_lse: torch.Tensor,
    num_classes: int,
    temperature: float = 1.0,
) -> torch.Tensor:
    """Dense teacher log-probabilities (N, C) at temperature T from the sparse cache entries.

    Why dense: the KD loss needs q_student for every class anyway, and C <= a few thousand in vision.
    """
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    n, k = ids.shape
    vals = topk_logits.float()
    tail = tail_lse.float()
    if k < num_classes:
        per_class_tail = tail - math.log(num_classes - k)
        dense = per_class_tail[:, None].expand(n, num_classes).clone()
    else:
        dense = torch.full((n, num_classes), float("-inf"), device=vals.device)
    dense.scatter_(1, ids.long(), vals)
    return torch.log_softmax(dense / temperature, dim=1)


def topk_mass(topk_logits: torch.Tensor) -> torch.Tensor:
    """Probability mass at T=1 held by the stored top-k (per row)."""
    return topk_logits.float().exp().sum(dim=-1)
