"""Prometheus metrics of student training, one scrape target per worker process.

Each training worker (a Ray Train worker, a torchrun rank, or the CLI process) serves its own /metrics and
writes a Prometheus file_sd target file into the targets directory
(default <run_dir>/metrics_targets/), so Prometheus discovers workers
wherever Ray places them. Series labels: variant and rank only (bounded). A process that trains a group of
students serves the series of all of them; its target file is named after the group (after the student when it
trains alone) and carries the group id (and the variant, for a student alone).
"""

from __future__ import annotations

import logging
import socket
from pathlib import Path

from prometheus_client import Counter, Gauge, Histogram

from distill.core.metrics_server import publish_target, start_metrics_server

log = logging.getLogger(__name__)

SAMPLES = Counter("distill_train_samples_total", "Training samples processed", ["variant", "rank"])
SAMPLES_PER_S = Gauge("distill_train_samples_per_second", "Training throughput of the last interval",
                      ["variant", "rank"])
STEP_SECONDS = Histogram("distill_train_step_seconds", "Wall time of one optimizer micro-step", ["variant"],
                         buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10))
LOSS = Gauge("distill_train_loss", "Training loss of the last interval", ["variant", "rank", "part"])
VAL_TOP1 = Gauge("distill_train_val_top1_ratio", "Validation top-1 accuracy of the last epoch", ["variant"])
EPOCH = Gauge("distill_train_epoch", "Epochs completed", ["variant"])

_served: dict[str, int] = {}


def _ray_node_id() -> str | None:
    try:
        import ray

        return ray.get_runtime_context().get_node_id() if ray.is_initialized() else None
    except Exception:  # noqa: BLE001 - a label is optional; never fail training for it
        return None


def serve_worker_metrics(targets: Path, group: str, variants: list[str], rank: int, port: int,
                         host: str = "127.0.0.1") -> int:
    """Start this process's exporter once and publish it as a file_sd target (atomic write): one target for the
    group (`group` label, plus `variant` when the group is one student, as before groups existed)."""
    if "port" not in _served:
        _served["port"] = start_metrics_server(host, port)
    bound = _served["port"]
    labels = {"job": "distill_train", "group": group, "rank": str(rank), "host": socket.gethostname()}
    if len(variants) == 1:
        labels["variant"] = variants[0]
    node = _ray_node_id()
    if node:
        labels["node"] = node  # several Ray nodes can share one host (and one host name)
    name = variants[0] if len(variants) == 1 else group
    publish_target(Path(targets) / f"{name}-rank{rank}.json", host, bound, labels)
    log.info("training metrics of %s rank %d at http://%s:%d/metrics", ", ".join(variants), rank, host, bound)
    return bound
