"""Thin Ray wrapper: Ray Tune runs the groups; each trial builds and fits one TorchTrainer running DeepSpeed.

A trial is a group of students that share a data stream (groups.py): its workers train every student of the group
from one loader (train_loop.train_group), sized for the group (the most any member asks for per rank);
`tune.max_concurrent` and `cpus_per_trial` count trials, as before. The trial is the V2 pattern (a function that
fits a TorchTrainer), not the deprecated Trainer-in-Tuner API. ASHA stops weak students inside their group
(asha.py), so Tune runs without a scheduler; the workers' reports reach Tune's progress table.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

from distill.core.graceful_stop import StopRequested, first_on_sigterm, sigterm_received
from distill.student_train.config import TrainConfig, VariantConfig
from distill.student_train.groups import Group
from distill.student_train.job import JobSpec, WorkerContext
from distill.student_train.status import mark_stopped, note_stop
from distill.student_train.train_loop import train_group

log = logging.getLogger(__name__)


def _worker_fn(config: dict[str, Any]) -> None:
    """Runs on every Ray Train worker: DeepSpeed inside, reports every epoch."""
    import ray.train
    import ray.train.torch
    import torch

    logging.getLogger("ray.train").setLevel(logging.WARNING)  # one line per report is noise here
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    ctx_ray = ray.train.get_context()
    # Ray Train's own choice: the GPU it assigned to this worker (gpus_per_worker > 0), else the CPU
    device = ray.train.torch.get_device() if torch.cuda.is_available() else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)

    def report(metrics: dict[str, Any], out: Path | None) -> None:
        ray.train.report(metrics)

    ctx = WorkerContext(rank=ctx_ray.get_world_rank(), world=ctx_ray.get_world_size(), device=device,
                        report=report, in_ray=True)
    members = [(n, VariantConfig.model_validate(v)) for n, v in config["members"]]
    train_group(members, config["job"], ctx, group=config["group"], fused=config["fused"])


def _trial_fn(config: dict[str, Any]) -> None:
    """One Tune trial = one group = one TorchTrainer.fit(); failures become statuses, not a crash."""
    from ray.train import FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer
    from ray.tune.integration.ray_train import TuneReportCallback

    from distill.student_train.status import epochs_logged, read_status, stop_requested, write_status

    gid, job = config["group"], config["job"]
    members = [(n, VariantConfig.model_validate(v)) for n, v in config["members"]]
    lead = members[0][1]
    # Ray Train passes this to its controller: a worker group that cannot be placed (no capacity left after a node
    # loss) fails the attempt after this long instead of waiting forever; the attempts are bounded below
    os.environ["RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S"] = str(config["start_timeout_s"])
    resources = config["resources"]
    use_gpu = resources.get("GPU", 0) > 0
    trainer = TorchTrainer(
        _worker_fn,
        train_loop_config={"group": gid, "members": config["members"], "fused": config["fused"], "job": job},
        scaling_config=ScalingConfig(num_workers=lead.num_workers, use_gpu=use_gpu, resources_per_worker=resources),
        torch_config=TorchConfig(backend="nccl" if use_gpu else "gloo"),
        run_config=RunConfig(name=gid if len(members) > 1 else members[0][0],
                             storage_path=str(Path(job.run_dir).resolve() / "ray_results"),
                             # Ray Train V2's classes (the default); ray's stubs resolve the V1 ones
                             failure_config=FailureConfig(  # type: ignore[call-arg]
                                 max_failures=config["max_failures"], controller_failure_limit=config["max_failures"]),
                             callbacks=[TuneReportCallback()]))  # type: ignore[list-item]
    for name, _ in members:
        write_status(job.run_dir, name, "running", group=gid)
    try:
        trainer.fit()
    except Exception as exc:  # TrainingFailedError wraps the worker's exception; keep its first line as reason
        if stop_requested(job.run_dir):  # the job is winding down after SIGTERM: interrupted, not failed
            return
        reason = _root_reason(exc)
        for name, v in members:  # students that ended (done, failed, stopped by ASHA) keep their own status
            if read_status(job.run_dir, name).get("status") != "running":
                continue
            if epochs_logged(job.run_dir, name) >= v.epochs:
                write_status(job.run_dir, name, "done")
                continue
            write_status(job.run_dir, name, "failed", reason)
        log.error("group %s failed: %s", gid, reason)


def _root_reason(exc: BaseException) -> str:
    """The worker's own exception line (`SomeError: message`) out of Ray's wrapped traceback text."""
    import re

    cause = getattr(exc, "controller_failure", None)  # Ray Train's ControllerError: its cause is the reason
    if isinstance(cause, BaseException):
        text = " ".join(str(cause).split())
        hint = ""
        if "StartupTimeout" in cause.__class__.__name__:
            hint = (" (no room for the worker group within tune.start_timeout_s: a node was lost and the cluster "
                    "has no capacity left, or other jobs hold it; add nodes, or fewer/smaller workers, and re-run)")
        return f"{cause.__class__.__name__}: {text}"[:400] + hint
    matches = re.findall(r"^\s*([\w.]*(?:Error|Exception)): (.+)$", str(exc), flags=re.MULTILINE)
    worker = [m for m in matches if not m[0].endswith(("WorkerGroupError", "TrainingFailedError"))]
    if worker:
        name, msg = worker[-1]
        return f"{name.rsplit('.', 1)[-1]}: {msg.strip()}"[:400]
    first = str(exc).splitlines()[0] if str(exc) else ""
    return f"{exc.__class__.__name__}: {first}"[:400]


def run_with_ray(cfg: TrainConfig, job: JobSpec, groups: list[Group]) -> None:
    from ray import tune

    from distill.core.ray_cluster import check_fits, connect_ray
    from distill.student_train.status import settle_trials

    connect_ray(cfg.ray.address)
    space = {"trial": tune.grid_search([
        {"group": g.id, "members": [(n, v.model_dump(mode="json")) for n, v in g.members], "fused": g.fused,
         "resources": g.resources()} for g in groups])}

    def trial(config: dict[str, Any]) -> None:
        _trial_fn({**config["trial"], "job": job, "max_failures": cfg.tune.max_failures,
                   "start_timeout_s": cfg.tune.start_timeout_s})

    for g in groups:  # a trial that can never be placed would wait forever
        what = f"variant {g.names[0]}" if len(g.members) == 1 else f"group {g.id} ({', '.join(g.names)})"
        check_fits([{"CPU": cfg.tune.cpus_per_trial}] + [g.resources()] * g.members[0][1].num_workers, what)
    tuner = tune.Tuner(
        tune.with_resources(trial, {"CPU": cfg.tune.cpus_per_trial}),
        param_space=space,
        tune_config=tune.TuneConfig(max_concurrent_trials=cfg.tune.max_concurrent),
        run_config=tune.RunConfig(name="tune", storage_path=str(Path(job.run_dir).resolve() / "ray_results"),
                                  verbose=1))
    members = [(n, v.epochs) for g in groups for n, v in g.members]
    before = live_placement_groups()
    try:
        with first_on_sigterm(lambda: note_stop(job.run_dir)):  # before Tune tears its trials down
            grid = tuner.fit()
    except BaseException:
        if sigterm_received():  # bookkeeping first: `ray job stop` sends SIGKILL some seconds after SIGTERM
            mark_stopped(job.run_dir, members, "the job was stopped by SIGTERM")
            raise StopRequested("stopped by SIGTERM") from None
        raise
    finally:
        release_placement_groups(live_placement_groups() - before)
    errors = {}
    by_id = {g.id: g for g in groups}
    for i in range(len(grid)):
        result = grid[i]
        gid = (result.config or {}).get("trial", {}).get("group")
        if gid in by_id and result.error is not None:
            errors.update({n: _root_reason(result.error) for n in by_id[gid].names})
    settle_trials(job.run_dir, members, errors)


def live_placement_groups() -> set[str]:
    """Ids (hex) of this job's placement groups that still hold resources (a placement group id ends with the
    id of the job that created it; actors of this job, such as Ray Train's controllers, create theirs in it)."""
    import ray

    job = ray.get_runtime_context().get_job_id()
    return {pg for pg, info in ray.util.placement_group_table().items()
            if pg.endswith(job) and info["state"] != "REMOVED"}


def release_placement_groups(pgs: set[str], wait_s: float = 10.0) -> None:
    """Removes placement groups that outlived their trials. Seen on Ray 2.60: a trial whose worker group failed
    (a NaN loss, a killed worker, an ASHA stop) can leave its worker group's placement group reserved, which
    holds its CPUs until the driver exits; a later stage in the same driver would then never be placed."""
    import time

    import ray
    from ray._raylet import PlacementGroupID
    from ray.util.placement_group import PlacementGroup

    if not pgs:
        return
    log.warning("releasing %d placement group(s) left behind by finished trials: %s", len(pgs), sorted(pgs))
    for pg in pgs:
        try:
            ray.util.remove_placement_group(PlacementGroup(PlacementGroupID.from_hex(pg)))
        except Exception as exc:  # noqa: BLE001 - already gone, or the GCS refused: the deadline below says
            log.warning("could not remove placement group %s: %s", pg, exc)
    deadline = time.monotonic() + wait_s
    while live_placement_groups() & pgs and time.monotonic() < deadline:
        time.sleep(0.2)
