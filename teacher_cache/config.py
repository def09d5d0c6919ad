"""Configuration of the teacher-cache stage: one pydantic model, defaults in code, YAML overrides."""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, model_validator

from distill.core.config import MetricsConfig, PathOrURL, StrictConfig, absolute
from distill.core.storage.lease import MIN_LEASE_S
from distill.core.tracking import TrackingConfig
from distill.images.views import ViewsConfig
from distill.teacher.config import TeacherConfig


class FeaturesConfig(StrictConfig):
    """Also cache the teacher's pooled penultimate embedding per view (schema v2), for feature KD."""

    enabled: bool = Field(False, description="store the `features` column (needs an `arch` teacher)")
    dim: int | None = Field(None, ge=1, description="project down to this many dims (empty = the full embedding)")
    seed: int = Field(0, description="seed of the fixed random projection (recorded in the file metadata)")
    projection: Literal["gaussian", "orthogonal"] = Field("gaussian", description="Gaussian/sqrt(d) or orthonormal")


class RayConfig(StrictConfig):
    enabled: bool = Field(True, description="false = run every shard in this process (debugging, no Ray)")
    address: str | None = Field(None, description="Ray cluster address; empty = RAY_ADDRESS or a local cluster")
    num_actors: int | None = Field(None, ge=1, description="labeller actors; empty = one per GPU (cluster GPUs / "
                                   "gpus_per_actor) or, for CPU actors, one per node, counted at the start (set it "
                                   "on an autoscaling cluster)")
    cpus_per_actor: float | None = Field(None, ge=0.0, description="CPUs Ray reserves per actor; empty = 1 for GPU "
                                         "actors, the smallest node's CPUs for CPU actors (one actor fills a node)")
    gpus_per_actor: float = Field(0.0, ge=0.0, description="GPUs per labeller actor (e.g. 1, or 0.5 for two "
                                  "actors per GPU); the actors on a node share its CPUs for decoding")
    label_while_starting: bool = Field(True, description="a local cluster this run starts (no address, no "
                                       "RAY_ADDRESS): the driver labels shards with the teacher it has loaded while "
                                       "Ray and the actors start, then hands the rest to the actors")
    max_shard_retries: int = Field(2, ge=0, description="times a shard whose actor died (node lost, OOM) is "
                                   "labelled again on a live actor before it counts as failed")
    actor_start_timeout_s: float = Field(120.0, gt=0.0, description="an actor not placed and loaded within this "
                                         "while others work is dropped; the run goes on with the actors it has")
    actor_start_deadline_s: float = Field(1800.0, gt=0.0, description="with no actor started, give up after this "
                                          "(the request fits the cluster, but other jobs hold the resources)")
    shard_timeout_s: float = Field(600.0, gt=0.0, description="a shard with no result after this + "
                                   "shard_timeout_s_per_mb x its MB x views is hung (a stuck decode or read): its "
                                   "actor is killed and the shard retried (counts against max_shard_retries)")
    shard_timeout_s_per_mb: float = Field(10.0, ge=0.0, description="seconds added to a shard's deadline per MB "
                                          "of shard and per view (10: ~100 JPEGs of ImageNet size per MB)")


class CacheConfig(StrictConfig):
    """`distill cache`: label every shard once with the teacher, write sparse soft labels to Parquet."""

    shards: list[str] = Field(..., min_length=1, description="shard paths, globs or brace patterns")
    cache_root: PathOrURL = Field(..., description="the cache goes to <cache_root>/<fingerprint>/; a local "
                                  "directory or an s3:// prefix (credentials from the AWS environment)")
    staging_dir: Path | None = Field(None, description="s3:// cache_root only: local directory where a labeller "
                                     "writes a cache file before uploading it (default "
                                     "~/.cache/distill/staging/<bucket_prefix>)")
    lock_lease_s: float = Field(120.0, ge=MIN_LEASE_S, description="s3:// cache_root only: lease of the lock "
                                "object, renewed every third of it; the holder writes nothing once its last renewal "
                                "is 3/4 of it old, and the next run breaks a lock it saw unchanged this long "
                                f"(at least {MIN_LEASE_S:g}: renewals take seconds on a loaded host)")
    teacher: TeacherConfig
    topk: int = Field(10, ge=1)
    views: ViewsConfig = Field(default_factory=ViewsConfig)
    features: FeaturesConfig = Field(default_factory=FeaturesConfig)
    batch_size: int = Field(64, ge=1, description="view-images per teacher forward")
    device: Literal["auto", "cpu", "cuda"] = "auto"
    precision: Literal["auto", "fp32", "bf16", "fp16"] = Field(
        "auto", description="teacher forward precision; auto = bf16 on CUDA, fp32 on the CPU (in the fingerprint)")
    decode_backend: Literal["auto", "cpu", "gpu"] = Field(
        "auto", description="auto = nvjpeg + on-device view replay when the teacher runs on CUDA, else Pillow")
    decode_processes: int | None = Field(None, ge=0, description="CPU decode worker processes per labeller; "
                                         "empty = from its share S of the node's free CPUs (other work's load "
                                         "taken off): S - 1 on a GPU, S // 2 on the CPU from S = 3 (below: 0); "
                                         "0 = decode in the labeller's reading thread")
    max_image_pixels: int = Field(40_000_000, ge=1, le=178_000_000, description="bigger images are recorded as "
                                  "bad samples, checked from the header before decoding (decompression bombs)")
    torch_threads: int | None = Field(None, ge=1, description="intra-op threads per labeller; empty = on the CPU "
                                      "its share of the node's free CPUs less the decode processes (1 up to 2 "
                                      "CPUs); on a GPU, torch's (Ray: the actor's CPUs)")
    ray: RayConfig = Field(default_factory=RayConfig)
    metrics: MetricsConfig = Field(default_factory=MetricsConfig)
    progress: bool = True
    tracking: TrackingConfig = Field(default_factory=TrackingConfig, description="MLflow: a run per cache pass "
                                     "(default store: <cache_root>/../mlruns)")

    def anchored(self) -> CacheConfig:
        """This config with its local paths absolute (core.config.absolute): the labellers may run elsewhere."""
        t = self.teacher
        teacher = t.model_copy(update={"checkpoint": absolute(t.checkpoint), "scripted": absolute(t.scripted)})
        return self.model_copy(update={
            "shards": [s if "://" in s else str(absolute(Path(s))) for s in self.shards], "teacher": teacher,
            "cache_root": absolute(self.cache_root), "staging_dir": absolute(self.staging_dir)})

    @model_validator(mode="before")
    @classmethod
    def _drop_removed_fields(cls, data: Any) -> Any:
        """`decode_threads` did nothing since decoding moved to processes; configs (and resolved configs of older
        builds) that still carry it are read, with a warning, instead of refused."""
        if isinstance(data, dict) and "decode_threads" in data:
            warnings.warn("cache config: `decode_threads` is ignored (removed; decoding uses `decode_processes`); "
                          "delete it from the config", FutureWarning, stacklevel=2)
            data = {k: v for k, v in data.items() if k != "decode_threads"}
        return data

    @model_validator(mode="after")
    def _features_need_module(self) -> CacheConfig:
        if self.features.enabled and self.teacher.scripted is not None:
            raise ValueError("features.enabled needs an nn.Module teacher (`arch` + `checkpoint`): feature caching "
                             "hooks the classifier's last Linear, which a TorchScript / torch.export file hides")
        return self
