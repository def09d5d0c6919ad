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

from student_train import metrics as m
from student_train.config import VariantConfig
from student_train.data import JoinedStream, ShardPair, StreamSpec, padded, placeholder_batch, steps_per_epoch
from student_train.evaluate import evaluate
from student_train.losses import create_loss
from student_train.unlabelled import train_pairs
from teacher_cache.config import TeacherConfig
from teacher_cache.models import create_model
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
    loader_workers: int = 1
    log_every: int = 20
    metrics_port: int | None = None
    metrics_host: str = "127.0.0.1"
    metrics_targets_dir: Path | None = None
    train_crop_scale: tuple[float, float] = (0.35, 1.0)
    train_crop_ratio: tuple[float, float] = (3 / 4, 4 / 3)
    train_flip: bool = True


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
    deepspeed.init_distributed(dist_backend=backend)


def _spec(job: JobSpec, v: VariantConfig, pairs: list[ShardPair], epoch: int, train: bool, ctx: WorkerContext,
          workers: int, views: int) -> StreamSpec:
    online = job.teacher_prep if (v.mode == "online" and train) else None
    return StreamSpec(cache_dir=job.cache_dir, pairs=pairs, student=student_prep(v, job.teacher_prep), teacher=online,
                      num_classes=job.num_classes, temperature=v.temperature, views=views, train=train,
                      batch_size=v.batch_size, shuffle_buffer=job.shuffle_buffer, seed=v.seed, epoch=epoch,
                      rank=ctx.rank, world=ctx.world, loader_workers=workers, crop_scale=job.train_crop_scale,
                      crop_ratio=job.train_crop_ratio, flip=job.train_flip)


def _loader(spec: StreamSpec) -> DataLoader:
    return DataLoader(JoinedStream(spec), batch_size=None, num_workers=spec.loader_workers,
                      persistent_workers=False, prefetch_factor=4 if spec.loader_workers else None)


def _all_ranks_finite(loss: torch.Tensor, ctx: WorkerContext) -> bool:
    """One collective so every rank stops on the same step (a lone stop would deadlock the others)."""
    bad = torch.tensor([0.0 if torch.isfinite(loss).item() else 1.0])
    if ctx.world > 1:
        dist.all_reduce(bad)
    return bad.item() == 0.0


def _write_row(path: Path, row: dict[str, Any]) -> None:
    new = not path.exists()
    with open(path, "a", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(row))
        if new:
            w.writeheader()
        w.writerow(row)


def _save_best(engine: Any, v: VariantConfig, job: JobSpec, out: Path, ctx: WorkerContext, row: dict) -> None:
    state = engine._zero3_consolidated_16bit_state_dict() if v.zero_stage == 3 else engine.module.state_dict()
    if ctx.rank != 0:
        return
    state = {k: t.detach().float().cpu() if t.is_floating_point() else t.detach().cpu() for k, t in state.items()}
    torch.save(state, out / "best.pt.tmp")
    os.replace(out / "best.pt.tmp", out / "best.pt")
    sp = student_prep(v, job.teacher_prep)
    info = {"arch": v.arch, "arch_kwargs": v.arch_kwargs, "num_classes": job.num_classes, "in_chans": sp.channels,
            "preprocessing": sp.as_dict(), "epoch": row["epoch"], "val_top1": row["val_top1"],
            "cache_dir": str(job.cache_dir), "mode": v.mode}
    (out / "arch.json").write_text(json.dumps(info, indent=1))


def train_variant(name: str, v: VariantConfig, job: JobSpec, ctx: WorkerContext,
                  model: torch.nn.Module | None = None) -> dict[str, Any]:
    """Train (or resume) one variant; returns its final summary. Raises NonFiniteLossError on NaN/inf.

    `model` replaces the architecture built from `v.arch` (compress fine-tunes a pruned model this way).
    """
    import deepspeed

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
    views = min(v.views or job.num_views, job.num_views)
    workers = min(job.loader_workers, max(1, len(job.train) // ctx.world))
    train_steps = steps_per_epoch(job.train, 0, v.seed, ctx.world, workers, v.batch_size, True)
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
    state = {"epoch": -1, "best": -1.0, "wall": 0.0}
    if (ckpt_dir / "latest").exists():
        _, client = engine.load_checkpoint(str(ckpt_dir))
        state.update({k: client[k] for k in state if client and k in client})  # ours only, not DeepSpeed's keys
        log.info("%s: resumed after epoch %d", name, state["epoch"])
    teacher = load_teacher(job.teacher).model.to(ctx.device) if v.mode == "online" and job.teacher else None
    loss_fn = create_loss(v.mode, v.alpha, v.temperature)
    summary: dict[str, Any] = {}
    for epoch in range(state["epoch"] + 1, v.epochs):
        row = _train_epoch(engine, loss_fn, teacher, job, v, name, epoch, ctx, workers, views, dtype)
        val_steps = steps_per_epoch(job.val, epoch, v.seed, ctx.world, 0, v.batch_size, False) if job.val else 0
        if val_steps:
            engine.eval()
            spec = _spec(job, v, job.val, epoch, False, ctx, 0, 1)
            batches = padded(iter(_loader(spec)), val_steps, placeholder_batch(spec))
            row.update(evaluate(engine, batches, ctx.device, dtype))
            engine.train()
        state["wall"] += row["epoch_seconds"]
        score = next((row[k] for k in ("val_top1", "val_teacher_agreement") if row.get(k) is not None),
                     -row["train_loss"])
        if score > state["best"]:
            state["best"] = score
            _save_best(engine, v, job, out, ctx, row)
        state["epoch"] = epoch
        engine.save_checkpoint(str(ckpt_dir), tag=f"epoch{epoch}", client_state=dict(state))
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
                 name: str, epoch: int, ctx: WorkerContext, workers: int, views: int, dtype: torch.dtype) -> dict:
    steps = steps_per_epoch(job.train, epoch, v.seed, ctx.world, workers, v.batch_size, True)
    spec = _spec(job, v, job.train, epoch, True, ctx, workers, views)
    batches = padded(iter(_loader(spec)), steps, placeholder_batch(spec))
    t0 = t_log = time.perf_counter()
    sums = {"loss": 0.0, "kd_loss": 0.0, "task_loss": 0.0}
    n_seen = n_log = 0.0
    rank = str(ctx.rank)
    for step, batch in enumerate(batches):
        ts = time.perf_counter()
        x = batch["pixels"].to(device=ctx.device, dtype=dtype)
        if teacher is not None:
            with torch.no_grad():
                z = teacher(batch["teacher_pixels"].to(ctx.device)).float()
            batch["teacher_logp"] = torch.log_softmax(z / v.temperature, dim=1).cpu()
        logits = engine(x)
        losses = loss_fn(logits, {k: t.to(ctx.device) for k, t in batch.items() if k != "pixels"})
        if not _all_ranks_finite(losses["loss"].detach(), ctx):
            raise NonFiniteLossError(f"variant {name}: non-finite loss at epoch {epoch + 1} step {step + 1} "
                                     f"(lr={v.lr}); lower the learning rate or enable clip_grad")
        engine.backward(losses["loss"])
        engine.step()
        w = float(batch["weight"].sum())
        for k in sums:
            sums[k] += float(losses[k].detach()) * w
        n_seen += w
        n_log += w
        m.STEP_SECONDS.labels(name).observe(time.perf_counter() - ts)
        m.SAMPLES.labels(name, rank).inc(w)
        if (step + 1) % job.log_every == 0 or step + 1 == steps:
            now = time.perf_counter()
            rate = n_log / max(1e-9, now - t_log)
            m.SAMPLES_PER_S.labels(name, rank).set(rate)
            for part in sums:
                m.LOSS.labels(name, rank, part).set(float(losses[part].detach()))
            if ctx.rank == 0:
                log.info("[%s] epoch %d step %d/%d loss %.4f %.1f samples/s", name, epoch + 1, step + 1, steps,
                         float(losses["loss"].detach()), rate * ctx.world)
            t_log, n_log = now, 0.0
    seconds = time.perf_counter() - t0
    totals = torch.tensor([n_seen, *sums.values()], dtype=torch.float64)
    if ctx.world > 1:
        dist.all_reduce(totals)
    n = max(1.0, float(totals[0]))
    return {"epoch": epoch + 1, "train_samples": float(totals[0]), "train_loss": float(totals[1]) / n,
            "kd_loss": float(totals[2]) / n,
            "task_loss": float(totals[3]) / n, "samples_per_s": float(totals[0]) / seconds,
            "epoch_seconds": seconds, "lr": float(engine.get_lr()[0])}
