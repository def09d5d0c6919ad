"""The teacher fingerprint: the name of a cache directory, a hash of everything that changes the cached numbers."""

from __future__ import annotations

import hashlib
import json

from distill.images.preprocessing import Preprocessing
from distill.images.views import ViewPolicy
from distill.teacher.hooks import head_precision
from distill.teacher.load import LoadedTeacher
from distill.teacher_cache.config import CacheConfig
from distill.teacher_cache.placement import resolve_placement
from distill.teacher_cache.schema import fingerprint_schema_version


def fingerprint(teacher: LoadedTeacher, cfg: CacheConfig) -> str:
    """Hash of everything that changes the cached numbers: weights, arch, preprocessing, k, views, schema."""
    payload = {
        "schema_version": fingerprint_schema_version(cfg.features.enabled),
        "teacher": {k: teacher.info[k] for k in ("source", "arch", "weights_sha256", "num_classes")}
        | {"arch_kwargs": teacher.info.get("arch_kwargs", {})},
        "preprocessing": teacher.preprocessing.as_dict(),
        "topk": cfg.topk,
        "views": view_policy(cfg, teacher.preprocessing).as_dict(),
    }
    precision = resolve_precision(cfg)
    if precision != "fp32":  # fp32 caches keep the fingerprint they had before precision existed
        payload["precision"] = precision
        payload["head_precision"] = head_precision(teacher.model, precision)  # bf16 heads of older builds differ
    if cfg.features.enabled:  # a cache with features is a different cache; without, the hash is unchanged
        payload["features"] = cfg.features.model_dump(mode="json")
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]


def resolve_precision(cfg: CacheConfig) -> str:
    """auto = bf16 where the labellers run on CUDA (2x the fp32 rate), fp32 on the CPU (same numbers as before);
    where they run is decided once, on the driver (teacher_cache/placement.py)."""
    return resolve_placement(cfg).precision


def view_policy(cfg: CacheConfig, prep: Preprocessing) -> ViewPolicy:
    return ViewPolicy.of(cfg.views, prep.crop_pct)
