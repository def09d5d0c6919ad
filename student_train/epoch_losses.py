"""Epoch means of the loss parts, accumulated on the training device."""

from __future__ import annotations

import torch

LOSS_PARTS = ("loss", "kd_loss", "task_loss", "feat_loss")


class EpochLosses:
    """Row-weighted epoch means of the loss parts, summed on the device (no host sync per step).

    `task_loss` (CE on true labels) is averaged over the labelled rows only: beside an unlabelled pool a batch of
    pool rows has no CE term, and counting its rows would report the CE of the labelled rows diluted by the pool
    (0.012 instead of 0.12 at 10% labels). Every other part is averaged over all rows.
    """

    def __init__(self, device: torch.device) -> None:
        # n_seen, loss, kd, task, feat, labelled rows
        self.sums = torch.zeros(len(LOSS_PARTS) + 2, dtype=torch.float64, device=device)

    def add(self, losses: dict[str, torch.Tensor], batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """Add one batch (host `weight`/`label` tensors); returns the detached parts for the finite check."""
        device = self.sums.device
        w = batch["weight"].to(device, non_blocking=True).sum().double()
        w_lab = (batch["weight"] * (batch["label"] >= 0)).to(device, non_blocking=True).sum().double()
        detached = torch.stack([losses[k].detach().double() for k in LOSS_PARTS])
        scale = torch.stack([w, w, w_lab, w])
        self.sums += torch.cat([w.reshape(1), torch.nan_to_num(detached) * scale, w_lab.reshape(1)])
        return detached

    def means(self) -> dict[str, float]:
        n_seen, loss, kd, task, feat, n_labelled = self.sums.tolist()
        n = max(1.0, n_seen)
        return {"train_samples": n_seen, "train_loss": loss / n, "kd_loss": kd / n,
                "task_loss": task / max(1.0, n_labelled), "feat_loss": feat / n}
