"""Prometheus metrics of the cache stage (updated in the driver from labeller progress events)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, push_to_gateway

IMAGES = Counter("distill_cache_images_total", "Samples labelled by the teacher")
DECODE_ERRORS = Counter("distill_cache_decode_errors_total", "Samples skipped (undecodable or bad label)")
SHARDS = Counter("distill_cache_shards_total", "Shards finished, by outcome", ["status"])
SHARDS_PLANNED = Gauge("distill_cache_shards_planned", "Shards in the current run, by decision", ["decision"])
BYTES_WRITTEN = Counter("distill_cache_written_bytes_total", "Bytes of Parquet cache files written")
BATCH_LATENCY = Histogram("distill_cache_batch_latency_seconds", "Teacher forward + top-k time per batch",
                          buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10))
LAST_SUCCESS = Gauge("distill_cache_last_success_timestamp_seconds", "Unix time the last run finished cleanly")
RUN_SECONDS = Gauge("distill_cache_run_duration_seconds", "Wall time of the last cache run")


def push_refresh_summary(gateway: str, summary: dict, job: str = "distill_cache_refresh") -> None:
    """Batch jobs are not scraped reliably: push the refresh outcome to a Prometheus Pushgateway."""
    push_to_gateway(gateway, job=job, registry=refresh_registry(summary), timeout=10)


def refresh_registry(summary: dict) -> CollectorRegistry:
    """The refresh summary as a registry of its own (only these series go to the Pushgateway)."""
    reg = CollectorRegistry()
    shards = Gauge("distill_cache_refresh_shards", "Shards per outcome in the last refresh", ["outcome"],
                   registry=reg)
    for outcome in ("new", "changed", "unchanged", "vanished"):
        shards.labels(outcome).set(len(summary[outcome]))
    shards.labels("failed").set(len(summary["failed"]))
    Gauge("distill_cache_refresh_duration_seconds", "Wall time of the last refresh", registry=reg).set(
        summary["seconds"])
    Gauge("distill_cache_refresh_images", "Samples labelled by the last refresh", registry=reg).set(summary["images"])
    status = Gauge("distill_cache_refresh_status", "1 for the outcome of the last refresh", ["status"], registry=reg)
    for name in ("success", "partial", "failure"):
        status.labels(name).set(1.0 if summary["status"] == name else 0.0)
    if summary["status"] == "success":
        Gauge("distill_cache_refresh_last_success_timestamp_seconds", "Unix time of the last clean refresh",
              registry=reg).set_to_current_time()
    return reg
