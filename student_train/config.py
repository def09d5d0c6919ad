"""Configuration of `distill train`: shared data/run settings plus one or many student variants (variant.py)."""

from __future__ import annotations

import itertools
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import Field, ValidationError, ValidationInfo, field_validator, model_validator

from distill.core.config import PathOrURL, StrictConfig
from distill.core.tracking import TrackingConfig
from distill.images.preprocessing import PreprocessingConfig
from distill.student_train.twins import add_twins
from distill.student_train.variant import Mode, VariantConfig
from distill.teacher.config import TeacherConfig

__all__ = ["Mode", "VariantConfig", "DataConfig", "TuneConfig", "RayTrainConfig", "TrainConfig"]


class DataConfig(StrictConfig):
    train_shards: list[str] = Field(..., min_length=1)
    val_shards: list[str] = Field(default_factory=list, description="the split that selects: each student's best "
                                  "epoch (best.pt) and the best student")
    test_shards: list[str] = Field(default_factory=list, description="held out: nothing selects on it; after "
                                   "training each student's best.pt is scored on it once (<variant>/test.json) and "
                                   "the twin comparison is made on it. With a cache, cache these shards too")
    unlabelled_shards: list[str] = Field(default_factory=list, description="an unlabelled pool (cached): distilled "
                                         "variants learn from its rows through the KD term only (labels in these "
                                         "shards are ignored), mode none skips it")
    labelled_passes: int | None = Field(None, ge=1, description="with an unlabelled pool: passes a mode-none "
                                        "variant makes over the labelled shards per epoch; default round(all rows / "
                                        "labelled-shard rows), so an undistilled twin takes as many optimizer steps "
                                        "as its distilled variant (1 = plain epochs, ~pool-size times fewer steps)")
    cache_root: PathOrURL | None = Field(None, description="teacher cache (a directory or an s3:// prefix); "
                                         "required unless every variant is mode: none")
    num_classes: int | None = Field(None, ge=2, description="only without a cache (default: classes.json)")
    preprocessing: PreprocessingConfig = Field(default_factory=PreprocessingConfig,
                                               description="only without a cache: input size, mean/std, channels")
    train_crop_scale: tuple[float, float] = Field((0.35, 1.0), description="only without a cache: area range of "
                                                  "the live random-resized crops")
    train_crop_ratio: tuple[float, float] = Field((3 / 4, 4 / 3), description="only without a cache: aspect "
                                                  "ratio range of the live crops")
    train_flip: bool = Field(True, description="only without a cache: random horizontal flips of the live crops "
                             "(false for digits and text, where a mirror image is another class or none)")
    train_rotate: float = Field(0.0, ge=0.0, le=180.0, description="only without a cache: live rotations drawn "
                                "from ±this many degrees (0 = none; a few degrees suit digits and scans)")
    fingerprint: str | None = Field(None, description="cache fingerprint to read; default: the newest cache "
                                    "written by `teacher` (or the newest under cache_root)")
    shuffle_buffer: int = Field(256, ge=1, description="rows shuffled within a group of shards read together")
    interleave_shards: int | None = Field(None, ge=1, description="training reads this many shards of a loader "
                                          "slot at a time and mixes their rows, so labelled rows are spread among "
                                          "an unlabelled pool's; 1 = one shard after another; default: 4 beside "
                                          "unlabelled_shards, else 1")
    loader_workers: int = Field(1, ge=0, description="DataLoader worker processes per rank (decode in parallel)")


class TuneConfig(StrictConfig):
    max_concurrent: int = Field(2, ge=1)
    cpus_per_trial: float = Field(0.05, ge=0.0, description="the trial driver; the workers hold the real CPUs")
    max_failures: int = Field(1, ge=0, description="restarts of a variant after a worker dies (resumes)")
    start_timeout_s: float = Field(1800.0, gt=0.0, description="how long a variant's worker group may wait for "
                                   "resources when it starts or restarts (after a node loss); then that attempt "
                                   "fails, and with no restart left the variant is failed with the reason. "
                                   "Variants queued behind others (max_concurrent above what the cluster fits) "
                                   "wait too: keep it above a variant's run time there")
    asha: bool = Field(False, description="stop weak variants early on val top-1 (ASHA)")
    asha_grace_epochs: int = Field(1, ge=1)
    asha_reduction_factor: float = Field(2.0, gt=1.0)


class RayTrainConfig(StrictConfig):
    enabled: bool = Field(True, description="false = variants run one after another in this process")
    address: str | None = None


class TrainConfig(StrictConfig):
    """`distill train`: many student variants from one cache (or plain supervised with mode: none)."""

    run_dir: Path
    data: DataConfig
    teacher: TeacherConfig | None = Field(None, description="the cache's teacher block: picks the cache it "
                                          "wrote (and checks it) and is the live teacher for mode: online")
    base: VariantConfig = Field(default_factory=VariantConfig, description="defaults for every variant")
    variants: list[dict[str, Any]] = Field(default_factory=list, description="explicit variants (fields of base)")
    grid: dict[str, list[Any]] = Field(default_factory=dict, description="cartesian product over base fields")
    twins: bool = Field(True, description="add an undistilled twin (same recipe, mode: none) for every distilled "
                        "recipe that has none, named <arch>-noKD (see student_train/twins.py)")
    fuse: Literal["auto", "off"] | Annotated[int, Field(ge=1)] = Field(
        "auto", description="students that share a data stream (shards + pool as their mode reads them, passes, "
        "views, batch, epochs, data seed, input preprocessing, ranks, online teacher) train in one group: one "
        "loader, every batch read once for all of them. auto = one group per stream; off = each student alone; "
        "N = at most N students per group")
    horizontal: Literal["auto", "on", "off"] = Field(
        "auto", description="inside a group, train students of one architecture and set-up (precision, ZeRO 0, "
        "optimizer, grad_accum, no feature KD) as one fused model (grouped convolutions, HFTA). auto = on CUDA; "
        "on the CPU the students loop over the shared batch instead (measured: fusing does not pay there)")
    tune: TuneConfig = Field(default_factory=TuneConfig)
    ray: RayTrainConfig = Field(default_factory=RayTrainConfig)
    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="without Ray (in-process / torchrun): "
                                                   "auto = this rank's GPU when there is one, else the CPU")
    log_every: int = Field(20, ge=1, description="steps between progress lines (and host syncs of the loss)")
    keep_checkpoints: int = Field(2, ge=1, description="DeepSpeed epoch checkpoints kept per variant (resume "
                                  "falls back to an older one when the newest is damaged)")
    metrics_port: int | None = Field(0, description="per-worker Prometheus port (0 = any free, null = off)")
    metrics_host: str = Field("127.0.0.1", description="workers' exporter bind address; 0.0.0.0 on multi-node "
                              "clusters (the target file then names the node's address)")
    metrics_targets_dir: Path | None = Field(None, description="where workers publish file_sd scrape targets "
                                             "(default: <run_dir>/metrics_targets)")
    tracking: TrackingConfig = Field(default_factory=TrackingConfig, description="MLflow: a run per sweep and per "
                                     "student (default store: <run_dir>/../mlruns)")

    @field_validator("fuse", "horizontal", mode="before")
    @classmethod
    def _yaml_on_off(cls, value: Any, info: ValidationInfo) -> Any:
        """YAML reads a bare on/off as true/false (fuse: on = auto)."""
        if isinstance(value, bool):
            return ("auto" if info.field_name == "fuse" else "on") if value else "off"
        return value

    @model_validator(mode="after")
    def _check(self) -> TrainConfig:
        unknown = sorted(set(self.grid) - set(VariantConfig.model_fields))
        if unknown:
            raise ValueError(f"grid axes {unknown} are not variant fields; valid: {sorted(VariantConfig.model_fields)}")
        self.expand()  # validates every variant now, so nothing fails after training started
        return self

    def expand(self) -> list[tuple[str, VariantConfig]]:
        """Explicit variants, then the grid (applied on top of each explicit variant, or of base)."""
        base = self.base.model_dump()
        explicit = self.variants or [{}]
        keys = list(self.grid)
        combos = list(itertools.product(*(self.grid[k] for k in keys))) or [()]
        out: list[tuple[str, VariantConfig]] = []
        problems: list[Any] = []
        for i, ev in enumerate(explicit):
            for combo in combos:
                fields = {**base, **ev, **dict(zip(keys, combo, strict=True))}
                try:
                    v = VariantConfig.model_validate(fields)
                except ValidationError as exc:  # collect every variant's problems, report them all at once
                    problems += _variant_problems(exc, i, ev, dict(zip(keys, combo, strict=True)))
                    continue
                if v.name is None and (combo or len(explicit) > 1):
                    parts = [f"{k}={val}" for k, val in zip(keys, combo, strict=True)]
                    v.name = "-".join([v.arch, v.mode, *parts]) if parts else None
                out.append((v.display_name(len(out)), v))
        if problems:  # pydantic nests these under the config's own path: train.variants.<i>.<field>
            unique = {(tuple(p["loc"]), p["type"]): p for p in problems}
            raise ValidationError.from_exception_data("variants", list(unique.values()))
        if self.twins:
            out = add_twins(out)
        names = [n for n, _ in out]
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise ValueError(f"variant names repeat: {dup}; give each variant a distinct `name`")
        for name, v in out:
            if v.mode == "online" and self.teacher is None:
                raise ValueError(f"variant {name}: mode online needs the `teacher` block (the cache's teacher)")
        return out


def _variant_problems(exc: ValidationError, index: int, explicit: dict, combo: dict[str, Any]) -> list[Any]:
    """Each field error re-rooted where the user wrote the value: variants.<i>.<field>, grid.<field> or
    base.<field>, so every problem of every variant is listed at once under its real path."""
    out = []
    for e in exc.errors():
        field = e["loc"][0] if e["loc"] else ""
        if field in combo:
            loc: tuple = ("grid", field)
        elif field in explicit:
            loc = ("variants", index, *e["loc"])
        else:
            loc = ("base", *e["loc"])
        out.append({"type": e["type"], "loc": loc, "input": e["input"], **({"ctx": e["ctx"]} if "ctx" in e else {})})
    return out
