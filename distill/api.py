"""Every stage from Python: build its config (a config object, or a plain dict validated exactly as the CLI
validates YAML) and call the stage; its result object comes back. Errors are raised, not turned into exit codes.

In a process where Ray is already initialised (your own Ray job or driver), the stages use that Ray instead of
starting one, and leave it running. README, "Python API":

    from distill import api

    shards = api.shards({"source": "mnist", "out_dir": "data/shards"})
    cache = api.cache(api.CacheConfig(shards=[shards.train_pattern], cache_root="data/cache",
                                      teacher={"arch": "resnet_mini", "checkpoint": "teacher.pt"}))
    print(cache.status, cache.fingerprint, cache.labelled)
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, TypeVar

from pydantic import BaseModel

from distill.compress.config import CompressConfig
from distill.deploy.config import DeployConfig, ServeConfig
from distill.images.shard_writer import ShardsConfig
from distill.student_train.config import TrainConfig
from distill.teacher_cache.config import CacheConfig

if TYPE_CHECKING:
    from distill.compress.run import CompressResult
    from distill.deploy.bundle import DeployResult
    from distill.images.shard_writer import ShardsResult
    from distill.student_train.run import TrainResult
    from distill.teacher_cache.run import CacheResult

__all__ = ["CacheConfig", "CompressConfig", "DeployConfig", "ServeConfig", "ShardsConfig", "TrainConfig", "cache",
           "compress", "deploy", "serve", "shards", "train"]
M = TypeVar("M", bound=BaseModel)


def _config(model: type[M], cfg: M | Mapping[str, Any]) -> M:
    return cfg if isinstance(cfg, model) else model.model_validate(dict(cfg))


def shards(cfg: ShardsConfig | Mapping[str, Any]) -> ShardsResult:
    """`distill shards`: an image folder or a bundled real data set as ImageNet-WDS shards."""
    from distill.images.shard_writer import run

    return run(_config(ShardsConfig, cfg))


def cache(cfg: CacheConfig | Mapping[str, Any], wait_for_lock: bool = False) -> CacheResult:
    """`distill cache`: label every new or changed shard once with the teacher (Ray actors, or in-process with
    `ray: {enabled: false}`); `wait_for_lock` queues behind another writer instead of raising CacheLockedError."""
    from distill.teacher_cache.run import run

    return run(_config(CacheConfig, cfg), wait_for_lock=wait_for_lock)


def train(cfg: TrainConfig | Mapping[str, Any], only: str | None = None) -> TrainResult:
    """`distill train`: every variant (and its undistilled twin) from the cache; `only` trains one variant."""
    from distill.student_train.run import run

    return run(_config(TrainConfig, cfg), only=only)


def compress(cfg: CompressConfig | Mapping[str, Any]) -> CompressResult:
    """`distill compress`: prune + KD fine-tune + int8 the best students, measured."""
    from distill.compress.run import run

    return run(_config(CompressConfig, cfg))


def deploy(cfg: DeployConfig | Mapping[str, Any]) -> DeployResult:
    """`distill deploy`: a versioned bundle of the chosen stage, parity-checked, with its model card."""
    from distill.deploy.bundle import run

    return run(_config(DeployConfig, cfg))


def serve(cfg: ServeConfig | Mapping[str, Any], blocking: bool = False) -> str:
    """`distill serve`: the bundle on Ray Serve; returns the endpoint's URL (blocking=False returns at once)."""
    from distill.deploy.serve import start

    return start(_config(ServeConfig, cfg), blocking=blocking)
