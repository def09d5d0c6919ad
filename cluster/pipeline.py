"""`distill pipeline`: every stage in order from one YAML; each stage skips what is already current.

shards (skipped when the same config already wrote them) -> teacher (supervised pre-training, finished
variants skipped) -> cache (incremental) -> train (finished variants skipped, interrupted ones resume).
Every section is validated before the first stage starts. A stage whose every shard/variant failed stops the
pipeline (StageFailedError: exit 4); a partial stage lets the next ones run on what it finished, and the command
then exits 3 (`partial_stages`), so a nightly job that lost shards or variants is not green.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path

import yaml
from pydantic import Field, model_validator

from distill.cluster.cli_common import StageFailedError
from distill.compress.config import CompressConfig
from distill.core.config import MetricsConfig, StrictConfig
from distill.core.tracking import TrackingConfig
from distill.deploy.config import DeployConfig
from distill.images.shard_writer import ShardsConfig
from distill.student_train.config import TrainConfig
from distill.teacher_cache.config import CacheConfig

log = logging.getLogger(__name__)


class PipelineConfig(StrictConfig):
    """Sections are the stage configs; a missing section skips that stage."""

    shards: ShardsConfig | None = None
    teacher: TrainConfig | None = Field(None, description="supervised teacher pre-training (variants mode: none)")
    cache: CacheConfig | None = None
    train: TrainConfig | None = None
    compress: CompressConfig | None = None
    deploy: DeployConfig | None = None
    ray_address: str | None = Field(None, description="Ray cluster for every stage (default: RAY_ADDRESS or local)")
    metrics: MetricsConfig = Field(default_factory=MetricsConfig, description="this process's exporter (cache, "
                                   "compress and deploy metrics); set targets_file for Prometheus file_sd")
    tracking: TrackingConfig = Field(default_factory=TrackingConfig, description="MLflow for every stage that does "
                                     "not set its own `tracking` (default: one local store, <output>/../mlruns)")

    @model_validator(mode="after")
    def _tracking_everywhere(self) -> PipelineConfig:
        """A pipeline-level `tracking` applies to the stages that do not set their own."""
        if "tracking" in self.model_fields_set:
            for stage in (self.teacher, self.cache, self.train, self.compress):
                if stage is not None and "tracking" not in stage.model_fields_set:
                    stage.tracking = self.tracking
        return self
    summary_json: Path | None = Field(None, description="write every stage's summary here as JSON (also printed "
                                      "by `distill pipeline --json`); the screen ends on the short summary")


def _shards_current(cfg: ShardsConfig) -> bool:
    done = Path(cfg.out_dir) / "shards_config.resolved.yaml"
    return done.exists() and yaml.safe_load(done.read_text()) == cfg.model_dump(mode="json")


def run_shards(cfg: ShardsConfig) -> dict:
    from distill.images.shard_writer import run

    if _shards_current(cfg):
        log.info("shards: %s is current, skipping", cfg.out_dir)
        return {"stage": "shards", "skipped": True, "out_dir": str(cfg.out_dir)}
    res = run(cfg)
    (Path(cfg.out_dir) / "shards_config.resolved.yaml").write_text(
        yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False))
    return {"stage": "shards", "train": res.train_pattern, "val": res.val_pattern, "test": res.test_pattern,
            "samples": res.samples}


def run_compress(cfg: CompressConfig) -> dict:
    from distill.compress.run import run

    done = Path(cfg.out_dir) / "compress_config.resolved.yaml"
    students = [p.stat().st_mtime for p in Path(cfg.train_run).glob("*/best.pt")]
    if (done.exists() and yaml.safe_load(done.read_text()) == cfg.model_dump(mode="json")
            and done.stat().st_mtime > max(students, default=float("inf"))):
        log.info("compress: %s is current, skipping", cfg.out_dir)
        return {"stage": "compress", "skipped": True, "out_dir": str(cfg.out_dir)}
    res = run(cfg)
    log.info("compression report:\n%s", res.table)
    if res.status == "failure":
        raise StageFailedError(f"compress stage: every student failed; see {res.out_dir}/report.txt")
    return {"stage": "compress", "status": res.status, "failures": res.failures, "out_dir": str(res.out_dir),
            "plot": str(res.plot),
            "rows": [{k: r[k] for k in ("student", "stage", "val_top1", "size_mb", "latency_b1_ms")} for r in res.rows]}


def run_pipeline(cfg: PipelineConfig) -> list[dict]:
    """Run the configured stages in order; raise on the first stage that fails outright."""
    from distill.core.ray_cluster import connect_ray

    if cfg.metrics.enabled:
        from distill.core.metrics_server import start_metrics_server

        start_metrics_server(cfg.metrics.host, cfg.metrics.port, cfg.metrics.targets_file, job="distill_pipeline")
    started = False
    if any(s is not None and s.ray.enabled for s in (cfg.teacher, cfg.cache, cfg.train)):
        started = connect_ray(cfg.ray_address)
    results: list[dict] = []
    try:
        _run_stages(cfg, results)
    finally:  # a batch job is not scraped reliably: its last values go to the Pushgateway too
        if cfg.metrics.enabled and cfg.metrics.pushgateway:
            from distill.core.metrics_server import push_final_metrics

            push_final_metrics(cfg.metrics.pushgateway, job="distill_pipeline")
        if started:  # Ray's teardown logs now, not after the summary the command prints last
            import ray

            ray.shutdown()
    if cfg.summary_json is not None:
        from distill.core.atomic_io import atomic_write

        Path(cfg.summary_json).parent.mkdir(parents=True, exist_ok=True)
        atomic_write(Path(cfg.summary_json), json.dumps(results, indent=1) + "\n")
    return results


def run_deploy(cfg: DeployConfig) -> dict:
    from distill.deploy.bundle import run

    res = run(cfg)
    files = sorted(json.loads((Path(res.bundle) / "bundle.json").read_text()).get("files", {}))
    return {"stage": "deploy", "bundle": str(res.bundle), "student": res.student, "stage_shipped": res.stage,
            "parity": res.parity, "litert": res.litert or f"none: {res.litert_reason}", "files": files,
            "sample": res.sample, "sample_label": res.sample_label, "sample_content_type": res.sample_content_type}


def run_cache_stage(cfg: CacheConfig) -> dict:
    from distill.teacher_cache.run import run

    res = run(cfg)
    if res.status == "failure":
        raise StageFailedError("cache stage: every shard to label failed; nothing new was cached: "
                               + "; ".join(f"{k}: {v}" for k, v in res.failed.items()))
    return {"stage": "cache", "status": res.status, "cache_dir": res.cache_url or str(res.cache_dir),
            "labelled": len(res.labelled), "unchanged": len(res.unchanged), "failed": res.failed}


def run_train_stage(cfg: TrainConfig, name: str) -> dict:
    """`teacher` (supervised pre-training) and `train` (the students) are both training stages."""
    from distill.student_train.leaderboard import twin_pairs
    from distill.student_train.run import run

    res = run(cfg)
    if res.status == "failure":
        raise StageFailedError(f"{name} stage: every variant failed; see {res.run_dir}/leaderboard.txt")
    best = res.best()  # chosen on val; its test top-1 is reported, never used to choose
    return {"stage": name, "status": res.status, "run_dir": str(res.run_dir),
            "best": best["variant"] if best else None, "best_val_top1": best["val_top1"] if best else None,
            "best_test_top1": best.get("test_top1") if best else None,
            "best_mode": best["mode"] if best else None, "twins": twin_pairs(res.leaderboard),
            "teacher_val_top1": res.teacher_val_top1[0] if res.teacher_val_top1 else None,
            "teacher_test_top1": res.teacher_test_top1[0] if res.teacher_test_top1 else None,
            "teacher_warning": res.teacher_warning}


def _run_stages(cfg: PipelineConfig, results: list[dict]) -> None:
    """Each configured stage in order; `results` gets each finished stage's summary."""
    from distill.core.run_phase import begin_work

    stages: list[tuple[str, Callable[[], dict]]] = []
    if cfg.shards:
        stages.append(("shards", partial(run_shards, cfg.shards)))
    if cfg.teacher:
        stages.append(("teacher", partial(run_train_stage, cfg.teacher, "teacher")))
    if cfg.cache:
        stages.append(("cache", partial(run_cache_stage, cfg.cache)))
    if cfg.train:
        stages.append(("train", partial(run_train_stage, cfg.train, "train")))
    if cfg.compress:
        stages.append(("compress", partial(run_compress, cfg.compress)))
    if cfg.deploy:
        stages.append(("deploy", partial(run_deploy, cfg.deploy)))
    for name, stage in stages:
        t0 = time.perf_counter()
        log.info("=== stage %s ===", name)
        summary = stage()
        summary["seconds"] = round(time.perf_counter() - t0, 1)
        results.append(summary)
        log.info("stage %s done: %s", name, json.dumps(summary))
        begin_work()  # a later stage's error is "failed during the run" (6): this stage's work is kept


def partial_stages(results: list[dict]) -> list[str]:
    """Stages that finished only part of their shards/variants: the pipeline then exits 3."""
    return [r["stage"] for r in results if r.get("status") == "partial"]
