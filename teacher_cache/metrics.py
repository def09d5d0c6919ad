"""Prometheus metrics of the cache stage (updated in the driver from labeller progress events)."""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

IMAGES = Counter("distill_cache_images_total", "Samples labelled by the teacher")
DECODE_ERRORS = Counter("distill_cache_decode_errors_total", "Samples skipped (undecodable or bad label)")
SHARDS = Counter("distill_cache_shards_total", "Shards finished, by outcome", ["status"])
SHARDS_PLANNED = Gauge("distill_cache_shards_planned", "Shards in the current run, by decision", ["decision"])
BYTES_WRITTEN = Counter("distill_cache_written_bytes_total", "Bytes of Parquet cache files written")
BATCH_LATENCY = Histogram("distill_cache_batch_latency_seconds", "Teacher forward + top-k time per batch",
                          buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10))
LAST_SUCCESS = Gauge("distill_cache_last_success_timestamp_seconds", "Unix time the last run finished cleanly")
RUN_SECONDS = Gauge("distill_cache_run_duration_seconds", "Wall time of the last cache run")
