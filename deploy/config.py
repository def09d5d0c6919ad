"""Configuration of `distill deploy` (bundle) and `distill serve` (Ray Serve endpoint)."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, model_validator

from distill.core.config import StrictConfig


class DeployConfig(StrictConfig):
    """`distill deploy`: turn one compressed student into a self-describing bundle."""

    compress_dir: Path = Field(..., description="out_dir of `distill compress`")
    out_dir: Path = Field(..., description="the bundle: a link to its newest version under <out_dir>.versions/, "
                          "moved atomically once a new version is complete")
    student: str | None = Field(None, description="default: the compressed student with the best baseline top-1")
    stage: Literal["auto", "baseline", "int8", "pruned", "pruned+int8", "qad+int8", "pruned+qad+int8"] = Field(
        "auto", description="the served ONNX model; auto: the smallest (pick_by) stage on the accuracy/cost Pareto "
        "front within max_top1_drop; a named stage below the floor is refused")
    pick_by: Literal["size", "latency"] = Field("size", description="auto's cost: file size, or batch-32 latency")
    max_top1_drop: float | None = Field(0.01, ge=0.0, le=1.0, description="accuracy floor: a stage may lose at "
                                        "most this much val top-1 against its parent student (null: no floor)")
    classes: list[str] | Path | None = Field(None, description="class names, or a classes.json (default: found "
                                             "beside the training shards)")
    parity_atol: float = Field(1e-3, gt=0.0, description="max |dlogit| ONNX fp32 vs PyTorch on real val images")
    int8_min_agreement: float = Field(0.97, ge=0.0, le=1.0, description="int8 vs fp32 top-1 agreement floor")
    val_images: int = Field(256, ge=8)
    litert_stage: Literal["auto", "none", "litert", "litert+int8", "pruned+litert", "pruned+litert+int8",
                          "qad+litert+int8", "pruned+qad+litert+int8"] = Field(
        "auto", description="the LiteRT (.tflite) model bundled next to the ONNX ones; auto: the smallest "
        "(pick_by) within max_top1_drop that passes parity, else none with the reason in the card; a named stage "
        "that fails the floor or parity is refused")
    litert_parity_atol: float = Field(1e-3, gt=0.0, description="max |dlogit| fp32 LiteRT vs PyTorch on real val "
                                      "images")
    litert_min_agreement: float = Field(0.99, ge=0.0, le=1.0, description="fp32 LiteRT vs PyTorch top-1 agreement "
                                        "floor on real val images")
    keep_versions: int = Field(3, ge=1, description="bundle versions kept under <out_dir>.versions/ (the current "
                               "one included): a server started on an older one can still restart its replicas")


class ServeConfig(StrictConfig):
    """`distill serve`: a Ray Serve HTTP endpoint for a bundle."""

    bundle: Path
    host: str = Field("127.0.0.1", description="bind address; loopback unless you mean to expose it")
    port: int = Field(8000, ge=1, le=65535)
    model: Literal["int8", "fp32"] = "int8"
    top_k: int = Field(5, ge=1)
    max_bytes: int = Field(10 * 1024 * 1024, ge=1024, description="larger uploads get 413")
    max_pixels: int = Field(40_000_000, ge=1, description="larger images (by their header) get 413, undecoded")
    max_batch_size: int = Field(32, ge=1)
    max_ongoing_requests: int | None = Field(None, ge=1, description="requests a replica admits at once "
                                             "(default 2 x max_batch_size; Serve's own default, 5, caps batches "
                                             "at 5 and lets 5 slow uploads hold off /healthz)")
    batch_wait_ms: float = Field(5.0, ge=0.0)
    replicas: int = Field(1, ge=1)
    cpus_per_replica: float = Field(1.0, gt=0.0)

    @model_validator(mode="after")
    def _batches_can_fill(self) -> ServeConfig:
        if self.max_ongoing_requests is not None and self.max_ongoing_requests < self.max_batch_size:
            raise ValueError(f"max_ongoing_requests ({self.max_ongoing_requests}) is below max_batch_size "
                             f"({self.max_batch_size}): a batch could never fill; raise it or leave it unset")
        return self
