"""Configuration of the teacher-cache stage: one pydantic model, defaults in code, YAML overrides."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal

from distill.core.storage import parse_location
from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, model_validator

PathOrURL = Annotated[Path | str, BeforeValidator(parse_location)]  # s3:// stays a URL string, the rest a Path


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class PreprocessingConfig(_Strict):
    """Teacher preprocessing; any field left empty comes from the model's pretrained config, then defaults."""

    input_size: int | None = Field(None, ge=8, le=2048, description="square input size in pixels")
    crop_pct: float | None = Field(None, gt=0.0, le=1.0, description="eval view: share of the shorter side")
    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None
    interpolation: Literal["bilinear", "bicubic", "nearest"] | None = None
    channels: Literal[1, 3] | None = Field(None, description="1 = grayscale, 3 = RGB (alpha is dropped)")


class TeacherConfig(_Strict):
    """A teacher is an architecture + local checkpoint, or a TorchScript / torch.export file."""

    arch: str | None = Field(None, description="registered, timm:<name> or torchvision:<name>")
    arch_kwargs: dict[str, int | float | str | bool] = Field(default_factory=dict)
    checkpoint: Path | None = Field(None, description="state dict file, loaded with weights_only=True")
    pretrained: bool = Field(False, description="timm pretrained weights (needs hub access)")
    scripted: Path | None = Field(None, description="TorchScript (.pt) or torch.export (.pt2) file")
    num_classes: int | None = Field(None, ge=2, description="inferred from the checkpoint when empty")
    preprocessing: PreprocessingConfig = Field(default_factory=PreprocessingConfig)

    @model_validator(mode="after")
    def _one_source(self) -> TeacherConfig:
        if (self.arch is None) == (self.scripted is None):
            raise ValueError("give exactly one of `arch` (with `checkpoint`) or `scripted`")
        if self.arch is not None and self.checkpoint is None and not self.pretrained:
            raise ValueError(f"`arch: {self.arch}` needs `checkpoint: PATH` (or `pretrained: true`); "
                             "an untrained teacher would cache noise")
        if self.scripted is not None and self.preprocessing.input_size is None:
            raise ValueError("a `scripted` teacher needs `preprocessing.input_size` (and mean/std)")
        return self


class ViewsConfig(_Strict):
    num_views: int = Field(4, ge=1, le=64, description="view 0 = eval view, 1..V-1 = random resized crops")
    seed: int = 0
    scale: tuple[float, float] = (0.08, 1.0)
    ratio: tuple[float, float] = (3 / 4, 4 / 3)
    flip: bool = True

    @model_validator(mode="after")
    def _ranges(self) -> ViewsConfig:
        if not 0 < self.scale[0] <= self.scale[1] <= 1:
            raise ValueError(f"scale must satisfy 0 < min <= max <= 1, got {list(self.scale)}")
        if not 0 < self.ratio[0] <= self.ratio[1]:
            raise ValueError(f"ratio must satisfy 0 < min <= max, got {list(self.ratio)}")
        return self


class FeaturesConfig(_Strict):
    """Also cache the teacher's pooled penultimate embedding per view (schema v2), for feature KD."""

    enabled: bool = Field(False, description="store the `features` column (needs an `arch` teacher)")
    dim: int | None = Field(None, ge=1, description="project down to this many dims (empty = the full embedding)")
    seed: int = Field(0, description="seed of the fixed random projection (recorded in the file metadata)")
    projection: Literal["gaussian", "orthogonal"] = Field("gaussian", description="Gaussian/sqrt(d) or orthonormal")


class RayConfig(_Strict):
    enabled: bool = Field(True, description="false = run every shard in this process (debugging, no Ray)")
    address: str | None = Field(None, description="Ray cluster address; empty = RAY_ADDRESS or a local cluster")
    num_actors: int | None = Field(None, ge=1, description="labeller actors; empty = one per GPU (cluster GPUs / "
                                   "gpus_per_actor) or, for CPU actors, one per node, counted at the start (set it "
                                   "on an autoscaling cluster)")
    cpus_per_actor: float | None = Field(None, ge=0.0, description="CPUs Ray reserves per actor; empty = 1 for GPU "
                                         "actors, the smallest node's CPUs for CPU actors (one actor fills a node)")
    gpus_per_actor: float = Field(0.0, ge=0.0, description="GPUs per labeller actor (e.g. 1, or 0.5 for two "
                                  "actors per GPU); the actors on a node share its CPUs for decoding")
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


class MetricsConfig(_Strict):
    enabled: bool = True
    host: str = "127.0.0.1"
    port: int = Field(0, ge=0, le=65535, description="0 = any free port (logged)")
    pushgateway: str | None = Field(None, description="Pushgateway URL: `cache refresh` pushes its summary there, "
                             "`pipeline` its final metrics")
    targets_file: Path | None = Field(None, description="write this process's scrape target here (file_sd)")


class CacheConfig(_Strict):
    """`distill cache`: label every shard once with the teacher, write sparse soft labels to Parquet."""

    shards: list[str] = Field(..., min_length=1, description="shard paths, globs or brace patterns")
    cache_root: PathOrURL = Field(..., description="the cache goes to <cache_root>/<fingerprint>/; a local "
                                  "directory or an s3:// prefix (credentials from the AWS environment)")
    staging_dir: Path | None = Field(None, description="s3:// cache_root only: local directory where a labeller "
                                     "writes a cache file before uploading it (default "
                                     "~/.cache/distill/staging/<bucket_prefix>)")
    lock_lease_s: float = Field(120.0, ge=5.0, description="s3:// cache_root only: lease of the lock object, "
                                "renewed every third of it; the holder writes nothing once its last renewal is 3/4 "
                                "of it old, and the next run breaks a lock it saw unchanged this long")
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
                                         "empty = from its share S of the node's CPUs: S - 1 on a GPU, S // 2 on "
                                         "the CPU from S = 3 (below: 0); 0 = decode in the labeller's reading thread")
    decode_threads: int = Field(2, ge=1, description="kept for old configs; decoding uses decode_processes")
    max_image_pixels: int = Field(40_000_000, ge=1, le=178_000_000, description="bigger images are recorded as "
                                  "bad samples, checked from the header before decoding (decompression bombs)")
    torch_threads: int | None = Field(None, ge=1, description="intra-op threads per labeller; empty = on the CPU "
                                      "its share of the node's CPUs less the decode processes (1 up to 2 CPUs); on a "
                                      "GPU, torch's (Ray: the actor's CPUs)")
    ray: RayConfig = Field(default_factory=RayConfig)
    metrics: MetricsConfig = Field(default_factory=MetricsConfig)
    progress: bool = True

    @model_validator(mode="after")
    def _features_need_module(self) -> CacheConfig:
        if self.features.enabled and self.teacher.scripted is not None:
            raise ValueError("features.enabled needs an nn.Module teacher (`arch` + `checkpoint`): feature caching "
                             "hooks the classifier's last Linear, which a TorchScript / torch.export file hides")
        return self
