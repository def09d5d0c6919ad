"""Ray Serve endpoint hardening over real HTTP: pixel bombs, formats, chunked uploads, a responsive /healthz,
bundles verified against bundle.json before anything is loaded.

The bundle is a tiny real ONNX model (no training needed: these tests are about the HTTP edge, not accuracy).
Nothing here depends on the machine's speed: where a request must still be in progress while something else is
asked, the test holds it open itself (an upload whose last chunk it has not sent, a model run held at a gate).
"""

import asyncio
import http.client
import io
import json
import socket
import threading
import time
import urllib.error
import urllib.request

import numpy as np
import pytest
import torch
from helpers import wait_healthy
from PIL import Image

from distill.deploy.bundle_files import BundleError, new_version, publish, seal, write_file
from distill.deploy.config import ServeConfig
from distill.deploy.serve import BodyTooLarge, Replica, build_app, read_limited

pytestmark = pytest.mark.integration


def make_bundle(link):
    """A real versioned bundle (deploy's own writer): tiny ONNX model, preprocessing, classes, bundle.json."""
    version = new_version(link)
    model = torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3), torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(),
                                torch.nn.Linear(4, 3)).eval()
    torch.onnx.export(model, (torch.zeros(1, 1, 16, 16),), str(version / "model.onnx"), input_names=["input"],
                      output_names=["logits"], dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}},
                      opset_version=17, dynamo=False)
    write_file(version / "preprocessing.json", json.dumps({"input_size": 16, "crop_pct": 0.875, "mean": [0.5],
                                                           "std": [0.25], "interpolation": "bilinear",
                                                           "channels": 1}))
    write_file(version / "classes.json", json.dumps(["a", "b", "c"]))
    seal(version, {"student": "tiny", "stage": "baseline"})
    publish(link, version)
    return link


@pytest.fixture(scope="module")
def tiny_bundle(tmp_path_factory):
    return make_bundle(tmp_path_factory.mktemp("bundle") / "bundle")


def _png(w, h, color=0):
    buf = io.BytesIO()
    Image.new("L", (w, h), color).save(buf, format="PNG")
    return buf.getvalue()


def _post(url, data, ctype="image/png"):
    req = urllib.request.Request(url, data=data, method="POST", headers={"Content-Type": ctype})
    try:
        with urllib.request.urlopen(req, timeout=120) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_read_limited_stops_reading_at_the_limit():
    """The chunked-upload limit is enforced while reading: the rest of the stream is never pulled."""
    pulled = []

    async def endless():
        while True:
            pulled.append(1)
            yield b"x" * 1000

    with pytest.raises(BodyTooLarge, match="over the limit of 5000 bytes"):
        asyncio.run(read_limited(endless(), 5000))
    assert len(pulled) == 6

    async def small():
        yield b"ab"
        yield b"cd"

    assert asyncio.run(read_limited(small(), 10)) == b"abcd"


def test_serve_limits_over_real_http(tiny_bundle, ray_local):
    from ray import serve

    from distill.deploy.serve import start

    port = _free_port()
    url = start(ServeConfig(bundle=tiny_bundle, port=port, model="fp32", max_bytes=2_000_000,
                            max_pixels=30_000_000, top_k=3))
    try:
        wait_healthy(url, 120)
        assert _post(f"{url}/predict", _png(40, 30, 128))[0] == 200
        # a pixel bomb: a small PNG whose header announces 36 Mpx -> 413 before decoding
        bomb = _png(6000, 6000)
        assert len(bomb) < 2_000_000
        status, body = _post(f"{url}/predict", bomb)
        assert status == 413 and "over the limit of 30,000,000" in body["error"], body
        # formats outside JPEG/PNG/WebP are not even tried
        buf = io.BytesIO()
        Image.new("L", (20, 20)).save(buf, format="BMP")
        status, body = _post(f"{url}/predict", buf.getvalue())
        assert status == 400 and "JPEG, PNG or WebP" in body["error"]
        # a chunked upload (no Content-Length) over the limit -> 413; a small chunked one works
        assert _chunked(port, [b"\0" * 65536] * 40)[0] == 413
        data = _png(40, 30, 7)
        assert _chunked(port, [data[:50], data[50:]])[0] == 200
        # /healthz answers while a large upload is still in progress: the test holds its last chunk back until
        # /healthz has answered (or, if the loop were blocked, until the deadlock breaker fires and the assert fails)
        big = _png(3000, 3000, 3)
        held = HeldUpload(port, [big[: len(big) // 2], big[len(big) // 2:]])
        answered_while_held = _healthz_once_inside(url, 1, [held])  # asked only once the upload is in the replica
        held.release()
        assert answered_while_held
        status, body = held.result()
        assert status == 200 and len(body["predictions"]) == 3
    finally:
        serve.shutdown()


def _healthz_once_inside(url, n, uploads):
    """Ask /healthz until the replica says `n` /predict requests are inside it (the held uploads reached it, so
    the check cannot pass before they do); whether that answer came while every upload was still held."""
    while True:
        with urllib.request.urlopen(f"{url}/healthz", timeout=120) as r:
            assert r.status == 200
            inside = json.loads(r.read())["in_flight"]
        if inside >= n or any(u.released.is_set() for u in uploads):  # (released: the deadlock breaker fired)
            return inside == n and not any(u.released.is_set() for u in uploads)
        time.sleep(0.05)


def _chunked(port, chunks):
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
    try:
        conn.request("POST", "/predict", body=iter(chunks), encode_chunked=True,
                     headers={"Content-Type": "image/png", "Transfer-Encoding": "chunked"})
        r = conn.getresponse()
        return r.status, json.loads(r.read())
    except (BrokenPipeError, ConnectionResetError):
        return 413, {}  # the server answered and closed before we finished sending: it did not buffer it all
    finally:
        conn.close()


class HeldUpload:
    """A chunked POST /predict whose last chunk the test sends when it calls release() (a slow body stream).

    A deadlock breaker releases it after `hold_s` so a broken server fails the test instead of hanging it; the
    tests assert that what they asked was answered before that (`released` not set).
    """

    def __init__(self, port, chunks, hold_s=90.0):
        self.released = threading.Event()
        self._out = {}
        self._breaker = threading.Timer(hold_s, self.released.set)
        self._breaker.start()

        def body():
            yield from chunks[:-1]
            self.released.wait()
            yield chunks[-1]

        def send():
            self._out["result"] = _chunked(port, body())

        self._thread = threading.Thread(target=send, daemon=True)
        self._thread.start()

    def release(self):
        self._breaker.cancel()
        self.released.set()

    def result(self):
        self._thread.join(180)
        return self._out["result"]


def test_a_replica_admits_a_full_batch_of_slow_uploads(tmp_path, ray_local):
    """Issue 21.17: Serve's default max_ongoing_requests (5) caps every batch at 5 requests, whatever
    max_batch_size says. Eight uploads held open must all be admitted (the replica reads their bodies), and
    /healthz must still be answered beside them."""
    from ray import serve

    from distill.deploy.serve import start

    bundle = make_bundle(tmp_path / "bundle")
    port = _free_port()
    url = start(ServeConfig(bundle=bundle, port=port, model="fp32", max_batch_size=8, top_k=1))
    try:
        wait_healthy(url, 120)
        data = _png(40, 30, 7)
        uploads = [HeldUpload(port, [data[:50], data[50:]]) for _ in range(8)]
        answered_while_held = _healthz_once_inside(url, 8, uploads)  # all 8 admitted, and /healthz beside them
        for u in uploads:
            u.release()
        assert answered_while_held, "/healthz waited for the held uploads: the replica admits fewer than 9"
        assert [u.result()[0] for u in uploads] == [200] * 8
    finally:
        serve.shutdown()


def test_the_model_runs_off_the_event_loop(tiny_bundle):
    """Issue 21.17: a batch runs in a worker thread, so /healthz (and the next uploads) are served while it runs.

    The replica's real model run is held at a gate the test opens only after /healthz has answered; a run on
    the event loop would block it, the deadlock breaker would open the gate, and the assert would fail.
    """
    replica = Replica(str(tiny_bundle), "fp32", 3, 1_000_000, 4, 5.0, 1_000_000)
    gate, entered = threading.Event(), threading.Event()
    breaker = threading.Timer(60, gate.set)  # opens the gate only when the event loop is blocked
    breaker.start()
    real_infer = replica._infer

    def gated_infer(batch):
        entered.set()
        gate.wait()
        return real_infer(batch)

    replica._infer = gated_infer

    x = np.zeros((1, 16, 16), np.float32)
    health, answered_while_running, logits = asyncio.run(
        _healthz_while_held(replica, lambda: replica.run_batch([x, x]), entered, gate, breaker))
    assert health["status"] == "ok" and answered_while_running
    assert len(logits) == 2 and logits[0].shape == (3,)


def test_decoding_runs_off_the_event_loop(tiny_bundle, monkeypatch):
    """/healthz is answered while an upload is being decoded: the real decoder is held at a gate the test opens
    after /healthz answered. (Serve's batch queue needs a replica, so the batch is run here without it.)"""
    import distill.deploy.serve as serve_module

    replica = Replica(str(tiny_bundle), "fp32", 3, 1_000_000, 4, 5.0, 1_000_000)
    replica._batch = lambda x: _first(replica.run_batch([x]))
    gate, entered = threading.Event(), threading.Event()
    breaker = threading.Timer(60, gate.set)  # opens the gate only when the event loop is blocked
    breaker.start()
    real_preprocess = serve_module.preprocess

    def gated_preprocess(*args):
        entered.set()
        gate.wait()
        return real_preprocess(*args)

    monkeypatch.setattr(serve_module, "preprocess", gated_preprocess)

    from starlette.requests import Request

    data = _png(40, 30, 9)

    async def receive():
        return {"type": "http.request", "body": data, "more_body": False}

    request = Request({"type": "http", "method": "POST", "path": "/predict", "query_string": b"",
                       "headers": [(b"content-type", b"image/png")]}, receive)
    health, answered_while_decoding, result = asyncio.run(
        _healthz_while_held(replica, lambda: replica.predict(request), entered, gate, breaker))
    assert health["status"] == "ok" and answered_while_decoding
    assert len(result["predictions"]) == 3


async def _healthz_while_held(replica, start, entered, gate, breaker):
    """Start `start()`, wait until it is held at the gate, ask /healthz, then open the gate: (health, whether
    /healthz answered while the gate was still shut, what `start()` returned)."""
    work = asyncio.ensure_future(start())
    while not entered.is_set():
        await asyncio.sleep(0.01)
    health = await replica.healthz()
    answered_while_held = not gate.is_set()
    breaker.cancel()
    gate.set()
    return health, answered_while_held, await work


async def _first(batch):
    return (await batch)[0]


def test_serve_refuses_a_bundle_that_differs_from_bundle_json(tmp_path):
    """Issue 21.17: every file is checked against bundle.json's SHA-256 before anything is loaded."""
    bundle = make_bundle(tmp_path / "bundle")
    build_app(ServeConfig(bundle=bundle))  # intact: accepted
    classes = bundle / "classes.json"
    original = classes.read_bytes()
    classes.write_text(json.dumps(["a", "b", "x"]))
    for load in (lambda: build_app(ServeConfig(bundle=bundle)),  # the CLI, before Serve starts
                 lambda: Replica(str(bundle), "fp32", 3, 1_000_000, 4, 5.0, 1_000_000)):  # each replica
        with pytest.raises(BundleError, match=r"classes\.json: SHA-256 .* does not match bundle\.json"):
            load()
    classes.write_bytes(original)
    (bundle / "model.onnx").unlink()
    with pytest.raises(BundleError, match=r"model\.onnx is listed in bundle\.json but missing"):
        build_app(ServeConfig(bundle=bundle))
    (bundle / "bundle.json").unlink()
    with pytest.raises(BundleError, match=r"bundle\.json missing"):
        build_app(ServeConfig(bundle=bundle))
