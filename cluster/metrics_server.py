"""Start the prometheus_client HTTP exporter for the current process (stages define their own metrics)."""

from __future__ import annotations

import json
import logging
import os
import socket
from pathlib import Path

from prometheus_client import start_http_server

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
        target_host = host if host not in ("0.0.0.0", "::") else socket.gethostbyname(socket.gethostname())
        entry = [{"targets": [f"{target_host}:{bound}"], "labels": {"job": job, "pid": str(os.getpid())}}]
        path = Path(targets_file)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
        tmp.write_text(json.dumps(entry))
        os.replace(tmp, path)
    return bound
