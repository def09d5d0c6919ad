"""A process's Prometheus /metrics endpoint, and its file_sd scrape target.

Each stage defines its own metrics (its `metrics.py`); whoever runs it (the CLI, a Ray actor, a training worker)
starts the endpoint here. With a targets file, the process also publishes itself as a Prometheus file_sd target
(atomic write), so a Prometheus configured with cluster/prometheus/prometheus.yml finds it wherever Ray placed it.
"""

from __future__ import annotations

import json
import logging
import os
import socket
from pathlib import Path

from prometheus_client import REGISTRY, push_to_gateway, start_http_server

from distill.core.atomic_io import atomic_write

log = logging.getLogger(__name__)


def publish_target(path: Path, host: str, port: int, labels: dict[str, str]) -> None:
    """Atomically write `[{targets: [host:port], labels}]`; a wildcard bind names this node's address."""
    target_host = host if host not in ("0.0.0.0", "::") else socket.gethostbyname(socket.gethostname())
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, json.dumps([{"targets": [f"{target_host}:{port}"], "labels": labels}]))


def start_metrics_server(host: str = "127.0.0.1", port: int = 0, targets_file: Path | None = None,
                         job: str = "distill") -> int:
    """Serve /metrics on host:port (0 = any free port); returns the bound port."""
    server, _thread = start_http_server(port, addr=host)
    bound = int(server.server_port)
    log.info("metrics at http://%s:%d/metrics", host, bound)
    if targets_file is not None:
        publish_target(Path(targets_file), host, bound, {"job": job, "pid": str(os.getpid())})
    return bound


def push_final_metrics(gateway: str, job: str) -> bool:
    """Push this process's metrics (every stage's) to a Pushgateway once, at the end of a batch job.

    Why: a job that exits seconds after its last stage may never be scraped at its final values (compress and
    deploy durations, the cache's totals). Best effort: an unreachable gateway is logged, never fails the job.
    """
    try:
        push_to_gateway(gateway, job=job, registry=REGISTRY, timeout=10)
    except OSError as exc:
        log.warning("could not push the final metrics to %s: %s", gateway, exc)
        return False
    return True
