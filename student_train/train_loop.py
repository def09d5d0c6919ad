"""Train one student variant with DeepSpeed; the same function runs under Ray Train, torchrun or in-process.

Per epoch: stream shard + cache batches, KD loss, DeepSpeed step; evaluate; DeepSpeed checkpoint (resume
point); best plain state dict + architecture info for later stages; one metrics row.
"""

from __future__ import annotations

import csv
import json
import logging
import math
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch.utils.data import DataLoader

from core.atomic_io import atomic_write
from core.models import create_model
from student_train import checkpoints
from student_train import metrics as m
from student_train.config import VariantConfig
from student_train.data import (
    JoinedStream,
    ShardPair,
    StreamSpec,
    padded,
    pass_epochs,
    placeholder_batch,
    steps_per_epoch,
)
from student_train.epoch_losses import LOSS_PARTS, EpochLosses
from student_train.evaluate import evaluate, to_model_input
from student_train.feature_kd import forward_train, plain_student_state, wrap_student
from student_train.losses import create_loss
from student_train.unlabelled import labelled_passes, train_pairs
from teacher_cache.config import TeacherConfig
from teacher_cache.teacher import Preprocessing, load_teacher

log = logging.getLogger(__name__)


class NonFiniteLossError(RuntimeError):
    """The loss became NaN/inf; the variant is marked failed (retrying would fail the same way)."""


@dataclass
class JobSpec:
    """What every worker of every variant shares (picklable, sent to Ray workers)."""

    run_dir: Path
    cache_dir: Path
    train: list[ShardPair]
    val: list[ShardPair]
    num_classes: int
    num_views: int
    teacher_prep: Preprocessing
    teacher: TeacherConfig | None = None
    shuffle_buffer: int = 256
    interleave_shards: int = 1
    loader_workers: int = 1
    log_every: int = 20
    metrics_port: int | None = None
    metrics_host: str = "127.0.0.1"
    metrics_targets_dir: Path | None = None
    train_crop_scale: tuple[float, float] = (0.35, 1.0)
    keep_checkpoints: int = 2
    feature_dim: int | None = None  # teacher feature dim of the cache (set when a variant uses feature KD)
    train_crop_ratio: tuple[float, float] = (3 / 4, 4 / 3)
    train_flip: bool = True
    train_rotate: float = 0.0
    cache_location: str | None = None  # the fingerprint directory in its store (local path or s3://); cache_dir
    # is what the planner read (for object storage, its mirror of one manifest version)
    labelled_passes: int | None = None  # mode none beside an unlabelled pool: passes per epoch (None: equal steps)


@dataclass
class WorkerContext:
    rank: int = 0
    world: int = 1
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    report: Callable[[dict[str, Any], Path | None], None] | None = None
    in_ray: bool = False


def student_prep(v: VariantConfig, teacher: Preprocessing) -> Preprocessing:
    """The student's input: its own size/normalisation after the replayed crop (teacher's by default)."""
    return Preprocessing(input_size=v.input_size or teacher.input_size, crop_pct=teacher.crop_pct,
                         mean=tuple(v.mean or teacher.mean), std=tuple(v.std or teacher.std),
                         interpolation=teacher.interpolation, channels=teacher.channels)


def lr_lambda(total_steps: int, warmup_steps: int, min_ratio: float) -> Callable[[int], float]:
    """Linear warmup then cosine decay to min_ratio, per optimizer step."""
    def f(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / max(1, warmup_steps)
        progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
        return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))
    return f


def ds_config(v: VariantConfig) -> dict[str, Any]:
    cfg: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": v.batch_size,
        "gradient_accumulation_steps": v.grad_accum,
        "zero_optimization": {"stage": v.zero_stage, "stage3_gather_16bit_weights_on_model_save": True},
        "bf16": {"enabled": v.precision == "bf16"},
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }
    if v.clip_grad:
        cfg["gradient_clipping"] = v.clip_grad
    return cfg


def _optimizer(model: torch.nn.Module, v: VariantConfig) -> torch.optim.Optimizer:
    decay = [p for p in model.parameters() if p.ndim >= 2]
    no_decay = [p for p in model.parameters() if p.ndim < 2]
    groups = [{"params": decay, "weight_decay": v.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    if v.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=v.lr, momentum=v.momentum, nesterov=True)
    return torch.optim.AdamW(groups, lr=v.lr)


def _init_distributed(ctx: WorkerContext) -> None:
    """Ray Train and torchrun set up the process group; a plain process gets a 1-rank group on loopback."""
    import deepspeed

    backend = "nccl" if ctx.device.type == "cuda" else "gloo"
    if not dist.is_initialized() and ctx.world == 1 and "WORLD_SIZE" not in os.environ:
        import socket

        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
        os.environ.setdefault("LOCAL_RANK", "0")  # DeepSpeed insists; RANK/WORLD_SIZE stay unset (no launcher)
    if ctx.device.type == "cpu":
        # DeepSpeed's CPU backend JIT-compiles a shared-memory op (g++, ~85 s; again whenever ninja thinks it is
        # stale, and all ranks at once) that serves only inference_all_reduce; training reduces through gloo.
        deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    deepspeed.init_distributed(dist_backend=backend)


def _spec(job: JobSpec, v: VariantConfig, pairs: list[ShardPair], epoch: int, train: bool, ctx: WorkerContext,
          workers: int, views: int, passes: int = 1) -> StreamSpec:
    online = job.teacher_prep if (v.mode == "online" and train) else None
    return StreamSpec(cache_dir=job.cache_dir, cache_location=job.cache_location, pairs=pairs,
                      student=student_prep(v, job.teacher_prep), teacher=online,
                      num_classes=job.num_classes, temperature=v.temperature, views=views, train=train,
                      batch_size=v.batch_size, shuffle_buffer=job.shuffle_buffer, seed=v.seed, epoch=epoch,
                      rank=ctx.rank, world=ctx.world, loader_workers=workers, crop_scale=job.train_crop_scale,
                      crop_ratio=job.train_crop_ratio, flip=job.train_flip, rotate=job.train_rotate, passes=passes,
                      interleave=job.interleave_shards)


def _train_steps(job: JobSpec, v: VariantConfig, epoch: int, passes: int, world: int, workers: int) -> int:
    return sum(steps_per_epoch(job.train, e, v.seed, world, workers, v.batch_size, True, job.interleave_shards)
               for e in pass_epochs(epoch, passes))


def _loader(spec: StreamSpec, device: torch.device) -> DataLoader:
    """Decode + replay in loader worker processes; batches land in pinned memory when they go to a GPU."""
    return DataLoader(JoinedStream(spec), batch_size=None, num_workers=spec.loader_workers,
                      persistent_workers=False, prefetch_factor=4 if spec.loader_workers else None,
                      pin_memory=device.type == "cuda")


def _any_rank_bad(bad: torch.Tensor, ctx: WorkerContext) -> bool:
    """One collective on the device flag, so every rank stops on the same step (a lone stop would deadlock)."""
    flag = bad.detach().clone().float().reshape(1)
    if ctx.world > 1:
        dist.all_reduce(flag)
    return bool(flag.item() > 0)  # host sync: only at log points and at epoch end


def _write_row(path: Path, row: dict[str, Any]) -> None:
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


def _save_best(engine: Any, v: VariantConfig, job: JobSpec, out: Path, ctx: WorkerContext, row: dict) -> None:
    state = engine._zero3_consolidated_16bit_state_dict() if v.zero_stage == 3 else engine.module.state_dict()
    if ctx.rank != 0:
        return
    state = plain_student_state(state)  # feature KD's projector is a training aid: never exported
    state = {k: t.detach().float().cpu() if t.is_floating_point() else t.detach().cpu() for k, t in state.items()}
    atomic_write(out / "best.pt", lambda tmp: torch.save(state, tmp))
    sp = student_prep(v, job.teacher_prep)
    what, score = epoch_score(row)
    info = {"arch": v.arch, "arch_kwargs": v.arch_kwargs, "num_classes": job.num_classes, "in_chans": sp.channels,
            "preprocessing": sp.as_dict(), "epoch": row["epoch"], "val_top1": row.get("val_top1"),
            "best_by": what, "best_score": score, "cache_dir": str(job.cache_dir), "mode": v.mode}
    atomic_write(out / "arch.json", json.dumps(info, indent=1))


def train_variant(name: str, v: VariantConfig, job: JobSpec, ctx: WorkerContext,
                  model: torch.nn.Module | None = None) -> dict[str, Any]:
    """Train (or resume) one variant; returns its final summary. Raises NonFiniteLossError on NaN/inf.

    `model` replaces the architecture built from `v.arch` (compress fine-tunes a pruned model this way).
    """
    import deepspeed

    passes = labelled_passes(job.train, v.mode, job.labelled_passes)  # > 1: mode none beside an unlabelled pool
    job = replace(job, train=train_pairs(job.train, v.mode))  # mode none skips the unlabelled pool
    _init_distributed(ctx)
    torch.manual_seed(v.seed)
    out = Path(job.run_dir) / name
    out.mkdir(parents=True, exist_ok=True)
    if ctx.in_ray and job.metrics_port is not None:
        m.serve_worker_metrics(job.metrics_targets_dir or job.run_dir / "metrics_targets", name, ctx.rank,
                               job.metrics_port, job.metrics_host)
    (out / f"worker-rank{ctx.rank}.pid").write_text(str(os.getpid()))  # for operators (and the resume test)
    prep = student_prep(v, job.teacher_prep)
    if model is None:
        model = create_model(v.arch, num_classes=job.num_classes, in_chans=prep.channels, **v.arch_kwargs)
    model = wrap_student(model, v.beta, job.feature_dim, name)  # + feature-KD projector when beta > 0
    views = min(v.views or job.num_views, job.num_views)
    workers = min(job.loader_workers, max(1, len(job.train) // ctx.world))
    train_steps = _train_steps(job, v, 0, passes, ctx.world, workers)
    opt_steps = max(1, v.epochs * train_steps // v.grad_accum)
    optimizer = _optimizer(model, v)
    sched = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lr_lambda(opt_steps, int(v.warmup_epochs * train_steps / v.grad_accum), v.min_lr_ratio))
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, lr_scheduler=sched, config=ds_config(v))
    dtype = torch.bfloat16 if v.precision == "bf16" else torch.float32
    if v.precision == "bf16":  # DeepSpeed casts parameters, not buffers; CPU batch_norm wants them to match
        for buf in engine.module.buffers():
            if buf.is_floating_point():
                buf.data = buf.data.to(torch.bfloat16)
    ckpt_dir = out / "ds_ckpt"
    state: dict[str, Any] = {"epoch": -1, "best": None, "wall": 0.0}
    client = checkpoints.resume(engine, ckpt_dir, ctx.rank, ctx.world)
    if client is not None:
        state.update({k: client[k] for k in state if k in client})  # ours only, not DeepSpeed's keys
        log.info("%s: resumed after epoch %d", name, state["epoch"])
    teacher = None
    if v.mode == "online" and job.teacher:
        teacher = load_teacher(job.teacher).model.to(ctx.device)
        if ctx.device.type == "cuda":
            teacher = teacher.to(memory_format=torch.channels_last)
    loss_fn = create_loss(v.mode, v.alpha, v.temperature, v.beta, v.feature_loss)
    summary: dict[str, Any] = {}
    for epoch in range(state["epoch"] + 1, v.epochs):
        row = _train_epoch(engine, loss_fn, teacher, job, v, name, epoch, ctx, workers, views, dtype, passes)
        val_steps = steps_per_epoch(job.val, epoch, v.seed, ctx.world, 0, v.batch_size, False) if job.val else 0
        if val_steps:
            engine.eval()
            spec = _spec(job, v, job.val, epoch, False, ctx, 0, 1)
            batches = padded(iter(_loader(spec, ctx.device)), val_steps, placeholder_batch(spec))
            row.update(evaluate(engine, batches, ctx.device, dtype))
            engine.train()
        state["wall"] += row["epoch_seconds"]
        _, score = epoch_score(row)
        if is_better(score, state["best"]):
            state["best"] = score
            _save_best(engine, v, job, out, ctx, row)
        state["epoch"] = epoch
        checkpoints.save(engine, ckpt_dir, epoch, dict(state), job.keep_checkpoints, ctx.rank)
        row["wall_seconds"] = state["wall"]
        if ctx.rank == 0:
            _write_row(out / "metrics.csv", row)
        if row.get("val_top1") is not None:
            m.VAL_TOP1.labels(name).set(row["val_top1"])
        m.EPOCH.labels(name).set(epoch + 1)
        summary = row
        if ctx.report is not None:
            ctx.report({k: val for k, val in row.items() if val is not None}, out if ctx.rank == 0 else None)
        log.info("%s epoch %d/%d: %s", name, epoch + 1, v.epochs,
                 ", ".join(f"{k}={val:.4g}" for k, val in row.items() if isinstance(val, float)))
    return summary


def _train_epoch(engine: Any, loss_fn: Callable, teacher: torch.nn.Module | None, job: JobSpec, v: VariantConfig,
                 name: str, epoch: int, ctx: WorkerContext, workers: int, views: int, dtype: torch.dtype,
                 passes: int = 1) -> dict:
    """One epoch. Loss sums and the NaN flag stay on the device; the host syncs every log_every steps and at the end.

    A non-finite loss is therefore noticed up to log_every steps late (the variant fails either way, and no
    checkpoint is written after it); in exchange the GPU never waits for Python inside the step loop.
    """
    steps = _train_steps(job, v, epoch, passes, ctx.world, workers)
    spec = _spec(job, v, job.train, epoch, True, ctx, workers, views, passes)
    batches = padded(iter(_loader(spec, ctx.device)), steps, placeholder_batch(spec))
    t0 = t_log = time.perf_counter()
    acc = EpochLosses(ctx.device)
    bad = torch.zeros((), device=ctx.device)
    n_log = 0.0
    rank = str(ctx.rank)
    for step, batch in enumerate(batches):
        ts = time.perf_counter()
        losses = _step(engine, loss_fn, teacher, batch, v, ctx, dtype)
        w_host = float(batch["weight"].sum())  # a host tensor from the loader: no device sync
        detached = acc.add(losses, batch)
        bad += (~torch.isfinite(detached)).any().float()
        n_log += w_host
        m.STEP_SECONDS.labels(name).observe(time.perf_counter() - ts)
        m.SAMPLES.labels(name, rank).inc(w_host)
        if (step + 1) % job.log_every == 0 or step + 1 == steps:
            if _any_rank_bad(bad, ctx):
                raise NonFiniteLossError(f"variant {name}: non-finite loss by epoch {epoch + 1} step {step + 1} "
                                         f"(lr={v.lr}); lower lr or warm up longer (warmup_epochs), use precision fp32 "
                                         "instead of bf16, or check the inputs/labels for NaN or out-of-range values")
            now = time.perf_counter()
            rate = n_log / max(1e-9, now - t_log)
            m.SAMPLES_PER_S.labels(name, rank).set(rate)
            last = torch.stack([losses[k].detach().float() for k in LOSS_PARTS]).tolist()
            for part, val in zip(LOSS_PARTS, last, strict=True):
                m.LOSS.labels(name, rank, part).set(val)
            if ctx.rank == 0:
                log.info("[%s] epoch %d step %d/%d loss %.4f %.1f samples/s", name, epoch + 1, step + 1, steps,
                         last[0], rate * ctx.world)
            t_log, n_log = now, 0.0
    if _any_rank_bad(bad, ctx):  # steps == 0 never reaches the in-loop check
        raise NonFiniteLossError(f"variant {name}: non-finite loss in epoch {epoch + 1} (lr={v.lr})")
    if ctx.world > 1:
        dist.all_reduce(acc.sums)
    seconds = time.perf_counter() - t0
    means = acc.means()
    return {"epoch": epoch + 1, **means, "samples_per_s": means["train_samples"] / seconds,
            "epoch_seconds": seconds, "lr": float(engine.get_lr()[0])}


def _step(engine: Any, loss_fn: Callable, teacher: torch.nn.Module | None, batch: dict[str, torch.Tensor],
          v: VariantConfig, ctx: WorkerContext, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """Forward, loss, backward, optimizer step; everything on the device, nothing read back to the host."""
    x = to_model_input(batch["pixels"], ctx.device, dtype)
    targets = {k: t.to(ctx.device, non_blocking=True) for k, t in batch.items()
               if k not in ("pixels", "teacher_pixels")}
    if teacher is not None:  # online KD: the teacher's log-softmax stays on the device
        with torch.no_grad(), _autocast(ctx.device):
            z = teacher(to_model_input(batch["teacher_pixels"], ctx.device, torch.float32)).float()
        targets["teacher_logp"] = torch.log_softmax(z / v.temperature, dim=1)
    logits = forward_train(engine, x, targets, v.beta > 0)
    losses = loss_fn(logits, targets)
    engine.backward(losses["loss"])
    engine.step()
    return losses


def _autocast(device: torch.device) -> Any:
    """bf16 autocast for the online teacher on CUDA (2x its fp32 rate on recent GPUs); a no-op on the CPU."""
    import contextlib

    if device.type == "cuda" and torch.cuda.is_bf16_supported():
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()
