"""Epoch means of the loss parts, accumulated on the training device."""

from __future__ import annotations

import torch

from distill.student_train.losses import labelled_parts, loss_parts


class EpochLosses:
    """Row-weighted epoch means of the loss parts, summed on the device (no host sync per step).

    `task_loss` (CE on true labels) is averaged over the labelled rows only: beside an unlabelled pool a batch of
    pool rows has no CE term, and counting its rows would report the CE of the labelled rows diluted by the pool
    (0.012 instead of 0.12 at 10% labels). Every other part is averaged over all rows.
    """

    def __init__(self, device: torch.device) -> None:
        self.parts = loss_parts()  # "loss" + every registered term's part (student_train/losses.py)
        # n_seen, one sum per part, labelled rows
        self.sums = torch.zeros(len(self.parts) + 2, dtype=torch.float64, device=device)
        self.by_labelled = [p in labelled_parts() for p in self.parts]

    def add(self, losses: dict[str, torch.Tensor], batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """Add one batch (host `weight`/`label` tensors); returns the detached parts for the finite check."""
        device = self.sums.device
        w = batch["weight"].to(device, non_blocking=True).sum().double()
        w_lab = (batch["weight"] * (batch["label"] >= 0)).to(device, non_blocking=True).sum().double()
        detached = torch.stack([losses[k].detach().double() for k in self.parts])
        scale = torch.stack([w_lab if lab else w for lab in self.by_labelled])
        self.sums += torch.cat([w.reshape(1), torch.nan_to_num(detached) * scale, w_lab.reshape(1)])
        return detached

    def means(self) -> dict[str, float]:
        n_seen, *sums, n_labelled = self.sums.tolist()
        out = {"train_samples": n_seen}
        for part, total, lab in zip(self.parts, sums, self.by_labelled, strict=True):
            out["train_loss" if part == "loss" else part] = total / max(1.0, n_labelled if lab else n_seen)
        return out
