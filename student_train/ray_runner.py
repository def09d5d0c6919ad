"""Thin Ray wrapper: Ray Tune runs the variants; each trial builds and fits one TorchTrainer running DeepSpeed.

The trial is the V2 pattern (a function that fits a TorchTrainer), not the deprecated Trainer-in-Tuner API.
Worker reports reach Tune through TuneReportCallback, so ASHA can stop weak variants on val top-1.
"""

from __future__ import annotations

import logging
import os
import tempfile
from pathlib import Path
from typing import Any

from ray.tune.schedulers import ASHAScheduler, TrialScheduler

from core.graceful_stop import StopRequested, first_on_sigterm, sigterm_received
from student_train.config import TrainConfig, VariantConfig
from student_train.status import mark_stopped, note_stop
from student_train.train_loop import JobSpec, WorkerContext, train_variant

log = logging.getLogger(__name__)


def _worker_fn(config: dict[str, Any]) -> None:
    """Runs on every Ray Train worker: DeepSpeed inside, reports every epoch."""
    import ray.train
    import ray.train.torch
    import torch

    logging.getLogger("ray.train").setLevel(logging.WARNING)  # one line per checkpoint report is noise here
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    ctx_ray = ray.train.get_context()
    # Ray Train's own choice: the GPU it assigned to this worker (gpus_per_worker > 0), else the CPU
    device = ray.train.torch.get_device() if torch.cuda.is_available() else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)

    def report(metrics: dict[str, Any], out: Path | None) -> None:
        if out is not None and (out / "arch.json").exists():
            with tempfile.TemporaryDirectory() as tmp:
                (Path(tmp) / "arch.json").write_text((out / "arch.json").read_text())
                ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(tmp))
        else:
            ray.train.report(metrics)

    ctx = WorkerContext(rank=ctx_ray.get_world_rank(), world=ctx_ray.get_world_size(), device=device,
                        report=report, in_ray=True)
    v = VariantConfig.model_validate(config["variant"])
    train_variant(config["name"], v, config["job"], ctx)


def _trial_fn(config: dict[str, Any]) -> None:
    """One Tune trial = one variant = one TorchTrainer.fit(); failures become a status, not a crash."""
    from ray.train import FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer
    from ray.tune.integration.ray_train import TuneReportCallback

    from student_train.status import epochs_logged, read_status, stop_requested, write_status

    name, job, v = config["name"], config["job"], VariantConfig.model_validate(config["variant"])
    # Ray Train passes this to its controller: a worker group that cannot be placed (no capacity left after a node
    # loss) fails the attempt after this long instead of waiting forever; the attempts are bounded below
    os.environ["RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S"] = str(config["start_timeout_s"])
    use_gpu = v.gpus_per_worker > 0
    resources = _worker_bundle(v)
    trainer = TorchTrainer(
        _worker_fn,
        train_loop_config={"name": name, "variant": v.model_dump(mode="json"), "job": job},
        scaling_config=ScalingConfig(num_workers=v.num_workers, use_gpu=use_gpu, resources_per_worker=resources),
        torch_config=TorchConfig(backend="nccl" if use_gpu else "gloo"),
        run_config=RunConfig(name=name, storage_path=str(Path(job.run_dir).resolve() / "ray_results"),
                             failure_config=FailureConfig(max_failures=config["max_failures"],
                                                          controller_failure_limit=config["max_failures"]),
                             callbacks=[TuneReportCallback()]))
    write_status(job.run_dir, name, "running")
    try:
        trainer.fit()
    except Exception as exc:  # TrainingFailedError wraps the worker's exception; keep its first line as reason
        if stop_requested(job.run_dir):  # the job is winding down after SIGTERM: interrupted, not failed
            return
        reason = _root_reason(exc)
        if read_status(job.run_dir, name).get("status") == "stopped":  # ASHA's early stop is not a failure
            return
        if epochs_logged(job.run_dir, name) >= v.epochs:  # ASHA ends a trial at max_t too, killing its workers
            write_status(job.run_dir, name, "done")
            return
        write_status(job.run_dir, name, "failed", reason)
        log.error("variant %s failed: %s", name, reason)
        return
    write_status(job.run_dir, name, "done")


def _worker_bundle(v: VariantConfig) -> dict[str, float]:
    return {"CPU": v.cpus_per_worker} | ({"GPU": v.gpus_per_worker} if v.gpus_per_worker > 0 else {})


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


def run_with_ray(cfg: TrainConfig, job: JobSpec, variants: list[tuple[str, VariantConfig]]) -> None:
    from ray import tune

    from core.ray_cluster import check_fits, connect_ray
    from student_train.status import settle_trials

    connect_ray(cfg.ray.address)
    space = {"trial": tune.grid_search([{"name": n, "variant": v.model_dump(mode="json")} for n, v in variants])}

    def trial(config: dict[str, Any]) -> None:
        _trial_fn({**config["trial"], "job": job, "max_failures": cfg.tune.max_failures,
                   "start_timeout_s": cfg.tune.start_timeout_s})

    scheduler = None
    if cfg.tune.asha:
        # a variant that fails before its first epoch reports nothing; ASHA must not abort the sweep for it
        os.environ["TUNE_DISABLE_STRICT_METRIC_CHECKING"] = "1"
        epochs = {n: v.epochs for n, v in variants}
        scheduler = _RecordingASHA(job.run_dir, epochs, max_t=max(epochs.values()),
                                   grace_period=cfg.tune.asha_grace_epochs,
                                   reduction_factor=cfg.tune.asha_reduction_factor)
    for name, v in variants:  # a trial that can never be placed would wait forever
        check_fits([{"CPU": cfg.tune.cpus_per_trial}] + [_worker_bundle(v)] * v.num_workers, f"variant {name}")
    tuner = tune.Tuner(
        tune.with_resources(trial, {"CPU": cfg.tune.cpus_per_trial}),
        param_space=space,
        tune_config=tune.TuneConfig(max_concurrent_trials=cfg.tune.max_concurrent, scheduler=scheduler),
        run_config=tune.RunConfig(name="tune", storage_path=str(Path(job.run_dir).resolve() / "ray_results"),
                                  verbose=1))
    before = live_placement_groups()
    try:
        with first_on_sigterm(lambda: note_stop(job.run_dir)):  # before Tune tears its trials down
            grid = tuner.fit()
    except BaseException:
        if sigterm_received():  # bookkeeping first: `ray job stop` sends SIGKILL some seconds after SIGTERM
            mark_stopped(job.run_dir, [(n, v.epochs) for n, v in variants], "the job was stopped by SIGTERM")
            raise StopRequested("stopped by SIGTERM") from None
        raise
    finally:
        release_placement_groups(live_placement_groups() - before)
    errors = {}
    for result in grid:
        name = (result.config or {}).get("trial", {}).get("name")
        if name and result.error is not None:
            errors[name] = _root_reason(result.error)
    settle_trials(job.run_dir, [(n, v.epochs) for n, v in variants], errors)


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


class _RecordingASHA(ASHAScheduler):
    """ASHA that writes "stopped" into the status of each trial it stops early: only the scheduler knows."""

    def __init__(self, run_dir: Path, epochs: dict[str, int], **kw: Any) -> None:
        super().__init__(time_attr="epoch", metric="val_top1", mode="max", **kw)
        self.run_dir, self.epochs = run_dir, epochs

    def on_trial_result(self, tune_controller: Any, trial: Any, result: dict) -> str:
        from student_train.status import write_status

        decision = super().on_trial_result(tune_controller, trial, result)
        name = trial.config.get("trial", {}).get("name")
        epoch = int(result.get("epoch", 0))
        if decision == TrialScheduler.STOP and name in self.epochs and epoch < self.epochs[name]:
            write_status(self.run_dir, name, "stopped", f"stopped early by ASHA after {epoch} epoch(s)")
        return decision
