"""`distill train`: plan and check, then run every variant (Ray Tune + Ray Train, or in-process), then rank them."""

from __future__ import annotations

import logging
import time
import traceback
from dataclasses import dataclass
from pathlib import Path

import torch
import yaml

from core.devices import resolve_device
from core.graceful_stop import StopRequested, raise_if_stopping, sigterm_received
from core.run_phase import begin_work
from student_train.config import TrainConfig, VariantConfig
from student_train.job_plan import plan_job
from student_train.leaderboard import (
    add_twin_deltas,
    format_leaderboard,
    format_teacher_line,
    format_twin_comparison,
    teacher_val_top1,
    teacher_warning,
    twin_pairs,
    variant_row,
    write_leaderboard,
)
from student_train.status import clear_stop, finished, mark_stopped, write_status
from student_train.train_loop import JobSpec, NonFiniteLossError, WorkerContext, student_prep, train_variant
from student_train.twins import pair_twins
from student_train.unlabelled import samples_per_epoch

log = logging.getLogger(__name__)

EXIT_RANK_FAILED = 4  # the CLI's "all variants failed": this launch trains one variant


@dataclass
class TrainResult:
    run_dir: Path
    leaderboard: list[dict]
    leaderboard_path: Path
    seconds: float
    teacher_val_top1: tuple[float, int] | None = None  # (top-1, labelled val rows) of the cached teacher
    teacher_warning: str | None = None  # the teacher is below its best student beyond noise

    @property
    def status(self) -> str:
        done = sum(r["status"] == "done" for r in self.leaderboard)
        return "success" if done == len(self.leaderboard) else ("failure" if done == 0 else "partial")

    def best(self) -> dict | None:
        done = [r for r in self.leaderboard if r["status"] == "done"]
        return max(done, key=lambda r: r["val_top1"] or -1) if done else None


def run_in_process(job: JobSpec, variants: list[tuple[str, VariantConfig]], device: str = "auto") -> None:
    """Every variant one after another in this process (world size 1): debugging, GPU hosts without Ray."""
    ctx = WorkerContext(device=_set_device(resolve_device(device)))  # type: ignore[arg-type]
    for name, v in variants:
        if v.num_workers > 1:
            log.warning("%s: num_workers=%d needs Ray or torchrun; running 1 worker in-process", name, v.num_workers)
        write_status(job.run_dir, name, "running")
        try:
            train_variant(name, v.model_copy(update={"num_workers": 1}), job, ctx)
            write_status(job.run_dir, name, "done")
        except NonFiniteLossError as exc:
            write_status(job.run_dir, name, "failed", str(exc))
            log.error("%s", exc)
        except Exception as exc:  # one broken variant must not stop the others; the reason is kept
            raise_if_stopping()  # SIGTERM surfacing as another exception (inside a C call): a stop, not a failure
            write_status(job.run_dir, name, "failed", f"{exc.__class__.__name__}: {exc}".splitlines()[0])
            log.error("variant %s failed:\n%s", name, traceback.format_exc())


def _set_device(device: torch.device) -> torch.device:
    if device.type == "cuda":
        torch.cuda.set_device(device)  # DeepSpeed and NCCL use the current device
    return device


def launched_context(device: str = "auto") -> WorkerContext | None:
    """The worker context when started by torchrun / the deepspeed launcher (WORLD_SIZE in the environment)."""
    import os

    if "WORLD_SIZE" not in os.environ or "RANK" not in os.environ:
        return None
    local = int(os.environ.get("LOCAL_RANK", "0"))
    device = _set_device(resolve_device(device, local))  # type: ignore[arg-type]
    return WorkerContext(rank=int(os.environ["RANK"]), world=int(os.environ["WORLD_SIZE"]), device=device)


def run_launched(job: JobSpec, name: str, v: VariantConfig, ctx: WorkerContext) -> None:
    """One variant, this process being one rank of a torchrun/deepspeed launch.

    A failure every rank agrees on (non-finite loss) ends the group together. Any other exception is this
    rank's alone (a bad shard, a full disk): its peers may be blocked in a collective it will never join, so a
    barrier here would deadlock. That rank writes the failed status and exits at once; its peers' collectives
    then fail or torchrun stops them.
    """
    import torch.distributed as dist

    if ctx.rank == 0:
        write_status(job.run_dir, name, "running")
    try:
        train_variant(name, v.model_copy(update={"num_workers": ctx.world}), job, ctx)
    except NonFiniteLossError as exc:  # raised on every rank at the same step (an all-reduced flag)
        if ctx.rank == 0:
            write_status(job.run_dir, name, "failed", str(exc))
        log.error("%s", exc)
    except Exception as exc:
        if ctx.world == 1 or not dist.is_initialized():
            raise
        _abort_rank(job, name, ctx, exc)
    else:
        if ctx.rank == 0:
            write_status(job.run_dir, name, "done")
    if dist.is_initialized():  # every rank leaves together; a rank exiting first aborts gloo's threads
        dist.barrier()
        dist.destroy_process_group()


def _abort_rank(job: JobSpec, name: str, ctx: WorkerContext, exc: BaseException) -> None:
    """Record a rank-local failure (the first one wins: a peer's follow-up error is not the cause) and exit."""
    import os
    import sys

    from student_train.status import read_status

    reason = f"rank {ctx.rank}: {exc.__class__.__name__}: {exc}".splitlines()[0][:400]
    log.error("variant %s failed on rank %d:\n%s", name, ctx.rank, traceback.format_exc())
    try:
        if read_status(job.run_dir, name).get("status") != "failed":
            write_status(job.run_dir, name, "failed", reason)
    finally:
        logging.shutdown()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(EXIT_RANK_FAILED)


def run(cfg: TrainConfig, only: str | None = None) -> TrainResult:
    """Train every variant (or only the named one); under torchrun, this process is one rank of it."""
    t0 = time.perf_counter()
    variants = cfg.expand()
    if only is not None:
        names = [n for n, _ in variants]
        if only not in names:
            raise ValueError(f"no variant named '{only}'; variants: {', '.join(names)}")
        variants = [(n, v) for n, v in variants if n == only]
    job = plan_job(cfg)
    run_dir = job.run_dir
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "train_config.resolved.yaml").write_text(yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False))
    for name, v in variants:
        (run_dir / name).mkdir(parents=True, exist_ok=True)
        (run_dir / name / "variant.yaml").write_text(yaml.safe_dump(v.model_dump(mode="json"), sort_keys=False))
    log.info("training %d variant(s) on %d train shards (%d samples), %d val shards; cache %s", len(variants),
             len(job.train), sum(p.rows for p in job.train), len(job.val), job.cache_dir or "none (supervised)")
    teacher = teacher_val_top1(job.cache_dir, [p.stem for p in job.val])
    if teacher is not None:
        log.info("%s", format_teacher_line(teacher))
    pending = [(n, v) for n, v in variants if not finished(run_dir, n)]
    if len(pending) < len(variants):
        log.info("%d variant(s) already done in %s; skipping them", len(variants) - len(pending), run_dir)
    launched = launched_context(cfg.device)
    if launched is not None and len(variants) != 1:
        raise ValueError("under torchrun/deepspeed, train one variant: pass --variant NAME")
    begin_work()  # from here an error is "failed during the run" (exit 6), not "bad input" (core/run_phase.py)
    if launched is not None:
        run_launched(job, *variants[0], launched)
        if launched.rank != 0:
            return TrainResult(run_dir=run_dir, leaderboard=[], leaderboard_path=run_dir / "leaderboard.parquet",
                               seconds=time.perf_counter() - t0)
    elif pending:
        clear_stop(run_dir)
        try:
            if cfg.ray.enabled:
                from student_train.ray_runner import run_with_ray

                run_with_ray(cfg, job, pending)
            else:
                run_in_process(job, pending, cfg.device)
        except BaseException:
            if not sigterm_received():
                raise
            # idempotent: ray_runner has settled its trials already (only "running" ones change)
            mark_stopped(run_dir, [(n, v.epochs) for n, v in pending], "the job was stopped by SIGTERM")
            raise StopRequested("stopped by SIGTERM") from None
    rows = []
    for name, v in variants:
        prep = student_prep(v, job.teacher_prep)
        rows.append(variant_row(run_dir, name, v, job.num_classes, prep.channels, prep.input_size,
                                samples_per_epoch(job.train, v.mode, job.labelled_passes)))
    rows = add_twin_deltas(rows, pair_twins(variants))
    path = write_leaderboard(run_dir, rows)
    warning = teacher_warning(teacher, rows)
    if warning:
        log.warning("%s", warning)
    text = (format_twin_comparison(twin_pairs(rows)) + "\n\n" + format_leaderboard(rows) + "\n\n"
            + format_teacher_line(teacher) + "\n" + (warning + "\n" if warning else ""))
    (run_dir / "leaderboard.txt").write_text(text)
    return TrainResult(run_dir=run_dir, leaderboard=rows, leaderboard_path=path, seconds=time.perf_counter() - t0,
                       teacher_val_top1=teacher, teacher_warning=warning)
