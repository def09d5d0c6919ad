"""Ray Serve endpoint for a bundle: POST /predict (an image) -> top-k classes as JSON; GET /healthz.

Requests are batched with @serve.batch. Bad input (empty body, not an image, too large, wrong content type)
gets a 4xx JSON error and the server keeps serving. Preprocessing is the bundle's eval view, made by the
same replay function that produced the cached training views.

Hardening: the body limit is enforced while the (possibly chunked) upload is read, never after buffering it;
only JPEG/PNG/WebP decoders are tried; the pixel count is checked from the image header before decoding
(a 400 KB PNG can decode to gigabytes), answered with 413; decoding and the model's batch run in worker threads
so the event loop (and /healthz, and the uploads of the next batch) stays responsive during a slow decode or a
large batch. A replica admits `max_ongoing_requests` (default 2 x max_batch_size) requests at once: Serve's
default of 5 would cap every batch at 5. Every file is checked against bundle.json's SHA-256 before anything is
loaded (deploy/bundle_files.py), and every replica loads the version the bundle link pointed to when `distill
serve` started, so a deploy during serving never mixes two bundles; that version is pinned (`pin`) by the serve
process and its replicas, so no deploy removes it while it is served. Each replica runs one blank image end to end
before it reports ready, so no client pays for the imports and the model's first run.

No `from __future__ import annotations` here: with postponed annotations Serve's class-based FastAPI ingress
cannot strip `self` from the route signatures and every request gets a 422.
"""


import asyncio
import io
import json
import logging
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import numpy as np
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from PIL import Image
from ray import serve

from distill.core.errors import InputError
from distill.deploy.bundle_files import pin
from distill.deploy.config import ServeConfig

log = logging.getLogger(__name__)
ACCEPTED_TYPES = ("image/jpeg", "image/png", "image/webp", "application/octet-stream")
PIL_FORMATS = ["JPEG", "PNG", "WEBP"]


class ImageTooLarge(InputError):
    """More pixels than the configured limit (checked from the header, before decoding)."""


class BodyTooLarge(InputError):
    """The upload grew past max_bytes while it was being read."""


async def read_limited(chunks: AsyncIterator[bytes], max_bytes: int) -> bytes:
    """Collect a request body, stopping as soon as it exceeds max_bytes (chunked uploads have no length)."""
    parts, total = [], 0
    async for chunk in chunks:
        total += len(chunk)
        if total > max_bytes:
            raise BodyTooLarge(f"upload is over the limit of {max_bytes} bytes")
        parts.append(chunk)
    return b"".join(parts)

api = FastAPI(title="distill classifier")


def preprocess(data: bytes, prep: dict, max_pixels: int) -> np.ndarray:
    """Encoded image -> (C, S, S) float32, exactly like the cache's view 0 for a student.

    Raises ImageTooLarge before any pixel is decoded when the header announces more than max_pixels.
    """
    from distill.images.views import eval_view, image_to_tensor, match_channels, normalize, replay_view

    with Image.open(io.BytesIO(data), formats=PIL_FORMATS) as im:
        if im.width * im.height > max_pixels:
            raise ImageTooLarge(f"image is {im.width}x{im.height} = {im.width * im.height:,} pixels, over the "
                                f"limit of {max_pixels:,}; send a smaller image")
        im.load()
        # a student of a grey cache with 3 input channels: grey decoded, then replicated (as in training)
        pixels = image_to_tensor(im, int(prep.get("source_channels") or prep["channels"]))
    view = eval_view(pixels.shape[1], pixels.shape[2], float(prep["crop_pct"]))
    crop = match_channels(replay_view(pixels, view, int(prep["input_size"]), prep["interpolation"]),
                          int(prep["channels"]))
    return normalize(crop, tuple(prep["mean"]), tuple(prep["std"])).numpy().astype(np.float32)


def warm_up(session: Any, prep: dict, max_pixels: int) -> np.ndarray:
    """Run one blank image through decode, preprocessing and the model; returns its logits.

    The first request would otherwise pay for importing torch/torchvision (the replay functions) and for
    onnxruntime's first run: tens of seconds on a busy node, long enough for clients to time out.
    """
    size, channels = int(prep["input_size"]), int(prep["channels"])
    buf = io.BytesIO()
    Image.new("L" if channels == 1 else "RGB", (size, size)).save(buf, "PNG")
    x = preprocess(buf.getvalue(), prep, max_pixels)
    return session.run(None, {"input": x[None]})[0]


def _error(status: int, message: str) -> JSONResponse:
    return JSONResponse(status_code=status, content={"error": message, "status": status})


class Replica:
    """One Serve replica's state and routes (plain class: `Classifier` below is its Serve deployment)."""

    def __init__(self, bundle: str, model: str, top_k: int, max_bytes: int, max_batch_size: int,
                 batch_wait_ms: float, max_pixels: int = 40_000_000) -> None:
        import onnxruntime as ort

        root, _ = pin(Path(bundle))  # nothing is loaded from a bundle whose files differ from bundle.json; pinned
        name = "model.int8.onnx" if model == "int8" and (root / "model.int8.onnx").exists() else "model.onnx"
        self.session = ort.InferenceSession(str(root / name), providers=["CPUExecutionProvider"])
        self.prep = json.loads((root / "preprocessing.json").read_text())
        self.classes = json.loads((root / "classes.json").read_text())
        self.model_file, self.top_k, self.max_bytes, self.max_pixels = name, top_k, max_bytes, max_pixels
        batcher: Any = self._batch  # serve.batch's wrapper carries its setters (not in its type)
        batcher.set_max_batch_size(max_batch_size)
        batcher.set_batch_wait_timeout_s(batch_wait_ms / 1000)
        self.in_flight = 0  # /predict requests inside this replica now (uploading, decoding, batched): /healthz
        warm_up(self.session, self.prep, max_pixels)  # the replica reports ready only once a request is cheap

    @serve.batch(max_batch_size=32, batch_wait_timeout_s=0.005)
    async def _batch(self, inputs: list[np.ndarray]) -> list[np.ndarray]:
        return await self.run_batch(inputs)

    async def run_batch(self, inputs: list[np.ndarray]) -> list[np.ndarray]:
        """The model on one batch, in a worker thread: a batch of 32 takes milliseconds to seconds, and the
        event loop must keep reading the next uploads and answering /healthz meanwhile."""
        logits = await asyncio.to_thread(self._infer, np.stack(inputs))
        return list(logits)

    def _infer(self, batch: np.ndarray) -> np.ndarray:
        return self.session.run(None, {"input": batch})[0]

    @api.get("/healthz")
    async def healthz(self) -> dict[str, Any]:
        """Liveness, and the /predict requests this replica holds now (`in_flight`, for load balancers)."""
        return {"status": "ok", "model": self.model_file, "classes": len(self.classes), "in_flight": self.in_flight}

    @api.post("/predict")
    async def predict(self, request: Request) -> Any:
        self.in_flight += 1  # (one event loop: no lock needed)
        try:
            return await self._predict(request)
        finally:
            self.in_flight -= 1

    async def _predict(self, request: Request) -> Any:
        ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
        if ctype not in ACCEPTED_TYPES:
            return _error(415, f"content type '{ctype or 'none'}' not accepted; send the image bytes with one of "
                               f"{', '.join(ACCEPTED_TYPES)}")
        declared = request.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_bytes:
            return _error(413, f"upload of {declared} bytes is over the limit of {self.max_bytes} bytes")
        try:
            body = await read_limited(request.stream(), self.max_bytes)
        except BodyTooLarge as exc:
            return _error(413, str(exc))
        if not body:
            return _error(400, "empty body: POST the image file bytes")
        try:
            x = await asyncio.to_thread(preprocess, body, self.prep, self.max_pixels)
        except (ImageTooLarge, Image.DecompressionBombError) as exc:
            return _error(413, str(exc))
        except (OSError, ValueError, SyntaxError, TypeError, EOFError) as exc:
            return _error(400, f"not a decodable image ({exc.__class__.__name__}); send a JPEG, PNG or WebP file")
        logits = (await self._batch(x)).astype(np.float64)
        probs = np.exp(logits - logits.max())
        probs /= probs.sum()
        top = np.argsort(-probs)[: self.top_k]
        return {"model": self.model_file,
                "predictions": [{"class_id": int(i), "class": self.classes[int(i)], "probability": float(probs[i])}
                                for i in top]}


Classifier = serve.deployment(name="Classifier")(serve.ingress(api)(Replica))


def max_ongoing(cfg: ServeConfig) -> int:
    """Requests a replica admits at once: enough to fill one batch while the previous one runs."""
    return cfg.max_ongoing_requests or 2 * cfg.max_batch_size


def build_app(cfg: ServeConfig) -> Any:
    """Verify the bundle here (a clear error at the CLI) and pin its current version for every replica."""
    if not Path(cfg.bundle).exists():
        raise FileNotFoundError(f"{cfg.bundle} not found: `bundle` must be the out_dir of `distill deploy`")
    version, _ = pin(Path(cfg.bundle))  # held while `distill serve` runs: no deploy removes it
    for needed in ("model.onnx", "preprocessing.json", "classes.json"):
        if not (version / needed).exists():
            raise FileNotFoundError(f"{version / needed} missing: `bundle` must be the out_dir of `distill deploy`")
    return Classifier.options(num_replicas=cfg.replicas, max_ongoing_requests=max_ongoing(cfg),
                              ray_actor_options={"num_cpus": cfg.cpus_per_replica}).bind(
        str(version), cfg.model, cfg.top_k, cfg.max_bytes, cfg.max_batch_size, cfg.batch_wait_ms, cfg.max_pixels)


def start(cfg: ServeConfig, blocking: bool = False) -> str:
    """Start Serve on cfg.host:cfg.port (loopback by default) and deploy the app; returns the base URL."""
    serve.start(http_options={"host": cfg.host, "port": cfg.port})
    serve.run(build_app(cfg), name="distill", route_prefix="/", blocking=blocking)
    return f"http://{cfg.host}:{cfg.port}"
