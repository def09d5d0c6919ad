"""The pipeline's last metric values reach a Pushgateway (a batch job may exit before any scrape)."""

from __future__ import annotations

import threading
from http.server import BaseHTTPRequestHandler, HTTPServer

from prometheus_client import Gauge

from distill.core.metrics_server import push_final_metrics


def test_final_metrics_are_pushed_with_the_job_label() -> None:
    got: list[tuple[str, str, bytes]] = []

    class Gateway(BaseHTTPRequestHandler):  # the Pushgateway's push API on loopback (tests/e2e runs the real one)
        def do_PUT(self) -> None:  # noqa: N802 - http.server's naming
            got.append((self.command, self.path, self.rfile.read(int(self.headers["Content-Length"]))))
            self.send_response(200)
            self.end_headers()

        def log_message(self, *args: object) -> None:
            pass

    server = HTTPServer(("127.0.0.1", 0), Gateway)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        Gauge("distill_test_push_marker_seconds", "a value only this test sets").set(12.5)
        assert push_final_metrics(f"http://127.0.0.1:{server.server_port}", job="distill_pipeline")
    finally:
        server.shutdown()
    assert [(c, p) for c, p, _ in got] == [("PUT", "/metrics/job/distill_pipeline")]
    assert b"distill_test_push_marker_seconds 12.5" in got[0][2]


def test_an_unreachable_gateway_never_fails_the_job() -> None:
    import socket

    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    assert push_final_metrics(f"http://127.0.0.1:{port}", job="distill_pipeline") is False
