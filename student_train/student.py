"""One student of a group: its own DeepSpeed engine, optimizer, LR schedule, loss, checkpoints, metrics and best.pt.

Students of a group share the batches (one loader) and nothing else. `LoopedUnit` gives a student its own engine:
DeepSpeed's gradient clipping, bf16 optimizer wrapper and step bookkeeping are global to an engine, so one engine
over several students would clip them by their joint norm and let one student's overflow touch the others (the
layouts are measured in BENCHMARKS.md, "Fused sweep"). Each student's initial weights come from its own seed and
its random draws (dropout) from its own generator state, so a student in a group trains exactly as it would
alone. fused.py trains several students of one architecture as one batched model with the same guarantees.
"""

from __future__ import annotations

import csv
import json
import logging
import math
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from distill.core.atomic_io import atomic_write
from distill.student_train import checkpoints
from distill.student_train import metrics as m
from distill.student_train.epoch_losses import EpochLosses
from distill.student_train.evaluate import to_model_input
from distill.student_train.feature_kd import forward_train, plain_student_state, wrap_student
from distill.student_train.job import JobSpec, WorkerContext, student_prep
from distill.student_train.losses import Loss
from distill.student_train.precision import autocast, keep_batchnorm_fp32
from distill.student_train.student_model import build_student
from distill.student_train.variant import VariantConfig
from distill.teacher_cache.contract import rebuild_log_probs

log = logging.getLogger(__name__)

SHARED_KEYS = ("label", "weight", "teacher_top1", "teacher_top1_view0", "topk_ids", "topk_logits", "tail_lse",
               "teacher_feat")


def lr_lambda(total_steps: int, warmup_steps: int, min_ratio: float) -> Callable[[int], float]:
    """Linear warmup then cosine decay to min_ratio, per optimizer step."""
    def f(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / max(1, warmup_steps)
        progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
        return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))
    return f


def ds_config(v: VariantConfig, storage: checkpoints.Storage | None = None, clip: bool = True) -> dict[str, Any]:
    cfg: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": v.batch_size,
        "gradient_accumulation_steps": v.grad_accum,
        "zero_optimization": {"stage": v.zero_stage, "stage3_gather_16bit_weights_on_model_save": True},
        "bf16": {"enabled": v.precision == "bf16"},
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
        "checkpoint": (storage or checkpoints.Storage()).ds_config(),
    }
    if v.clip_grad and clip:
        cfg["gradient_clipping"] = v.clip_grad
    return cfg


def make_optimizer(model: torch.nn.Module, v: VariantConfig) -> torch.optim.Optimizer:
    decay = [p for p in model.parameters() if p.ndim >= 2]
    no_decay = [p for p in model.parameters() if p.ndim < 2]
    groups = [{"params": decay, "weight_decay": v.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    if v.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=v.lr, momentum=v.momentum, nesterov=True)
    return torch.optim.AdamW(groups, lr=v.lr)


def model_dtype(v: VariantConfig) -> torch.dtype:
    return torch.bfloat16 if v.precision == "bf16" else torch.float32


@dataclass(eq=False)  # one object per student: compared by identity
class StudentRun:
    """A student's own bookkeeping in a group: its loss, epoch state (the checkpoint's client state), status."""

    name: str
    v: VariantConfig
    out: Path
    loss_fn: Loss
    state: dict[str, Any] = field(default_factory=lambda: {"epoch": -1, "best": None, "wall": 0.0})
    status: str = "live"  # live | failed | stopped | done
    reason: str = ""
    acc: EpochLosses | None = None
    bad: torch.Tensor | None = None
    step_seconds: float = 0.0
    last: dict[str, torch.Tensor] | None = None  # the losses of its last step (progress lines, Prometheus)
    summary: dict[str, Any] = field(default_factory=dict)  # its last epoch's metrics row
    rng: tuple[torch.Tensor, torch.Tensor | None] | None = None  # its generator states (CPU, CUDA) between steps
    init: dict[str, Any] | None = None  # what its init_checkpoint gave it (student_model.load_init_checkpoint)

    @property
    def live(self) -> bool:
        return self.status == "live"

    def epoch_losses(self) -> EpochLosses:
        """This epoch's loss sums (set when the epoch starts)."""
        if self.acc is None:
            raise RuntimeError(f"{self.name}: no epoch started")
        return self.acc

    def nan_flag(self) -> torch.Tensor:
        """Whether a step of this epoch had a non-finite loss (a device tensor: read only at log points)."""
        if self.bad is None:
            raise RuntimeError(f"{self.name}: no epoch started")
        return self.bad

    def begin_epoch(self, device: torch.device) -> None:
        self.acc, self.bad, self.step_seconds = EpochLosses(device), torch.zeros((), device=device), 0.0

    def record(self, losses: dict[str, torch.Tensor], batch: dict[str, torch.Tensor], seconds: float) -> None:
        """Epoch sums and the non-finite flag, on the device (no host sync)."""
        assert self.acc is not None and self.bad is not None
        detached = self.acc.add(losses, batch)
        self.bad += (~torch.isfinite(detached)).any().float()
        self.step_seconds += seconds
        self.last = losses
        m.STEP_SECONDS.labels(self.name).observe(seconds)

    def keep_rng(self, device: torch.device) -> None:
        """Remember the generators' states now as this student's own (right after its weights were drawn)."""
        self.rng = (torch.get_rng_state(), torch.cuda.get_rng_state(device) if device.type == "cuda" else None)

    @contextmanager
    def own_rng(self, device: torch.device) -> Iterator[None]:
        """The process generators hold this student's states while it steps (dropout draws as if alone)."""
        if self.rng is None:
            yield
            return
        outer = (torch.get_rng_state(), torch.cuda.get_rng_state(device) if device.type == "cuda" else None)
        torch.set_rng_state(self.rng[0])
        if self.rng[1] is not None:
            torch.cuda.set_rng_state(self.rng[1], device)
        try:
            yield
        finally:
            self.keep_rng(device)
            torch.set_rng_state(outer[0])
            if outer[1] is not None:
                torch.cuda.set_rng_state(outer[1], device)


class StepInputs:
    """One batch as the students of a group need it: moved to the device once, the teacher distribution rebuilt
    once per temperature (from the cached top-k, or from the live teacher's logits in mode online)."""

    def __init__(self, batch: dict[str, torch.Tensor], device: torch.device, num_classes: int,
                 teacher: torch.nn.Module | None = None) -> None:
        self.batch, self.device, self.num_classes, self.teacher = batch, device, num_classes, teacher
        self.shared = {k: t.to(device, non_blocking=True) for k, t in batch.items() if k in SHARED_KEYS}
        self._x: dict[torch.dtype, torch.Tensor] = {}
        self._logp: dict[tuple[str, float], torch.Tensor] = {}
        self._z: torch.Tensor | None = None

    def x(self, dtype: torch.dtype) -> torch.Tensor:
        if dtype not in self._x:
            self._x[dtype] = to_model_input(self.batch["pixels"], self.device, dtype)
        return self._x[dtype]

    def targets(self, s: StudentRun) -> dict[str, Any]:
        """The loss's batch dict for this student (a fresh dict: feature KD adds its own entries): the teacher
        rebuilt at each temperature its loss terms own (the terms own T; nothing else reads it)."""
        out: dict[str, Any] = dict(self.shared)
        if s.loss_fn.temperatures:
            source = "online" if s.v.mode == "online" else "cache"
            out["teacher_logp"] = {t: self._teacher_logp(source, t) for t in s.loss_fn.temperatures}
        return out

    def _teacher_logp(self, source: str, t: float) -> torch.Tensor:
        if (source, t) not in self._logp:
            if source == "online":
                if self._z is None:
                    assert self.teacher is not None, "mode online without a live teacher"
                    with torch.no_grad(), autocast(self.device):
                        pixels = to_model_input(self.batch["teacher_pixels"], self.device, torch.float32)
                        self._z = self.teacher(pixels).float()
                self._logp[(source, t)] = torch.log_softmax(self._z / t, dim=1)
            else:
                s = self.shared
                self._logp[(source, t)] = rebuild_log_probs(s["topk_ids"], s["topk_logits"], s["tail_lse"],
                                                            self.num_classes, t)
        return self._logp[(source, t)]


class LoopedUnit:
    """One student on its own DeepSpeed engine (any architecture, precision and ZeRO stage)."""

    def __init__(self, student: StudentRun, engine: Any, ckpt_dir: Path, storage: checkpoints.Storage,
                 keep: int) -> None:
        self.student, self.engine, self.ckpt_dir, self.storage, self.keep = student, engine, ckpt_dir, storage, keep
        self.dtype = model_dtype(student.v)

    @property
    def students(self) -> list[StudentRun]:
        return [self.student]

    def train_step(self, inputs: StepInputs, active: set[str]) -> None:
        s = self.student
        if not s.live or s.name not in active:
            return
        t0 = time.perf_counter()
        targets = inputs.targets(s)
        with s.own_rng(inputs.device):
            logits = forward_train(self.engine, inputs.x(self.dtype), targets, s.v.feature_kd)
            losses = s.loss_fn(logits, targets)
            self.engine.backward(losses["loss"])
            self.engine.step()
        s.record(losses, inputs.batch, time.perf_counter() - t0)

    def logits(self, inputs: StepInputs) -> list[torch.Tensor | None]:
        return [self.engine(inputs.x(self.dtype)).float() if self.student.live else None]

    def lr(self, s: StudentRun) -> float:
        return float(self.engine.get_lr()[0])

    def train(self, mode: bool = True) -> None:
        self.engine.train(mode)

    def best_state(self, s: StudentRun) -> dict[str, torch.Tensor]:
        """The plain student's weights (ZeRO-3 gathers them: call on every rank)."""
        if s.v.zero_stage == 3:
            return self.engine._zero3_consolidated_16bit_state_dict()
        return self.engine.module.state_dict()

    def save(self, s: StudentRun, epoch: int) -> None:
        checkpoints.save(self.engine, self.ckpt_dir, epoch, dict(s.state), self.keep, self.storage)

    def drop(self, s: StudentRun) -> None:
        """A student that left the group (failed, stopped): nothing else to do, its engine is simply not stepped."""


def seeded_model(s: StudentRun, job: JobSpec, device: torch.device,
                 model: torch.nn.Module | None = None) -> torch.nn.Module:
    """The student's initial weights from its own seed (as if it trained alone) or its init_checkpoint (a fresh
    head from the seed), + the feature-KD projector. A given `model` (compress's pruned one) is taken as it is."""
    torch.manual_seed(s.v.seed)
    if model is None:
        model, s.init = build_student(s.v, job.num_classes, student_prep(s.v, job.teacher_prep).channels)
    model = wrap_student(model, s.v.feature_kd, job.feature_dim, s.name)
    s.keep_rng(device)
    return model


def build_looped(s: StudentRun, job: JobSpec, world: int, device: torch.device, model: torch.nn.Module,
                 storage: checkpoints.Storage, train_steps: int) -> LoopedUnit:
    """The student's DeepSpeed engine (its optimizer, schedule and clipping), resumed from its last intact epoch."""
    import deepspeed

    v = s.v
    opt_steps = max(1, v.epochs * train_steps // v.grad_accum)
    optimizer = make_optimizer(model, v)
    sched = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lr_lambda(opt_steps, int(v.warmup_epochs * train_steps / v.grad_accum), v.min_lr_ratio))
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, lr_scheduler=sched,
                                           config=ds_config(v, storage))
    if v.precision == "bf16":
        keep_batchnorm_fp32(engine.module)
    ckpt_dir = s.out / "ds_ckpt"
    unit = LoopedUnit(s, engine, ckpt_dir, storage, job.keep_checkpoints)
    client = checkpoints.resume(engine, ckpt_dir, world, device)
    if client is not None:
        s.state.update({k: client[k] for k in s.state if k in client})  # ours only, not DeepSpeed's keys
    return unit


def save_best(state: dict[str, torch.Tensor], v: VariantConfig, job: JobSpec, out: Path, row: dict[str, Any],
              what: str, score: float, init: dict[str, Any] | None = None) -> None:
    """best.pt (plain fp32 student weights, feature-KD projector dropped) and arch.json (how to rebuild it)."""
    state = plain_student_state(state)
    state = {k: t.detach().float().cpu() if t.is_floating_point() else t.detach().cpu() for k, t in state.items()}
    atomic_write(out / "best.pt", lambda tmp: torch.save(state, tmp))
    sp = student_prep(v, job.teacher_prep)
    info = {"arch": v.arch, "arch_kwargs": v.arch_kwargs, "num_classes": job.num_classes, "in_chans": sp.channels,
            "preprocessing": sp.as_dict(), "epoch": row["epoch"], "val_top1": row.get("val_top1"),
            "best_by": what, "best_score": score, "cache_dir": str(job.cache_dir), "mode": v.mode,
            "init_checkpoint": init}
    atomic_write(out / "arch.json", json.dumps(info, indent=1))


def write_row(path: Path, row: dict[str, Any]) -> None:
    new = not path.exists()
    with open(path, "a", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(row))
        if new:
            w.writeheader()
        w.writerow(row)


def epoch_score(row: dict[str, Any]) -> tuple[str, float]:
    """(what, score) of an epoch for best.pt; higher is better. Val top-1, else teacher agreement, else -train loss."""
    for k in ("val_top1", "val_teacher_agreement"):
        if row.get(k) is not None:
            return k, float(row[k])
    return "neg_train_loss", -float(row["train_loss"])


def is_better(score: float, best: float | None) -> bool:
    """The first epoch always wins (best is None): a variant that trained always has a best.pt."""
    return best is None or score > best

def report_progress(active: list[StudentRun], gid: str, epoch: int, step: int, steps: int, rate: float,
                    ctx: WorkerContext) -> None:
    """A training step's losses and rate: each live student's series, and one log line on rank 0."""
    rank, parts = str(ctx.rank), []
    for s in active:
        if not s.live or s.last is None:
            continue
        last = torch.stack([s.last[k].detach().float() for k in s.loss_fn.parts]).tolist()
        for part, val in zip(s.loss_fn.parts, last, strict=True):
            m.LOSS.labels(s.name, rank, part).set(val)
        m.SAMPLES_PER_S.labels(s.name, rank).set(rate)
        parts.append(f"{s.name} {last[0]:.4f}")
    if ctx.rank == 0 and parts:
        log.info("[%s] epoch %d step %d/%d %.1f samples/s | loss %s", gid, epoch + 1, step + 1, steps,
                 rate * ctx.world, " | ".join(parts))
