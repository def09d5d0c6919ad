"""A real S3 API server on 127.0.0.1 for the object-storage tests: moto's server app behind werkzeug.

The only additions are a WSGI wrapper that counts requests (method, bucket, whether an object key was addressed),
so a test can say "this refresh read 0 shard objects" from what the server actually received, and gates: a test can
hold the body of an object's GET (`RequestLog.hold`), so a run waits inside that object for as long as the test
wants, on a fast machine as on a slow one; put hooks on requests (`RequestLog.before` / `after`: block a request
until the test releases it, answer 503, or change what the server sees, e.g. a store that ignores a header); or stop
the server (`RequestLog.stop`). Conditional writes are decided one at a time, as S3 does (moto alone does not).
"""

from __future__ import annotations

import contextlib
import json
import logging
import subprocess
import sys
import threading
import urllib.request
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from urllib.parse import unquote

COUNTS_PATH = "_requests"


class BodyGate:
    """Holds the body of every GET of one object: it trickles out one byte every 0.2 s (the client's read timeout
    never fires) until `release`, then the rest at once. `reached` is set when the first such GET arrives."""

    def __init__(self, object_path: str) -> None:
        self.object_path = object_path
        self.reached = threading.Event()
        self._released = threading.Event()

    def release(self) -> None:
        self._released.set()

    def stream(self, body: bytes) -> Iterator[bytes]:
        self.reached.set()
        sent = 0
        while sent < len(body) - 1 and not self._released.wait(0.2):
            yield body[sent:sent + 1]
            sent += 1
        yield body[sent:]


class Refuse(Exception):
    """Raised by a `before` hook: the server answers this HTTP status instead of handling the request."""

    def __init__(self, status: str = "503 Service Unavailable") -> None:
        super().__init__(status)
        self.status = status


Hook = Callable[[str, str, dict], None]  # (method, "bucket/key", WSGI environ)


@dataclass
class RequestLog:
    counts: Counter = field(default_factory=Counter)  # (method, bucket, "object"|"bucket") -> n
    keys: list[tuple[str, str]] = field(default_factory=list)  # (method, "bucket/key") of object requests
    lock: threading.Lock = field(default_factory=threading.Lock)
    gates: dict[str, BodyGate] = field(default_factory=dict)  # "bucket/key" -> gate on its GETs
    before: list[Hook] = field(default_factory=list)  # before the server handles a request (may block/refuse/edit)
    after: list[Hook] = field(default_factory=list)  # after it handled it, before the response leaves
    stop: Callable[[], None] | None = None  # close the server: later requests meet a refused connection

    def hold(self, object_path: str) -> BodyGate:
        """Hold the body of GETs of `bucket/key` until the returned gate is released."""
        gate = BodyGate(object_path)
        with self.lock:
            self.gates[object_path] = gate
        return gate

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
        # S3 decides a conditional write (If-Match / If-None-Match) atomically; moto checks the condition, then
        # stores, with no lock between, so two racing creates could both win. Serialised here, as S3 behaves.
        self.conditional = threading.Lock()

    def __call__(self, environ: dict, start_response: Callable) -> Iterator[bytes]:
        path = unquote(environ.get("PATH_INFO", "")).lstrip("/")
        bucket, _, key = path.partition("/")
        method = environ.get("REQUEST_METHOD", "")
        if path == COUNTS_PATH:  # the log itself, for a client in another process (not an S3 request)
            if method == "DELETE":
                self.log.reset()
            with self.log.lock:
                body = json.dumps({"counts": [[*k, n] for k, n in self.log.counts.items()],
                                   "keys": self.log.keys}).encode()
            start_response("200 OK", [("Content-Type", "application/json")])
            return [body]
        with self.log.lock:
            self.log.counts[(method, bucket, "object" if key else "bucket")] += 1
            if key:
                self.log.keys.append((method, f"{bucket}/{key}"))
            gate = self.log.gates.get(f"{bucket}/{key}") if method == "GET" else None
        try:
            for hook in list(self.log.before):
                hook(method, path, environ)
        except Refuse as exc:
            start_response(exc.status, [("Content-Type", "text/plain")])
            return [b"refused by the test"]
        conditional = method in ("PUT", "DELETE") and bool(key) and (
            "HTTP_IF_MATCH" in environ or "HTTP_IF_NONE_MATCH" in environ)
        if not self.log.after and not conditional:
            if gate is not None:  # the whole answer from moto, its body then held by the gate
                return gate.stream(b"".join(self.app(environ, start_response)))
            return self.app(environ, start_response)
        captured: list = []
        with self.conditional if conditional else contextlib.nullcontext():  # (the `after` hooks run outside it)
            body = b"".join(self.app(environ, lambda *a: captured.append(a) or (lambda _b: None)))
        for hook in list(self.log.after):
            hook(method, path, environ)
        start_response(*captured[0])
        return gate.stream(body) if gate is not None else [body]


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

    def stop() -> None:
        server.shutdown()
        server.server_close()

    log.stop = stop
    try:
        yield endpoint, log
    finally:
        stop()
        thread.join(timeout=10)


class RemoteRequestLog:
    """The request log of a server in another process (`python tests/s3_server.py`), read over HTTP."""

    def __init__(self, endpoint: str) -> None:
        self.url = f"{endpoint}/{COUNTS_PATH}"

    def snapshot(self) -> RequestLog:
        raw = json.loads(urllib.request.urlopen(self.url, timeout=30).read())
        log = RequestLog()
        log.counts.update({(m, b, k): n for m, b, k, n in raw["counts"]})
        log.keys.extend((m, k) for m, k in raw["keys"])
        return log

    def reset(self) -> None:
        urllib.request.urlopen(urllib.request.Request(self.url, method="DELETE"), timeout=30).read()


@contextmanager
def s3_server_process() -> Iterator[tuple[str, RemoteRequestLog]]:
    """The same server in its own process (as a real store would be: it does not share our GIL)."""
    proc = subprocess.Popen([sys.executable, __file__], stdout=subprocess.PIPE, text=True)
    try:
        endpoint = proc.stdout.readline().strip()  # type: ignore[union-attr]
        if not endpoint.startswith("http://"):
            raise RuntimeError(f"the S3 server did not start (said {endpoint!r})")
        yield endpoint, RemoteRequestLog(endpoint)
    finally:
        proc.terminate()
        proc.wait(timeout=20)


S3_ENV = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1",
          "AWS_REGION": "us-east-1"}


if __name__ == "__main__":
    with s3_server() as (url, _):
        print(url, flush=True)
        threading.Event().wait()
