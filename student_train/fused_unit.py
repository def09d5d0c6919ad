"""K students of one architecture as one fused model on one DeepSpeed engine (fused.py), with per-student files.

DeepSpeed runs the fused model with ZeRO 0 and no clipping of its own (FusedOptimizer clips each student by its
own norm); bf16 students run under autocast with fp32 weights. Each student still gets its own checkpoint
(`<student>/ds_ckpt/epoch<N>/fused_student.pt`: its weights, optimizer slices and schedule position, sealed like a
DeepSpeed tag), its own best.pt and its own resume point: students resumed from different epochs train together,
the ones ahead held still (no update, no schedule step, BatchNorm statistics restored) until the others catch up.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

import torch

from distill.core.atomic_io import atomic_write
from distill.student_train import checkpoints
from distill.student_train.checkpoints import FUSED_FILE as FILE
from distill.student_train.fused import (
    FusedOptimizer,
    FusedSchedule,
    NotFusableError,
    check_fused,
    cut,
    fuse_structure,
    load_students,
)
from distill.student_train.job import JobSpec, student_prep
from distill.student_train.student import StepInputs, StudentRun, ds_config, seeded_model

log = logging.getLogger(__name__)


def _autocast(device: torch.device, bf16: bool) -> Any:
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16)


class FusedUnit:
    """Train step, evaluation, best weights and checkpoints of the students fused in one engine."""

    def __init__(self, students: list[StudentRun], engine: Any, opt: FusedOptimizer, sched: FusedSchedule,
                 shapes: dict[str, torch.Size], storages: list[checkpoints.Storage], keep: int) -> None:
        self.students, self.engine, self.opt, self.sched = students, engine, opt, sched
        self.shapes, self.storages, self.keep = shapes, storages, keep
        self.n = len(students)
        self.bf16 = students[0].v.precision == "bf16"
        self.params = dict(engine.module.named_parameters())
        self.names = {p: name for name, p in self.params.items()}

    def _forward(self, inputs: StepInputs) -> torch.Tensor:
        x = inputs.x(torch.float32)
        with _autocast(inputs.device, self.bf16):
            out = self.engine(x.repeat(1, self.n, *([1] * (x.ndim - 2))))
        return out.float().reshape(x.shape[0], self.n, -1)

    def train_step(self, inputs: StepInputs, active: set[str]) -> None:
        stepping = [s.live and s.name in active for s in self.students]
        if not any(stepping):
            return
        t0 = time.perf_counter()
        held = self._hold_stats([s.live and not on for s, on in zip(self.students, stepping, strict=True)])
        self.opt.mask.copy_(torch.tensor(stepping).to(self.opt.mask.device, non_blocking=True))
        self.sched.stepping = stepping
        out = self._forward(inputs)
        total, parts = None, []
        for k, s in enumerate(self.students):
            if stepping[k]:
                losses = s.loss_fn(out[:, k], inputs.targets(s))
                total = losses["loss"] if total is None else total + losses["loss"]
                parts.append((s, losses))
        self.engine.backward(total)
        self.engine.step()
        self._restore_stats(held)
        share = (time.perf_counter() - t0) / len(parts)
        for s, losses in parts:
            s.record(losses, inputs.batch, share)

    def _hold_stats(self, hold: list[bool]) -> list[tuple[torch.Tensor, int, torch.Tensor]]:
        """BatchNorm statistics of the students that must not move this step (running mean/var are per channel)."""
        if not any(hold):
            return []
        kept = []
        for buf in self.engine.module.buffers():
            if buf.ndim > 0 and buf.is_floating_point():
                for k in (k for k, h in enumerate(hold) if h):
                    kept.append((buf, k, buf.reshape(self.n, -1)[k].clone()))
        return kept

    def _restore_stats(self, held: list[tuple[torch.Tensor, int, torch.Tensor]]) -> None:
        for buf, k, saved in held:
            buf.reshape(self.n, -1)[k] = saved

    def logits(self, inputs: StepInputs) -> list[torch.Tensor | None]:
        out = self._forward(inputs)
        return [out[:, k] if s.live else None for k, s in enumerate(self.students)]

    def lr(self, s: StudentRun) -> float:
        return self.sched.lr(self.students.index(s))

    def train(self, mode: bool = True) -> None:
        self.engine.train(mode)

    def best_state(self, s: StudentRun) -> dict[str, torch.Tensor]:
        k = self.students.index(s)
        return {key: cut(t, k, self.n, self.shapes[key]) for key, t in self.engine.module.state_dict().items()}

    def save(self, s: StudentRun, epoch: int) -> None:
        """The student's own checkpoint (ZeRO 0: every rank holds it; one rank per directory writes it)."""
        k = self.students.index(s)
        if not self.storages[k].sealer:
            return
        ckpt_dir, tag = s.out / "ds_ckpt", checkpoints.tag_for(epoch)
        (ckpt_dir / tag).mkdir(parents=True, exist_ok=True)
        blob = {"format": FILE, "module": self.best_state(s), "optimizer": self.opt.student_state(k, self.names,
                self.shapes), "taken": self.sched.taken[k], "client": dict(s.state)}
        atomic_write(ckpt_dir / tag / FILE, lambda tmp: torch.save(blob, tmp))
        checkpoints.seal_tag(ckpt_dir, tag, self.keep)

    def drop(self, s: StudentRun) -> None:
        """A student that left (failed, stopped) is masked out of every later step; its slice is left as it is."""


def _load_fused(tag_dir: Path) -> dict:
    path = tag_dir / FILE
    if not path.exists():
        raise checkpoints.CheckpointError(
            f"{tag_dir} was written by the looped path (one DeepSpeed engine per student), but this student now "
            "trains fused with others of its architecture; re-run with train.horizontal: off, or delete "
            f"{tag_dir.parent} to start it again")
    return torch.load(path, map_location="cpu", weights_only=True)


def build_fused(students: list[StudentRun], job: JobSpec, world: int, device: torch.device,
                storages: list[checkpoints.Storage], train_steps: int) -> FusedUnit:
    """Fuse the students (each from its own seed or its own checkpoint); NotFusableError if they cannot be."""
    import deepspeed

    models = [seeded_model(s, job, device) for s in students]
    saved: list[dict | None] = []
    for s, model in zip(students, models, strict=True):
        blob = checkpoints.resume_tag(s.out / "ds_ckpt", world, device, _load_fused)
        if blob is not None:
            model.load_state_dict(blob["module"])
            s.state.update({k: blob["client"][k] for k in s.state if k in blob["client"]})
        saved.append(blob)
    fused = fuse_structure(models[0], len(models))
    load_students(fused, [m.state_dict() for m in models])
    prep = student_prep(students[0].v, job.teacher_prep)
    check_fused(fused, models, torch.randn(2, prep.channels, prep.input_size, prep.input_size))
    shapes = {k: t.shape for k, t in models[0].state_dict().items()}
    fused.to(device)  # the optimizer's per-student tensors live beside the weights
    params = list(fused.parameters())
    decay = [len(shapes[name]) >= 2 for name, _ in fused.named_parameters()]  # as make_optimizer's groups
    opt = FusedOptimizer(params, decay, students)
    sched = FusedSchedule(opt, students, train_steps)
    v = students[0].v.model_copy(update={"precision": "fp32"})  # bf16 runs under autocast: fp32 weights
    engine, _, _, _ = deepspeed.initialize(model=fused, optimizer=opt, lr_scheduler=sched,
                                           config=ds_config(v, storages[0], clip=False))
    unit = FusedUnit(students, engine, opt, sched, shapes, storages, job.keep_checkpoints)
    for k, blob in enumerate(saved):
        if blob is not None:
            opt.load_student(k, blob["optimizer"], unit.params)
            sched.taken[k] = int(blob["taken"])
    sched.load_state_dict({"taken": sched.taken})
    log.info("fused %d students of %s into one model: %s", len(students), students[0].v.arch,
             ", ".join(s.name for s in students))
    return unit


__all__ = ["FusedUnit", "NotFusableError", "build_fused"]
