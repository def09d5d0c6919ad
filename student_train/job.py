"""What every worker of a training job shares (JobSpec), where a worker runs (WorkerContext), a student's input."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from distill.core.errors import DistillError
from distill.images.preprocessing import Preprocessing
from distill.student_train.data import ShardPair
from distill.student_train.variant import VariantConfig
from distill.teacher.config import TeacherConfig


class NonFiniteLossError(DistillError, RuntimeError):
    """The loss became NaN/inf; the variant is marked failed (retrying would fail the same way)."""


@dataclass(frozen=True)
class AshaRule:
    """ASHA's stopping rule (Li et al.; Ray Tune's ASHAScheduler, one bracket) applied to each student."""

    max_t: int
    grace_period: int = 1
    reduction_factor: float = 2.0


@dataclass
class JobSpec:
    """What every worker of every variant shares (picklable, sent to Ray workers)."""

    run_dir: Path
    cache_dir: Path | None  # None: a cache-less run (mode none: teacher pre-training, baselines)
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
    asha: AshaRule | None = None  # stop weak students early (tune.asha)
    test: list[ShardPair] = field(default_factory=list)  # held out: scored once per best.pt, never selected on
    fingerprint: str | None = None  # the teacher fingerprint of the cache (cache_dir may be a version under it)


@dataclass
class WorkerContext:
    rank: int = 0
    world: int = 1
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    report: Callable[[dict[str, Any], Path | None], None] | None = None
    in_ray: bool = False


def student_prep(v: VariantConfig, teacher: Preprocessing) -> Preprocessing:
    """The student's input: its own size/normalisation/channels after the replayed crop (teacher's by default);
    more channels than the cache's are the cache's grey replicated (`source_channels`)."""
    channels = v.channels or teacher.channels
    return Preprocessing(input_size=v.input_size or teacher.input_size, crop_pct=teacher.crop_pct,
                         mean=tuple(v.mean or teacher.mean), std=tuple(v.std or teacher.std),
                         interpolation=teacher.interpolation, channels=channels,
                         source_channels=teacher.channels if channels != teacher.channels else None)


def data_seed(v: VariantConfig) -> int:
    """The seed of a student's data stream (shard order, shuffle, views): data_seed, else its seed."""
    return v.seed if v.data_seed is None else v.data_seed
