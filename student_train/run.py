"""`distill train`: plan and check, then run every variant (Ray Tune + Ray Train, or in-process), then rank them."""

from __future__ import annotations

import logging
import time
import traceback
from dataclasses import dataclass
from pathlib import Path

import torch
import yaml

from distill.core.atomic_io import atomic_write
from distill.core.devices import resolve_device
from distill.core.graceful_stop import StopRequested, raise_if_stopping, sigterm_received
from distill.core.run_phase import begin_work
from distill.student_train.asha import clear as clear_asha
from distill.student_train.config import TrainConfig, VariantConfig
from distill.student_train.curves import plot_curves
from distill.student_train.groups import Group, format_plan, plan_groups
from distill.student_train.job import JobSpec, WorkerContext
from distill.student_train.job_plan import plan_job
from distill.student_train.leaderboard import (
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
from distill.student_train.status import clear_stop, finished, mark_stopped, read_status, write_status
from distill.student_train.student_check import check_students
from distill.student_train.test_split import score_students_on_test
from distill.student_train.tracking import finish_sweep, start_sweep
from distill.student_train.train_loop import train_group
from distill.student_train.twins import pair_twins
from distill.student_train.unlabelled import samples_per_epoch

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
    teacher_test_top1: tuple[float, int] | None = None  # (top-1, labelled test rows) of the cached teacher

    @property
    def status(self) -> str:
        done = sum(r["status"] == "done" for r in self.leaderboard)
        return "success" if done == len(self.leaderboard) else ("failure" if done == 0 else "partial")

    def best(self) -> dict | None:
        done = [r for r in self.leaderboard if r["status"] == "done"]
        return max(done, key=lambda r: r["val_top1"] or -1) if done else None


def run_in_process(job: JobSpec, groups: list[Group], device: str = "auto") -> None:
    """Every group one after another in this process (world size 1): debugging, GPU hosts without Ray."""
    ctx = WorkerContext(device=_set_device(resolve_device(device)))  # type: ignore[arg-type]
    for g in groups:
        for name, v in g.members:
            if v.num_workers > 1:
                log.warning("%s: num_workers=%d needs Ray or torchrun; running 1 worker in-process", name,
                            v.num_workers)
            write_status(job.run_dir, name, "running", group=g.id)
        try:
            train_group([(n, v.model_copy(update={"num_workers": 1})) for n, v in g.members], job, ctx, group=g.id,
                        fused=g.fused)
        except Exception as exc:  # one broken group must not stop the others; the reason is kept
            raise_if_stopping()  # SIGTERM surfacing as another exception (inside a C call): a stop, not a failure
            _fail_unfinished(job, g, f"{exc.__class__.__name__}: {exc}".splitlines()[0])
            log.error("group %s failed:\n%s", g.id, traceback.format_exc())


def _fail_unfinished(job: JobSpec, g: Group, reason: str) -> None:
    """The group died: each of its students that had not ended yet is failed with the reason."""
    for name in g.names:
        if read_status(job.run_dir, name).get("status") in ("running", "unknown", None):
            write_status(job.run_dir, name, "failed", reason, group=g.id)


def _set_device(device: torch.device) -> torch.device:
    if device.type == "cuda":
        torch.cuda.set_device(device)  # DeepSpeed and NCCL use the current device
    return device


def _pending(run_dir: Path, groups: list[Group]) -> list[Group]:
    """The groups with unfinished students, each holding only those (finished ones are skipped, not retrained)."""
    out = []
    for g in groups:
        members = [(n, v) for n, v in g.members if not finished(run_dir, n)]
        if members:
            keep = {n for n, _ in members}
            out.append(Group(g.id, members, [[n for n in f if n in keep] for f in g.fused if len(keep & set(f)) > 1]))
    return out


def _train_pending(cfg: TrainConfig, job: JobSpec, pending: list[Group], variants: list[tuple[str, VariantConfig]]) \
        -> None:
    clear_stop(job.run_dir)
    clear_asha(job.run_dir)
    try:
        if cfg.ray.enabled:
            from distill.student_train.ray_runner import run_with_ray

            run_with_ray(cfg, job, pending)
        else:
            run_in_process(job, pending, cfg.device)
    except BaseException:
        if not sigterm_received():
            raise
        # idempotent: ray_runner has settled its trials already (only "running" ones change)
        names = {n for g in pending for n in g.names}
        mark_stopped(job.run_dir, [(n, v.epochs) for n, v in variants if n in names], "the job was stopped by SIGTERM")
        raise StopRequested("stopped by SIGTERM") from None


def launched_context(device: str = "auto") -> WorkerContext | None:
    """The worker context when started by torchrun / the deepspeed launcher (WORLD_SIZE in the environment)."""
    import os

    if "WORLD_SIZE" not in os.environ or "RANK" not in os.environ:
        return None
    local = int(os.environ.get("LOCAL_RANK", "0"))
    return WorkerContext(rank=int(os.environ["RANK"]), world=int(os.environ["WORLD_SIZE"]),
                         device=_set_device(resolve_device(device, local)))  # type: ignore[arg-type]


def run_launched(job: JobSpec, groups: list[Group], ctx: WorkerContext) -> None:
    """The groups one after another, this process being one rank of a torchrun/deepspeed launch.

    A failure every rank agrees on (a non-finite loss) ends that student on every rank; the others go on. Any
    other exception is this rank's alone (a bad shard, a full disk): its peers may be blocked in a collective it
    will never join, so a barrier here would deadlock. That rank writes the failed status and exits at once; its
    peers' collectives then fail or torchrun stops them.
    """
    import torch.distributed as dist

    for g in groups:
        if ctx.rank == 0:
            for name in g.names:
                write_status(job.run_dir, name, "running", group=g.id)
        try:
            train_group([(n, v.model_copy(update={"num_workers": ctx.world})) for n, v in g.members], job, ctx,
                        group=g.id, fused=g.fused)
        except Exception as exc:
            if ctx.world == 1 or not dist.is_initialized():
                raise
            _abort_rank(job, g, ctx, exc)
    if dist.is_initialized():  # every rank leaves together; a rank exiting first aborts gloo's threads
        dist.barrier()
        dist.destroy_process_group()


def _abort_rank(job: JobSpec, g: Group, ctx: WorkerContext, exc: BaseException) -> None:
    """Record a rank-local failure (the first one wins: a peer's follow-up error is not the cause) and exit."""
    import os
    import sys

    reason = f"rank {ctx.rank}: {exc.__class__.__name__}: {exc}".splitlines()[0][:400]
    log.error("group %s failed on rank %d:\n%s", g.id, ctx.rank, traceback.format_exc())
    try:
        _fail_unfinished(job, g, reason)
    finally:
        logging.shutdown()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(EXIT_RANK_FAILED)


def run(cfg: TrainConfig, only: str | None = None) -> TrainResult:
    """Train every variant (or only the named one) in groups that share a data stream; under torchrun, this
    process is one rank of each group."""
    t0 = time.perf_counter()
    variants = cfg.expand()
    if only is not None:
        names = [n for n, _ in variants]
        if only not in names:
            raise ValueError(f"no variant named '{only}'; variants: {', '.join(names)}")
        variants = [(n, v) for n, v in variants if n == only]
    job = plan_job(cfg)
    costs = check_students(variants, job)  # what the config decides fails here, before any work (exit 2)
    run_dir = job.run_dir
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "train_config.resolved.yaml").write_text(yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False))
    for name, v in variants:
        (run_dir / name).mkdir(parents=True, exist_ok=True)
        (run_dir / name / "variant.yaml").write_text(yaml.safe_dump(v.model_dump(mode="json"), sort_keys=False))
    launched = launched_context(cfg.device)
    device_type = launched.device.type if launched else (None if cfg.ray.enabled else resolve_device(cfg.device).type)
    groups = plan_groups(variants, job, cfg.fuse, cfg.horizontal, device_type)
    plan = format_plan(groups, job, cfg.fuse)
    teacher = teacher_val_top1(job.cache_dir, [p.stem for p in job.val])
    if launched is None or launched.rank == 0:
        log.info("training %d variant(s) on %d train shards (%d samples), %d val shards; cache %s\n%s",
                 len(variants), len(job.train), sum(p.rows for p in job.train), len(job.val),
                 job.cache_dir or "none (supervised)", plan)
        if teacher is not None:
            log.info("%s", format_teacher_line(teacher))
        atomic_write(run_dir / "plan.txt", plan + "\n")
    begin_work()  # from here an error is "failed during the run" (exit 6), not "bad input" (core/run_phase.py)
    twins = pair_twins(variants)
    sweep = None
    if launched is None or launched.rank == 0:  # the runs exist before any worker logs to them
        sweep = start_sweep(cfg.tracking, run_dir, variants, twins, {n: g.id for g in groups for n in g.names},
                            job.fingerprint)
    if launched is not None:  # every rank trains every group (finished students resume at their end: no steps)
        if launched.rank == 0:
            clear_asha(run_dir)
        run_launched(job, groups, launched)
        if launched.rank != 0:
            return TrainResult(run_dir=run_dir, leaderboard=[], leaderboard_path=run_dir / "leaderboard.parquet",
                               seconds=time.perf_counter() - t0)
    else:
        pending = _pending(run_dir, groups)
        if skipped := len(variants) - sum(len(g.members) for g in pending):
            log.info("%d variant(s) already done in %s; skipping them", skipped, run_dir)
        if pending:
            _train_pending(cfg, job, pending, variants)
    score_students_on_test(job, variants, resolve_device(cfg.device))  # held out: scored once, selects nothing
    rows = [variant_row(run_dir, name, v, costs.get(name), samples_per_epoch(job.train, v.mode, job.labelled_passes))
            for name, v in variants]
    rows = add_twin_deltas(rows, twins)
    path = write_leaderboard(run_dir, rows)
    warning = teacher_warning(teacher, rows)
    if warning:
        log.warning("%s", warning)
    teacher_test = teacher_val_top1(job.cache_dir, [p.stem for p in job.test])
    text = (format_twin_comparison(twin_pairs(rows)) + "\n\n" + format_leaderboard(rows) + "\n\n"
            + format_teacher_line(teacher, teacher_test) + "\n" + (warning + "\n" if warning else ""))
    (run_dir / "leaderboard.txt").write_text(text)
    curves = plot_curves(run_dir, [n for n, _ in variants], twins, teacher[0] if teacher else None)
    if sweep is not None:
        finish_sweep(sweep, run_dir, rows, [run_dir / "leaderboard.txt", path, run_dir / "plan.txt",
                                            run_dir / "train_config.resolved.yaml", *([curves] if curves else [])])
    return TrainResult(run_dir=run_dir, leaderboard=rows, leaderboard_path=path, seconds=time.perf_counter() - t0,
                       teacher_val_top1=teacher, teacher_warning=warning, teacher_test_top1=teacher_test)
