"""Start the prometheus_client HTTP exporter for the current process (stages define their own metrics)."""

from __future__ import annotations

import logging

from prometheus_client import start_http_server

log = logging.getLogger(__name__)


def start_metrics_server(host: str = "127.0.0.1", port: int = 0) -> int:
    """Serve /metrics on host:port (0 = any free port); returns the bound port."""
    server, _thread = start_http_server(port, addr=host)
    bound = int(server.server_port)
    log.info("metrics at http://%s:%d/metrics", host, bound)
    return bound
