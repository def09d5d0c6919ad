"""A cache pass in MLflow (core/tracking.py): one run per `distill cache` with its rate, its shards by outcome and
the teacher's top-1 on the labelled rows (from the manifest: the whole cache, not only this run's shards)."""

from __future__ import annotations

from pathlib import Path
from typing import Protocol

from distill.core.tracking import Tracker
from distill.teacher_cache.config import CacheConfig
from distill.teacher_cache.manifest import Manifest


class PassSummary(Protocol):
    """What a cache pass reports (teacher_cache.run.CacheResult), as far as tracking reads it."""

    fingerprint: str
    cache_dir: Path
    labelled: list[str]
    unchanged: list[str]
    failed: dict[str, str]
    vanished: list[str]
    images: int
    decode_errors: int
    seconds: float

    @property
    def status(self) -> str: ...


def record_cache_run(cfg: CacheConfig, result: PassSummary, manifest: Manifest | None) -> None:
    """Never fails the pass (core/tracking.py); a remote cache_root keeps its local store in ./mlruns."""
    if not cfg.tracking.enabled:
        return
    output = cfg.cache_root if isinstance(cfg.cache_root, Path) else Path.cwd() / "cache"
    teacher = cfg.teacher
    run = Tracker.start(cfg.tracking, output, f"cache {result.fingerprint}",
                        params={"teacher": teacher.arch or str(teacher.scripted), "topk": cfg.topk,
                                "views": cfg.views.model_dump(mode="json"), "shards": cfg.shards,
                                "precision": cfg.precision, "decode_backend": cfg.decode_backend,
                                "features": cfg.features.enabled},
                        tags={"distill.stage": "cache", "distill.cache_fingerprint": result.fingerprint,
                              "distill.status": result.status})
    entries = list(manifest.shards.values()) if manifest is not None else []
    labelled = sum(e.labelled or 0 for e in entries)
    correct = sum(e.top1_correct or 0 for e in entries)
    run.log_metrics({"images": result.images, "images_per_s": result.images / max(result.seconds, 1e-9),
                     "seconds": result.seconds, "shards_labelled": len(result.labelled),
                     "shards_unchanged": len(result.unchanged), "shards_failed": len(result.failed),
                     "shards_vanished": len(result.vanished), "decode_errors": result.decode_errors,
                     "cache_shards": len(entries), "cache_rows": sum(e.rows for e in entries),
                     "teacher_top1_on_labelled": correct / labelled if labelled else None})
    if isinstance(result.cache_dir, Path):
        run.log_artifact(result.cache_dir / "last_run.json")
    run.end("FINISHED" if result.status == "success" else "FAILED")
