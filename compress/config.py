"""Configuration of `distill compress`: select students, prune + KD fine-tune, int8, measure."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, model_validator

from distill.core.config import StrictConfig
from distill.core.tracking import TrackingConfig


class SelectConfig(StrictConfig):
    top_n: int = Field(1, ge=1, description="how many students to compress")
    by: Literal["val_top1", "pareto"] = Field("val_top1", description="best accuracy, or the accuracy/MACs front")
    students: list[str] = Field(default_factory=list, description="compress these students (leaderboard variant "
                                "names) instead of the top_n by `by`; `distill compress --student NAME`")


class PruneConfig(StrictConfig):
    enabled: bool = True
    target: Literal["macs", "params"] = "macs"
    ratio: float = Field(0.5, gt=0.0, lt=1.0, description="keep this fraction of the MACs (or parameters)")
    round_to: int = Field(8, ge=1, description="channel counts become multiples of this (hardware friendly)")
    steps: int = Field(1, ge=1, description="prune in this many steps (the kept fraction shrinks geometrically "
                       "to `ratio`), each followed by `finetune_epochs` of KD fine-tune: small cuts recover better")
    finetune_epochs: int = Field(3, ge=0, description="KD fine-tune epochs from the same cache after each step")
    finetune_lr: float = Field(1e-3, gt=0.0)
    finetune_warmup_epochs: float = Field(0.0, ge=0.0, description="linear warm-up before the cosine decay")
    finetune_min_lr_ratio: float = Field(0.01, ge=0.0, le=1.0, description="cosine decays to lr x this")
    finetune_alpha: float | None = Field(None, ge=0.0, le=1.0, description="KD weight (default: the student's; "
                                         "a no-KD student fine-tunes with 0.5)")
    finetune_temperature: float | None = Field(None, gt=0.0, description="default: the student's")


class QuantizeConfig(StrictConfig):
    enabled: bool = True
    calib_samples: int = Field(256, ge=8, description="cached training samples (replayed views) to calibrate on")
    per_channel: bool = True
    method: Literal["minmax", "entropy", "percentile"] = Field(
        "minmax", description="ONNX Runtime's calibration; LiteRT int8 always takes each tensor's global min/max "
        "over the calibration views (compress/litert_convert.py)")
    reduce_range: bool | Literal["auto"] = Field(
        "auto", description="ONNX Runtime int8 weights on 7 bits: on x86 CPUs without VNNI (AVX2, pre-VNNI AVX-512) "
        "the fused u8 x s8 kernels can saturate their 16-bit sums; MobileNets lost 2.6-3.4 pt there that the graph "
        "itself does not, and 0.2-1.0 pt with this on (BENCHMARKS.md). auto = on when the CPU compress runs on (where "
        "the int8 models are measured and gated) is x86 without VNNI; set it for the CPUs you serve from. Not applied "
        "to QAD's int8 (its fake-quant graph simulates 8-bit weights)")


class LiteRTConfig(StrictConfig):
    enabled: bool = Field(True, description="also write fp32 + full-integer int8 .tflite models (LiteRT, for phones "
                          "and boards; converted by litert-torch), measured in the LiteRT interpreter; needs pip "
                          "install -e '.[litert]' (without it they are skipped with a note); int8 follows "
                          "quantize.enabled and its calib_samples")
    models: list[Literal["baseline", "pruned"]] = Field(
        ["baseline", "pruned"], min_length=1, description="which fp32 models get LiteRT targets (a conversion takes "
        "seconds to tens of seconds on a CPU: [pruned] when only the pruned model ships)")


class QADConfig(StrictConfig):
    """Quantization-aware distillation: fine-tune a fake-quant copy of the student (the deployed int8 recipe
    simulated: compress/qad_model.py) on the cached soft labels and views, through the training loop; the teacher
    is never loaded. Stages `qad+int8` (ONNX Runtime) and `qad+litert+int8` (LiteRT, when litert.enabled), and
    `pruned+qad+int8` / `pruned+qad+litert+int8` from the pruned model."""

    enabled: bool = Field(False, description="off by default: it trains the student again (epochs x the training "
                          "set, slower per step than the fp32 fine-tune); needs pip install -e '.[litert]' "
                          "(torchao's PT2E); without it the stage is skipped with the reason in qad.json")
    models: list[Literal["baseline", "pruned"]] = Field(
        ["baseline"], min_length=1, description="which fp32 models get a QAD copy (pruned: after its KD fine-tune)")
    epochs: int = Field(2, ge=1, description="QAD epochs over the cached training set (best epoch by the fake-quant "
                        "model's val top-1)")
    lr: float = Field(2e-4, gt=0.0, description="peak learning rate: small, around the trained weights")
    warmup_epochs: float = Field(0.0, ge=0.0)
    min_lr_ratio: float = Field(0.01, ge=0.0, le=1.0, description="cosine decays to lr x this")
    alpha: float | None = Field(None, ge=0.0, le=1.0, description="KD weight (default: the student's; a no-KD "
                                "student takes 0.5)")
    temperature: float | None = Field(None, gt=0.0, description="default: the student's")


class LatencyConfig(StrictConfig):
    rounds: int = Field(5, ge=3, description="timing rounds; every stage of a student runs once per round, the order "
                        "alternating (A B, B A, ...); the report gives the median of the rounds and their range, and "
                        "calls a stage faster or slower only when the ranges do not overlap")
    repeats_b1: int = Field(50, ge=3, description="calls per round at batch 1 (the round keeps their median)")
    repeats_b32: int = Field(10, ge=3, description="calls per round at batch 32")
    warmup: int = Field(5, ge=1, description="calls per model before the first round")
    threads: int | None = Field(None, ge=1, description="onnxruntime intra-op threads (default: all cores)")


class CompressConfig(StrictConfig):
    """`distill compress`: reads a `distill train` run (its leaderboard, checkpoints and resolved config)."""

    train_run: Path = Field(..., description="run_dir of a finished `distill train`")
    out_dir: Path
    select: SelectConfig = Field(default_factory=SelectConfig)
    prune: PruneConfig = Field(default_factory=PruneConfig)
    quantize: QuantizeConfig = Field(default_factory=QuantizeConfig)
    litert: LiteRTConfig = Field(default_factory=LiteRTConfig)
    qad: QADConfig = Field(default_factory=QADConfig)
    latency: LatencyConfig = Field(default_factory=LatencyConfig)
    val_limit: int | None = Field(None, ge=1, description="evaluate on at most this many val samples")
    max_top1_drop: float = Field(0.01, ge=0.0, le=1.0, description="the report's verdict: a stage pays when it "
                                 "loses at most this much val top-1 against its parent (deploy has its own floor)")
    min_smaller: float = Field(4.0, gt=0.0, description="the report's verdict: size goal (x smaller than parent)")
    min_speedup: float = Field(2.0, gt=0.0, description="the report's verdict: batch-32 latency goal (x faster)")
    tracking: TrackingConfig = Field(default_factory=TrackingConfig, description="MLflow: a run per compress and "
                                     "per student stage (default store: <out_dir>/../mlruns)")

    @model_validator(mode="after")
    def _qad_needs_int8(self) -> CompressConfig:
        if self.qad.enabled and not self.quantize.enabled:
            raise ValueError("qad.enabled needs quantize.enabled: QAD's int8 models are calibrated on "
                             "quantize.calib_samples cached views; turn quantize on or qad off")
        return self
