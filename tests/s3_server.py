"""A real S3 API server on 127.0.0.1 for the object-storage tests: moto's server app behind werkzeug.

The only addition is a WSGI wrapper that counts requests (method, bucket, whether an object key was addressed),
so a test can say "this refresh read 0 shard objects" from what the server actually received.
"""

from __future__ import annotations

import logging
import threading
import urllib.request
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from urllib.parse import unquote


@dataclass
class RequestLog:
    counts: Counter = field(default_factory=Counter)  # (method, bucket, "object"|"bucket") -> n
    keys: list[tuple[str, str]] = field(default_factory=list)  # (method, "bucket/key") of object requests
    lock: threading.Lock = field(default_factory=threading.Lock)

    def reset(self) -> None:
        with self.lock:
            self.counts.clear()
            self.keys.clear()

    def object_reads(self, bucket: str, prefix: str = "") -> int:
        """GET and HEAD requests on objects of `bucket` whose key starts with `prefix`."""
        with self.lock:
            return sum(1 for m, k in self.keys if m in ("GET", "HEAD") and k.startswith(f"{bucket}/{prefix}"))

    def requests(self, bucket: str) -> int:
        with self.lock:
            return sum(n for (_, b, _), n in self.counts.items() if b == bucket)


class _Counting:
    def __init__(self, app: Callable, log: RequestLog) -> None:
        self.app, self.log = app, log

    def __call__(self, environ: dict, start_response: Callable) -> Iterator[bytes]:
        path = unquote(environ.get("PATH_INFO", "")).lstrip("/")
        bucket, _, key = path.partition("/")
        method = environ.get("REQUEST_METHOD", "")
        with self.log.lock:
            self.log.counts[(method, bucket, "object" if key else "bucket")] += 1
            if key:
                self.log.keys.append((method, f"{bucket}/{key}"))
        return self.app(environ, start_response)


@contextmanager
def s3_server() -> Iterator[tuple[str, RequestLog]]:
    """Start moto's S3 server on 127.0.0.1 (a free port) in this process; yield (endpoint URL, request log)."""
    from moto.moto_server.werkzeug_app import DomainDispatcherApplication, create_backend_app
    from werkzeug.serving import make_server

    logging.getLogger("werkzeug").setLevel(logging.WARNING)  # no line per request
    log = RequestLog()
    app = _Counting(DomainDispatcherApplication(create_backend_app), log)
    server = make_server("127.0.0.1", 0, app, threaded=True)
    thread = threading.Thread(target=server.serve_forever, name="moto-s3", daemon=True)
    thread.start()
    endpoint = f"http://127.0.0.1:{server.server_port}"
    # moto keeps its buckets per process: start every server empty (its documented reset endpoint)
    urllib.request.urlopen(urllib.request.Request(f"{endpoint}/moto-api/reset", method="POST"), timeout=30).read()
    log.reset()
    try:
        yield endpoint, log
    finally:
        server.shutdown()
        thread.join(timeout=10)


S3_ENV = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1",
          "AWS_REGION": "us-east-1"}
