"""Ray Serve endpoint hardening over real HTTP: pixel bombs, formats, chunked uploads, a responsive /healthz.

The bundle is a tiny real ONNX model (no training needed: these tests are about the HTTP edge, not accuracy).
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

import pytest
import torch
from helpers import wait_healthy
from PIL import Image

from deploy.config import ServeConfig
from deploy.serve import BodyTooLarge, read_limited

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def tiny_bundle(tmp_path_factory):
    root = tmp_path_factory.mktemp("bundle")
    model = torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3), torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(),
                                torch.nn.Linear(4, 3)).eval()
    torch.onnx.export(model, (torch.zeros(1, 1, 16, 16),), str(root / "model.onnx"), input_names=["input"],
                      output_names=["logits"], dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}},
                      opset_version=17, dynamo=False)
    (root / "preprocessing.json").write_text(json.dumps({"input_size": 16, "crop_pct": 0.875, "mean": [0.5],
                                                         "std": [0.25], "interpolation": "bilinear",
                                                         "channels": 1}))
    (root / "classes.json").write_text(json.dumps(["a", "b", "c"]))
    return root


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

    from deploy.serve import start

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
        # /healthz answers while a slow (large but allowed) image is being decoded
        done = {}
        slow = threading.Thread(target=lambda: done.setdefault("predict", (_post(f"{url}/predict",
                                                                               _png(4000, 4000, 3)),
                                                                         time.monotonic())))
        slow.start()
        time.sleep(0.3)
        asked_at = time.monotonic()
        with urllib.request.urlopen(f"{url}/healthz", timeout=60) as r:
            assert r.status == 200
        health_at = time.monotonic()
        slow.join(180)
        (status, _), predict_at = done["predict"]
        # a blocked event loop would answer /healthz only when the decode ends, i.e. just before the predict
        # itself: its wait would then be most of the predict's remaining time, not a small part of it
        assert status == 200 and health_at < predict_at
        assert health_at - asked_at < 0.5 * (predict_at - asked_at), (health_at - asked_at, predict_at - asked_at)
    finally:
        serve.shutdown()


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
