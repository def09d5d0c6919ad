"""`distill cache inspect`: what a cache holds and how good its soft labels are."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.parquet as pq

from distill.teacher_cache.locate import find_cache_dir
from distill.teacher_cache.reader import CacheReader
from distill.teacher_cache.schema import COL_FEATURES

LAST_RUN = "last_run.json"  # teacher_cache.run.SUMMARY_NAME (not imported: run.py pulls in torch and Ray)


def last_run_failures(directory: Path) -> tuple[str | None, dict[str, str]]:
    """(status, {shard: reason}) of the last `distill cache` run on this directory: its failed shards are listed in
    no manifest, so only its summary knows them. (None, {}) when there is no readable summary."""
    try:
        summary = json.loads((Path(directory) / LAST_RUN).read_text())
    except (OSError, ValueError):
        return None, {}
    failed = summary.get("failed") or {}
    return summary.get("status"), {str(k): str(v) for k, v in failed.items()} if isinstance(failed, dict) else {}


def column_bytes(path: Path, column: str) -> int:
    """Compressed bytes of one top-level column in a Parquet file (from the footer; no data read)."""
    md = pq.ParquetFile(path).metadata
    return sum(rg.column(j).total_compressed_size for rg in (md.row_group(i) for i in range(md.num_row_groups))
               for j in range(rg.num_columns) if rg.column(j).path_in_schema.split(".")[0] == column)


def _from_file(reader: CacheReader, stem: str) -> tuple[float, int, int]:
    """(top-k mass, labelled rows, teacher top-1 hits) read from the file (shards labelled by older builds)."""
    a = reader.arrays(stem)
    has = a.labels >= 0
    return (float(np.exp(a.topk_logits.astype(np.float32)).sum(-1).sum()), int(has.sum()),
            int((a.topk_ids[has, 0, 0] == a.labels[has]).sum()))


def inspect_cache(path: Path | str, verify: bool = True) -> dict[str, Any]:
    """Summary of one fingerprint directory (or the newest one under a cache root).

    Rows, labels, teacher hits and top-k mass come from the manifest (kept per shard since this build), so a
    cache of 20,000 shards is summarised without decoding 20,000 files; only shards labelled by older builds are
    read, and files with features for their column's size. `verify` checksums every listed file and reads its
    schema version from its footer; without it, the first file's version stands for all.
    """
    reader = CacheReader(find_cache_dir(path), verify=verify)
    rows = bytes_total = feature_bytes = labelled = correct = 0
    versions: set[int] = set()
    mass_sum = 0.0
    meta = reader.meta(reader.shards[0]) if reader.shards else None
    for stem in reader.shards:
        entry = reader.manifest.shards[stem]
        rows, bytes_total = rows + entry.rows, bytes_total + entry.file_bytes
        if verify or stem == reader.shards[0]:
            versions.add(reader.meta(stem).schema_version)  # the footer (and, with verify, the checksum)
        if meta is not None and meta.feature_dim is not None:
            feature_bytes += column_bytes(reader.check(stem), COL_FEATURES)
        if entry.topk_mass is None or entry.labelled is None or entry.top1_correct is None:
            mass, n_labelled, hits = _from_file(reader, stem)  # labelled by an older build: read once
        else:
            mass, n_labelled, hits = entry.topk_mass, entry.labelled, entry.top1_correct
        mass_sum, labelled, correct = mass_sum + mass, labelled + n_labelled, correct + hits
    errors = reader.all_errors()
    last_status, failed = last_run_failures(reader.directory)
    views = meta.num_views if meta else 0
    return {
        "cache_dir": str(reader.directory),
        "fingerprint": reader.fingerprint,
        "schema_version": max(versions, default=reader.manifest.schema_version),
        "file_schema_versions": sorted(versions),
        "teacher": reader.manifest.teacher,
        "shards": len(reader.shards),
        "rows": rows,
        "views": views,
        "k": meta.k if meta else None,
        "num_classes": meta.num_classes if meta else None,
        "preprocessing": meta.preprocessing if meta else None,
        "bytes": bytes_total,
        "bytes_per_sample_view": bytes_total / max(1, rows * views),
        "features": meta.features if meta else None,
        "feature_bytes": feature_bytes,
        "bytes_per_sample_view_without_features": (bytes_total - feature_bytes) / max(1, rows * views),
        "mean_topk_mass": mass_sum / max(1, rows * views),
        "labelled_rows": labelled,
        "teacher_top1_vs_labels": (correct / labelled) if labelled else None,
        "errors_recorded": len(errors),
        "first_errors": errors[:5],
        "last_run_status": last_status,
        "failed_shards": failed,  # shards the last run could not label (not cached), with the reason
    }


def near_chance(top1: float, labelled: int, num_classes: int | None) -> bool:
    """The teacher's top-1 on labelled rows is within two standard errors of guessing (1 / classes)."""
    if not num_classes or labelled <= 0:
        return False
    chance = 1.0 / num_classes
    return top1 <= chance + 2 * math.sqrt(chance * (1 - chance) / labelled)


def weak_teacher_warning(top1: float | None, labelled: int, num_classes: int | None) -> str | None:
    """What the cache stage and `cache inspect` say when the teacher is no better than chance on the labels: the
    labels are not its classes (another label set or class order), or the teacher is broken; either way students
    distilled from it learn its mistakes, which training would only report after every student has trained."""
    if top1 is None or not near_chance(top1, labelled, num_classes):
        return None
    return (f"the teacher's top-1 on the shards' own labels is {100 * top1:.2f}% on {labelled} labelled rows, no "
            f"better than chance ({100 / (num_classes or 1):.1f}% for {num_classes} classes): either the shards' "
            "labels are not the teacher's classes (another label set, or another class order: then this number "
            "says nothing of the teacher) or the teacher is broken or untrained (check its checkpoint and, for a "
            "foreign teacher, teacher.preprocessing). Students distilled from it learn what it predicts.")


def teacher_score(shards: dict[str, Any]) -> tuple[float | None, int]:
    """(top-1 of the cached teacher on labelled rows, labelled rows) from the manifest's per-shard counts."""
    counted = [e for e in shards.values() if e.labelled is not None and e.top1_correct is not None]
    labelled = sum(e.labelled for e in counted)
    return (sum(e.top1_correct for e in counted) / labelled if labelled else None), labelled


def _features_line(info: dict[str, Any]) -> str:
    f = info["features"]
    if not f:
        return "features     none (schema v1, or cache.features.enabled: false)"
    proj = "no projection" if f["projection"] == "none" else f"{f['projection']} projection from {f['source_dim']}"
    return (f"features     {f['dim']} x float16 per view ({proj}, seed {f['seed']}, input of `{f['layer']}`); "
            f"{info['bytes_per_sample_view_without_features']:.1f} bytes per sample-view without them")


def format_inspect(info: dict[str, Any]) -> str:
    acc = info["teacher_top1_vs_labels"]
    acc_text = ("n/a (no labels)" if acc is None
                else f"{acc:.4f} top-1 on {info['labelled_rows']} labelled rows (view 0)")
    lines = [
        f"cache        {info['cache_dir']}",
        f"fingerprint  {info['fingerprint']} (schema v{info['schema_version']})",
        f"teacher      {info['teacher'].get('arch')} ({info['teacher'].get('source')}), "
        f"{info['num_classes']} classes",
        f"shards       {info['shards']}",
        f"rows         {info['rows']} samples x {info['views']} views, top-{info['k']}",
        f"size         {info['bytes'] / 1e6:.2f} MB, {info['bytes_per_sample_view']:.1f} bytes per sample-view",
        _features_line(info),
        f"top-k mass   {info['mean_topk_mass']:.4f} (mean probability held by the stored top-k, T=1)",
        f"teacher acc  {acc_text}",
        *([f"  hint: {hint}"] if (hint := weak_teacher_warning(acc, info["labelled_rows"], info["num_classes"]))
          else []),
        f"errors       {info['errors_recorded']} samples skipped",
    ]
    lines += [f"  {e['shard']} {e['key']}: {e['reason']}" for e in info["first_errors"]]
    failed = info.get("failed_shards") or {}
    lines.append(f"failed       {len(failed)} shard(s) in the last run (status {info.get('last_run_status') or 'n/a'})"
                 + ("; not cached, re-run `distill cache` after fixing them:" if failed else ""))
    lines += [f"  {stem}: {reason}" for stem, reason in failed.items()]
    return "\n".join(lines)
