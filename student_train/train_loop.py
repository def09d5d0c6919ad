"""Train a group of students that share one data stream; the same function runs under Ray Train, torchrun or
in-process (a student alone is a group of one).

Per epoch: one loader streams shard + cache batches (each image decoded, replayed and joined with the cache once)
and every student of the group steps on each batch; one validation pass scores every student; then each student
writes its own best.pt, checkpoint (resume point) and metrics row. A student whose loss goes non-finite is marked
failed and one that ASHA stops leaves with the reason; the others go on. A killed group resumes each student from
its own last intact epoch.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass, replace
from typing import Any

import torch
import torch.distributed as dist
from torch.utils.data import DataLoader

from distill.core.graceful_stop import raise_if_stopping
from distill.core.hooks_for_tests import hold_after_epoch
from distill.student_train import metrics as m
from distill.student_train.asha import asha_decisions
from distill.student_train.checkpoints import Storage, probe_storage
from distill.student_train.collectives import any_rank_flags, broadcast_int
from distill.student_train.data import (
    JoinedStream,
    ShardPair,
    StreamSpec,
    padded,
    pass_epochs,
    placeholder_batch,
    steps_per_epoch,
)
from distill.student_train.evaluate import evaluate_many
from distill.student_train.job import JobSpec, NonFiniteLossError, WorkerContext, data_seed, student_prep
from distill.student_train.status import read_status, write_status
from distill.student_train.student import (
    StepInputs,
    StudentRun,
    build_looped,
    epoch_score,
    is_better,
    report_progress,
    save_best,
    seeded_model,
    write_row,
)
from distill.student_train.tracking import log_epoch
from distill.student_train.unlabelled import labelled_passes, train_pairs
from distill.student_train.variant import VariantConfig
from distill.teacher.load import load_teacher
from distill.teacher_cache.contract import views_to_use

log = logging.getLogger(__name__)

__all__ = ["JobSpec", "NonFiniteLossError", "WorkerContext", "student_prep", "train_group", "train_variant"]
Unit = Any  # LoopedUnit or fused_unit.FusedUnit: train_step, logits, lr, best_state, save, drop, train
ENDED = ("done", "stopped", "failed")


@dataclass(frozen=True)
class Stream:
    """The data stream a group shares (every member's stream fields are equal: groups.stream_key)."""

    lead: VariantConfig
    passes: int
    views: int
    workers: int


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


def _spec(job: JobSpec, st: Stream, pairs: list[ShardPair], epoch: int, train: bool, ctx: WorkerContext) -> StreamSpec:
    v = st.lead
    return StreamSpec(cache_dir=job.cache_dir, cache_location=job.cache_location, pairs=pairs,
                      student=student_prep(v, job.teacher_prep),
                      teacher=job.teacher_prep if (v.mode == "online" and train) else None,
                      num_classes=job.num_classes, views=st.views if train else 1, train=train,
                      batch_size=v.batch_size, shuffle_buffer=job.shuffle_buffer, seed=data_seed(v), epoch=epoch,
                      rank=ctx.rank, world=ctx.world, loader_workers=st.workers if train else 0,
                      crop_scale=job.train_crop_scale, crop_ratio=job.train_crop_ratio, flip=job.train_flip,
                      rotate=job.train_rotate, passes=st.passes if train else 1, interleave=job.interleave_shards)


def _train_steps(job: JobSpec, st: Stream, epoch: int, world: int) -> int:
    v = st.lead
    return sum(steps_per_epoch(job.train, e, data_seed(v), world, st.workers, v.batch_size, True,
                               job.interleave_shards) for e in pass_epochs(epoch, st.passes))


def _loader(spec: StreamSpec, device: torch.device) -> DataLoader:
    """Decode + replay in loader worker processes; batches land in pinned memory when they go to a GPU."""
    return DataLoader(JoinedStream(spec), batch_size=None, num_workers=spec.loader_workers,
                      persistent_workers=False, prefetch_factor=4 if spec.loader_workers else None,
                      pin_memory=device.type == "cuda")


def train_variant(name: str, v: VariantConfig, job: JobSpec, ctx: WorkerContext,
                  model: torch.nn.Module | None = None) -> dict[str, Any]:
    """Train (or resume) one student alone; returns its last epoch's row. Raises NonFiniteLossError on NaN/inf.

    `model` replaces the architecture built from `v.arch` (compress fine-tunes a pruned model this way).
    """
    [s] = train_group([(name, v)], replace(job, asha=None), ctx, models={name: model} if model is not None else None,
                      isolate=False, skip_ended=False).values()
    if s.status == "failed":
        raise NonFiniteLossError(s.reason)
    return s.summary


def train_group(members: list[tuple[str, VariantConfig]], job: JobSpec, ctx: WorkerContext,
                models: dict[str, torch.nn.Module] | None = None, group: str | None = None,
                fused: list[list[str]] | None = None, isolate: bool = True,
                skip_ended: bool = True) -> dict[str, StudentRun]:
    """Train (or resume) students that share one data stream; returns each student's final bookkeeping.

    `fused`: sets of member names trained as one fused model (fused.py; same architecture). `isolate`: a
    student whose set-up raises is marked failed and the others go on (else the exception propagates).
    `skip_ended`: students whose status already says done, stopped or failed are left alone (a group restarted by
    Ray Train after a lost worker must not train again a student ASHA stopped or a NaN failed in this run)."""
    lead = members[0][1]
    st = Stream(lead, labelled_passes(job.train, lead.mode, job.labelled_passes),
                views_to_use(lead.views, job.num_views), 0)
    job = replace(job, train=train_pairs(job.train, lead.mode))  # mode none skips the unlabelled pool
    st = replace(st, workers=min(job.loader_workers, max(1, len(job.train) // ctx.world)))
    _init_distributed(ctx)
    gid = group or members[0][0]
    students = [StudentRun(n, v, job.run_dir / n, v.make_loss()) for n, v in members]
    for s in students:
        s.out.mkdir(parents=True, exist_ok=True)
        (s.out / f"worker-rank{ctx.rank}.pid").write_text(str(os.getpid()))  # for operators (and the tests)
        if skip_ended:  # rank 0's view of the status, so that every rank leaves out the same students
            ended = ctx.rank == 0 and read_status(job.run_dir, s.name).get("status") in ENDED
            if broadcast_int(int(ended), ctx.world, ctx.device):
                s.status = "ended"
    if ctx.in_ray and job.metrics_port is not None:
        m.serve_worker_metrics(job.metrics_targets_dir or job.run_dir / "metrics_targets", gid,
                               [n for n, _ in members], ctx.rank, job.metrics_port, job.metrics_host)
    units = _build_units(students, job, ctx, models or {}, fused or [], _train_steps(job, st, 0, ctx.world), isolate,
                         gid)
    teacher = None
    if any(s.v.mode == "online" and s.live for s in students) and job.teacher:
        teacher = load_teacher(job.teacher).model.to(ctx.device)
        if ctx.device.type == "cuda":
            teacher = teacher.to(memory_format=torch.channels_last)
    for epoch in range(lead.epochs):
        active = [s for s in students if s.live and s.state["epoch"] < epoch]
        if not active:
            continue
        seconds = _train_epoch(units, active, job, st, epoch, ctx, teacher, gid)
        live = [s for s in active if s.live]
        rows = {s.name: _row(s, epoch, seconds, _unit_of(units, s)) for s in live}
        for s, val in zip(live, _validate(units, live, job, st, epoch, ctx), strict=True):
            rows[s.name].update(val)
        for s in live:
            _finish_epoch(s, _unit_of(units, s), rows[s.name], job, ctx, gid)
        _asha(live, rows, units, job, ctx, gid)
        if ctx.report is not None:
            ctx.report({"epoch": epoch + 1, "students": sum(s.live for s in students),
                        **{f"val_top1/{n}": r["val_top1"] for n, r in rows.items() if r.get("val_top1") is not None}},
                       None)
        if ctx.rank == 0:
            for s in live:  # a test's gate (core/hooks_for_tests.py); a no-op otherwise
                if s.live:
                    hold_after_epoch(s.out, epoch + 1)
    for s in students:
        if s.live:
            s.status = "done"
            _status(job, ctx, s, gid)
    return {s.name: s for s in students}


def _unit_of(units: list[Unit], s: StudentRun) -> Unit:
    return next(u for u in units if s in u.students)


def _status(job: JobSpec, ctx: WorkerContext, s: StudentRun, gid: str) -> None:
    if ctx.rank == 0:
        write_status(job.run_dir, s.name, s.status, s.reason, group=gid)


def _fail(s: StudentRun, unit: Unit, reason: str, job: JobSpec, ctx: WorkerContext, gid: str,
          status: str = "failed") -> None:
    """The student leaves the group with its reason; the others go on."""
    s.status, s.reason = status, reason
    unit.drop(s)
    _status(job, ctx, s, gid)
    (log.error if status == "failed" else log.warning)("%s", reason)


def _build_units(students: list[StudentRun], job: JobSpec, ctx: WorkerContext, models: dict[str, torch.nn.Module],
                 fused: list[list[str]], train_steps: int, isolate: bool, gid: str) -> list[Unit]:
    """Each student's engine (or one fused engine per fused set), resumed from its own checkpoints."""
    from distill.student_train.fused_unit import NotFusableError, build_fused

    local = int(os.environ.get("LOCAL_RANK", "0"))
    storage: dict[str, Storage] = {s.name: probe_storage(s.out / "ds_ckpt", ctx.rank, ctx.world, local, ctx.device)
                                   for s in students if s.live}
    by_name = {s.name: s for s in students}
    fused = [f for f in ([n for n in names if by_name[n].live] for names in fused) if len(f) > 1]
    units: list[Unit] = []
    for names in fused:
        group = [by_name[n] for n in names]
        try:
            units.append(build_fused(group, job, ctx.world, ctx.device, [storage[n] for n in names], train_steps))
        except NotFusableError as exc:  # the same everywhere (a property of the architecture): loop instead
            log.warning("%s: not fused (%s); these students loop over the shared batch instead", gid, exc)
            fused = [f for f in fused if f is not names]
    in_fused = {n for f in fused for n in f}
    for s in students:
        if s.name in in_fused or not s.live:
            continue
        try:
            model = seeded_model(s, job, ctx.device, models.get(s.name))
            units.append(build_looped(s, job, ctx.world, ctx.device, model, storage[s.name], train_steps))
        except Exception as exc:  # a set-up error of one student (e.g. feature KD on a cache without features)
            if not isolate:
                raise
            s.status, s.reason = "failed", f"{exc.__class__.__name__}: {exc}".splitlines()[0][:400]
            _status(job, ctx, s, gid)
            log.exception("student %s failed to start", s.name)
    for s in students:
        if s.state["epoch"] >= 0:
            log.info("%s: resumed after epoch %d", s.name, s.state["epoch"] + 1)
    return units


def _train_epoch(units: list[Unit], active: list[StudentRun], job: JobSpec, st: Stream, epoch: int,
                 ctx: WorkerContext, teacher: torch.nn.Module | None, gid: str) -> float:
    """One epoch of the shared stream. Loss sums and NaN flags stay on the device; the host syncs every log_every
    steps and at the end (a NaN is noticed up to log_every steps late; no checkpoint is written after it)."""
    steps = _train_steps(job, st, epoch, ctx.world)
    spec = _spec(job, st, job.train, epoch, True, ctx)
    batches = padded(iter(_loader(spec, ctx.device)), steps, placeholder_batch(spec))
    for s in active:
        s.begin_epoch(ctx.device)
    names = {s.name for s in active}
    stepping = [u for u in units if any(s.name in names for s in u.students)]
    t0 = t_log = time.perf_counter()
    n_log, rank = 0.0, str(ctx.rank)
    for step, batch in enumerate(batches):
        inputs = StepInputs(batch, ctx.device, job.num_classes, teacher)
        for u in stepping:
            _step_isolated(u, inputs, names, job, ctx, gid, f"epoch {epoch + 1} step {step + 1}")
        w_host = float(batch["weight"].sum())  # a host tensor from the loader: no device sync
        n_log += w_host
        for s in active:
            if s.live:
                m.SAMPLES.labels(s.name, rank).inc(w_host)
        if (step + 1) % job.log_every == 0 or step + 1 == steps:
            _check_finite(units, active, job, ctx, gid, f"by epoch {epoch + 1} step {step + 1}")
            now = time.perf_counter()
            report_progress(active, gid, epoch, step, steps, n_log / max(1e-9, now - t_log), ctx)
            t_log, n_log = now, 0.0
    _check_finite(units, active, job, ctx, gid, f"in epoch {epoch + 1}")  # steps == 0 never reached the loop's
    live = [s for s in active if s.live]
    if ctx.world > 1 and live:
        accs = [s.epoch_losses() for s in live]
        sums = torch.stack([a.sums for a in accs])
        dist.all_reduce(sums)
        for acc, row in zip(accs, sums, strict=True):
            acc.sums = row
    return time.perf_counter() - t0


def _step_isolated(u: Unit, inputs: StepInputs, names: set[str], job: JobSpec, ctx: WorkerContext, gid: str,
                   when: str) -> None:
    """One unit's step; on one rank, a step that raises (a layer that cannot take this batch, e.g. BatchNorm on a
    1x1 map of a last batch of one) fails that unit's students and the group goes on. Across ranks the error may be
    one rank's alone and its peers wait in that student's collectives, so it ends the group (run_launched)."""
    try:
        u.train_step(inputs, names)
    except Exception as exc:
        raise_if_stopping()  # SIGTERM surfacing as another exception: a stop, not this student's failure
        if ctx.world > 1:
            raise
        reason = f"{exc.__class__.__name__}: {exc}".splitlines()[0][:400]
        for s in u.students:
            if s.live and s.name in names:
                log.exception("student %s failed at %s", s.name, when)
                _fail(s, u, f"variant {s.name}: its training step raised at {when}: {reason}", job, ctx, gid)


def _check_finite(units: list[Unit], active: list[StudentRun], job: JobSpec, ctx: WorkerContext, gid: str,
                  when: str) -> None:
    """One collective over every live student's NaN flag: all ranks drop the same students at the same step."""
    live = [s for s in active if s.live]
    if not live:
        return
    for s, bad in zip(live, any_rank_flags(torch.stack([s.nan_flag() for s in live]), ctx.world), strict=True):
        if bad:
            _fail(s, _unit_of(units, s), f"variant {s.name}: non-finite loss {when} (lr={s.v.lr}); lower lr or warm "
                  "up longer (warmup_epochs), use precision fp32 instead of bf16, or check the inputs/labels for "
                  "NaN or out-of-range values", job, ctx, gid)


def _row(s: StudentRun, epoch: int, seconds: float, unit: Unit) -> dict[str, Any]:
    means = s.epoch_losses().means()
    return {"epoch": epoch + 1, **means, "samples_per_s": means["train_samples"] / seconds, "epoch_seconds": seconds,
            "step_seconds": s.step_seconds, "lr": unit.lr(s)}


def _validate(units: list[Unit], live: list[StudentRun], job: JobSpec, st: Stream, epoch: int,
              ctx: WorkerContext) -> list[dict[str, Any]]:
    """One validation pass for the whole group; every student scored on the same batches."""
    val_steps = steps_per_epoch(job.val, epoch, data_seed(st.lead), ctx.world, 0, st.lead.batch_size, False) \
        if job.val and live else 0
    if not val_steps:
        return [{} for _ in live]
    spec = _spec(job, st, job.val, epoch, False, ctx)
    batches = padded(iter(_loader(spec, ctx.device)), val_steps, placeholder_batch(spec))
    wanted = {s.name for s in live}
    order = [s for u in units for s in u.students if s.name in wanted]

    def forward_all(batch: dict[str, torch.Tensor]) -> list[torch.Tensor]:
        inputs = StepInputs(batch, ctx.device, job.num_classes)
        out: list[torch.Tensor] = []
        for u in units:
            out += [lg for s, lg in zip(u.students, u.logits(inputs), strict=True) if s.name in wanted]
        return out

    for u in units:
        u.train(False)
    try:
        results = dict(zip([s.name for s in order], evaluate_many(forward_all, len(order), batches, ctx.device),
                           strict=True))
    finally:
        for u in units:
            u.train(True)
    return [results[s.name] for s in live]


def _finish_epoch(s: StudentRun, unit: Unit, row: dict[str, Any], job: JobSpec, ctx: WorkerContext, gid: str) -> None:
    """The student's own epoch end: best.pt when it improved, its checkpoint, its metrics row and series."""
    epoch = row["epoch"] - 1
    s.state["wall"] += row["epoch_seconds"]
    what, score = epoch_score(row)
    if is_better(score, s.state["best"]):
        s.state["best"] = score
        state = unit.best_state(s)  # every rank (ZeRO-3 gathers)
        if ctx.rank == 0:
            save_best(state, s.v, job, s.out, row, what, score, s.init)
    s.state["epoch"] = epoch
    unit.save(s, epoch)
    row["wall_seconds"] = s.state["wall"]
    if ctx.rank == 0:
        write_row(s.out / "metrics.csv", row)
        log_epoch(s.out, row)  # MLflow (student_train/tracking.py); never fails the epoch
    if row.get("val_top1") is not None:
        m.VAL_TOP1.labels(s.name).set(row["val_top1"])
    m.EPOCH.labels(s.name).set(epoch + 1)
    s.summary = row
    log.info("%s epoch %d/%d: %s", s.name, epoch + 1, s.v.epochs,
             ", ".join(f"{k}={val:.4g}" for k, val in row.items() if isinstance(val, float)))


def _asha(live: list[StudentRun], rows: dict[str, dict], units: list[Unit], job: JobSpec, ctx: WorkerContext,
          gid: str) -> None:
    """ASHA's rule per student (rank 0 decides from the run's shared rung records; every rank follows)."""
    if job.asha is None or not live:
        return
    reasons = asha_decisions(job.run_dir, job.asha, [(s.name, rows[s.name]) for s in live]) if ctx.rank == 0 else {}
    for s in live:
        if broadcast_int(int(s.name in reasons), ctx.world, ctx.device):
            _fail(s, _unit_of(units, s), reasons.get(s.name, "stopped early by ASHA"), job, ctx, gid, "stopped")
