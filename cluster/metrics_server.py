"""Start the prometheus_client HTTP exporter for the current process (stages define their own metrics)."""

from __future__ import annotations

import logging
import os
from pathlib import Path

from prometheus_client import start_http_server

from teacher_cache.scrape_target import publish_target

log = logging.getLogger(__name__)


def start_metrics_server(host: str = "127.0.0.1", port: int = 0, targets_file: Path | None = None,
                         job: str = "distill") -> int:
    """Serve /metrics on host:port (0 = any free port); returns the bound port.

    With `targets_file`, also publish this process as a Prometheus file_sd target (atomic write), so a
    Prometheus configured with cluster/prometheus/prometheus.yml finds it wherever it runs.
    """
    server, _thread = start_http_server(port, addr=host)
    bound = int(server.server_port)
    log.info("metrics at http://%s:%d/metrics", host, bound)
    if targets_file is not None:
        publish_target(Path(targets_file), host, bound, {"job": job, "pid": str(os.getpid())})
    return bound
