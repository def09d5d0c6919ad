"""Iterative structured pruning, each step followed by a KD fine-tune from the same teacher cache.

Why a keyed directory: `train_variant` resumes from any DeepSpeed checkpoint in its directory. A fine-tune
must resume only its OWN interrupted run, never one made from another parent (last night's student) or with
other prune settings, so the directory is named by a hash of the parent checkpoint's bytes, the student's
variant and the prune settings; directories with any other key are removed.
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import shutil
from pathlib import Path

import torch

from distill.compress.config import PruneConfig
from distill.compress.prune import count_cost, prune_to_target
from distill.core.atomic_io import file_sha256
from distill.student_train.config import VariantConfig
from distill.student_train.train_loop import JobSpec, WorkerContext, train_variant

log = logging.getLogger(__name__)


def finetune_identity(parent_ckpt: Path, variant_yaml: str, prune: PruneConfig, cache_dir: str = "") -> dict:
    """What a fine-tune was made from; `key` names its directory (same inputs -> same key -> resume)."""
    settings = prune.model_dump(mode="json", exclude={"enabled"})
    ident = {"parent_checkpoint": str(parent_ckpt), "parent_sha256": file_sha256(parent_ckpt),
             "variant_sha256": hashlib.sha256(variant_yaml.encode()).hexdigest(), "prune": settings,
             "cache_dir": cache_dir}
    blob = json.dumps({k: ident[k] for k in ("parent_sha256", "variant_sha256", "prune", "cache_dir")},
                      sort_keys=True)
    ident["key"] = hashlib.sha256(blob.encode()).hexdigest()[:16]
    return ident


def keyed_dir(out: Path, stem: str, ident: dict, why_stale: str) -> Path:
    """`<out>/<stem>-<key>` for a resumable training run (its identity written beside it): the same inputs resume
    their own run; a directory of the same stem with another key (other inputs) is deleted."""
    root = out / f"{stem}-{ident['key']}"
    for old in out.glob(f"{stem}*"):
        if old.is_dir() and old != root:
            log.info("removing stale %s (%s)", old, why_stale)
            shutil.rmtree(old)
    root.mkdir(parents=True, exist_ok=True)
    (root / "identity.json").write_text(json.dumps(ident, indent=1))
    return root


def finetune_dir(out: Path, ident: dict) -> Path:
    """`<out>/finetune-<key>`; stale fine-tunes of other parents/settings are deleted."""
    return keyed_dir(out, "finetune", ident, "another parent checkpoint or other prune settings")


def step_keeps(ratio: float, steps: int) -> list[float]:
    """Kept fraction of the ORIGINAL cost after each step: geometric, ending at `ratio`."""
    return [ratio ** ((i + 1) / steps) for i in range(steps)]


def finetune_variant(v: VariantConfig, prune: PruneConfig) -> VariantConfig:
    """The fine-tune schedule: the student's own KD recipe, with the prune config's epochs/lr/warm-up."""
    mode = "soft" if v.mode == "none" else v.mode
    alpha = prune.finetune_alpha if prune.finetune_alpha is not None else (0.5 if v.mode == "none" else v.alpha)
    return v.model_copy(update={
        "epochs": prune.finetune_epochs, "lr": prune.finetune_lr, "warmup_epochs": prune.finetune_warmup_epochs,
        "min_lr_ratio": prune.finetune_min_lr_ratio, "num_workers": 1, "zero_stage": 0, "precision": "fp32",
        "mode": mode, "alpha": alpha, "temperature": prune.finetune_temperature or v.temperature})


def _finetune(ft: VariantConfig, job: JobSpec, root: Path, step: int, model: torch.nn.Module) -> None:
    """Train a copy (DeepSpeed wraps and hooks what it gets) and load its best epoch back into `model`."""
    ft_job = copy.copy(job)
    ft_job.run_dir = root
    name = f"step{step}"
    train_variant(name, ft, ft_job, WorkerContext(), model=copy.deepcopy(model))
    model.load_state_dict(torch.load(root / name / "best.pt", map_location="cpu", weights_only=True))


def prune_and_finetune(model: torch.nn.Module, example: torch.Tensor, prune: PruneConfig, v: VariantConfig,
                       job: JobSpec, root: Path) -> dict:
    """Prune `model` in place in `prune.steps` steps with a KD fine-tune after each; returns the costs.

    Pruning is deterministic given the weights, so a resumed run rebuilds the same shapes and each step's
    finished fine-tune (its best.pt) is reused rather than trained again.
    """
    macs0, params0 = count_cost(model, example)
    base = macs0 if prune.target == "macs" else params0
    ft = finetune_variant(v, prune)
    history = []
    for step, keep in enumerate(step_keeps(prune.ratio, prune.steps), start=1):
        macs, params = count_cost(model, example)
        now = macs if prune.target == "macs" else params
        if now > keep * base:
            prune_to_target(model, example, keep * base / now, prune.target, prune.round_to)
        macs, params = count_cost(model, example)
        log.info("prune step %d/%d: MACs %d -> %d (%.0f%%), params %d -> %d", step, prune.steps, macs0, macs,
                 100 * macs / macs0, params0, params)
        if prune.finetune_epochs:
            _finetune(ft, job, root, step, model)
        history.append({"step": step, "macs": macs, "params": params})
    model.eval()
    return {"macs_before": macs0, "params_before": params0, "macs_after": macs, "params_after": params,
            "target_reached": (macs if prune.target == "macs" else params) <= prune.ratio * base + 1e-9,
            "steps": history}
