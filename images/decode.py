"""Decode + view replay: ONE implementation with two backends, shared by the cache pass and the training loader.

- CPU backend: Pillow decodes, ``views.replay_view`` (the reference) crops/resizes/flips. Run it in worker
  processes (``decode_pool.DecodePool``), not threads: the GIL caps threads at about 4 cores.
- GPU backend: nvjpeg decodes JPEGs in batches (``torchvision.io.decode_jpeg(list, device="cuda")``); every
  sample nvjpeg cannot take (PNG, WebP, CMYK/YCCK JPEGs, anything it refuses) falls back to the CPU decoder,
  one sample at a time. ``replay_views_tensor`` then cuts all V views on the device.

Both backends use the same crop boxes and flips (``sample_views``); pixels agree up to decoder and resize
rounding. ``replay_views_tensor`` resizes in float and rounds, ``replay_view`` uses torchvision's uint8 path:
on the same decoded image they differ by at most ``REPLAY_TOLERANCE`` = 2 grey levels (bilinear: at most 1;
on average 0.01 (224 px) to 0.1 (96 px) levels per pixel; pinned by tests/unit/test_decode.py). nvjpeg and
libjpeg may differ by a few levels per pixel on top of that (IDCT / chroma upsampling rounding).

Every per-sample problem (undecodable bytes, a format we do not accept, a decompression bomb, a bad .cls)
raises ``SampleError``; callers record it and skip the sample. Nothing here may kill a shard.
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from dataclasses import dataclass
from functools import partial

import torch
from PIL import Image

from distill.core.errors import InputError
from distill.images.shards import IMAGE_EXTS, RawSample
from distill.images.views import ViewParams, ViewPolicy, image_to_tensor, replay_view, sample_views

ACCEPTED_FORMATS = ("JPEG", "PNG", "WEBP")  # what IMAGE_EXTS (.jpg .jpeg .png .webp) may hold; nothing else
DEFAULT_MAX_PIXELS = 40_000_000
REPLAY_TOLERANCE = 2  # max |difference| in uint8 levels between the two replay paths on the same image
_NVJPEG_MODES = ("RGB", "L")  # CMYK / YCCK / P JPEGs go to Pillow


class SampleError(InputError):
    """This sample cannot be used; the message says why. Recorded in the shard's error list, then skipped."""


@dataclass
class DecodedSample:
    key: str
    label: int | None
    hw: tuple[int, int]
    views: list[ViewParams]
    pixels: torch.Tensor  # (V, C, S, S) uint8, on the CPU or on the decoding device


@dataclass(frozen=True)
class DecodeSpec:
    """What turns raw bytes into view pixels (picklable: sent to decode processes)."""

    channels: int
    input_size: int
    interpolation: str
    policy: ViewPolicy
    num_classes: int | None = None  # labels outside [0, num_classes) are bad samples
    max_pixels: int = DEFAULT_MAX_PIXELS


def image_file(raw: RawSample) -> tuple[str, bytes]:
    ext = next((e for e in IMAGE_EXTS if e in raw.files), None)
    if ext is None:
        raise SampleError(f"no image file (expected one of .{', .'.join(IMAGE_EXTS)}; "
                          f"found {sorted(raw.files) or 'none'})")
    return ext, raw.files[ext]


def open_image(data: bytes, max_pixels: int, ext: str = "image") -> Image.Image:
    """Read the header only; refuse other formats and images above max_pixels BEFORE any pixel is decoded."""
    try:
        im = Image.open(io.BytesIO(data), formats=ACCEPTED_FORMATS)
    except Exception as exc:  # Pillow raises many types (OSError, SyntaxError, TypeError, ...) on bad headers
        raise SampleError(f"cannot decode .{ext}: cannot read the image header (JPEG, PNG and WebP are accepted): "
                          f"{exc.__class__.__name__}: {exc}") from None
    w, h = im.size
    if w * h > max_pixels:
        im.close()
        raise SampleError(f"cannot decode .{ext}: image is {w}x{h} = {w * h:,} pixels, above "
                          f"max_image_pixels={max_pixels:,} (decompression-bomb guard; raise max_image_pixels "
                          "if such images are real)")
    return im


def decode_cpu(data: bytes, channels: int, max_pixels: int, ext: str = "image") -> torch.Tensor:
    """Bytes -> uint8 CHW tensor with the teacher's channel count (Pillow)."""
    im = open_image(data, max_pixels, ext)
    try:
        with im:
            im.load()
            return image_to_tensor(im, channels)
    except SampleError:
        raise
    except Exception as exc:  # truncated data, bad tables, Pillow TypeErrors on malformed files: skip and record
        raise SampleError(f"cannot decode .{ext}: {exc.__class__.__name__}: {exc}") from None


def parse_label(raw: RawSample, num_classes: int | None) -> int | None:
    """The .cls as an int in [0, num_classes), or None without a .cls; anything else is a bad sample."""
    if "cls" not in raw.files:
        return None
    text = raw.files["cls"][:40]
    try:
        label = int(raw.files["cls"].decode().strip())
    except (UnicodeDecodeError, ValueError):
        raise SampleError(f"bad .cls (not an integer): {text!r}") from None
    if label < 0 or (num_classes is not None and label >= num_classes):
        raise SampleError(f"bad .cls {label}: outside [0, {num_classes}) (the teacher's classes)")
    return label


def decode_sample_cpu(raw: RawSample, spec: DecodeSpec) -> DecodedSample:
    """CPU backend, one sample: decode, draw views, replay them (the reference path)."""
    label = parse_label(raw, spec.num_classes)
    ext, data = image_file(raw)
    pixels = decode_cpu(data, spec.channels, spec.max_pixels, ext)
    _, h, w = pixels.shape
    views = sample_views(raw.key, h, w, spec.policy)
    out = torch.stack([replay_view(pixels, v, spec.input_size, spec.interpolation) for v in views])
    return DecodedSample(raw.key, label, (h, w), views, out)


def try_decode_cpu(raw: RawSample, spec: DecodeSpec) -> DecodedSample | str:
    """`decode_sample_cpu`, with any failure turned into the reason string (worker processes return this)."""
    try:
        return decode_sample_cpu(raw, spec)
    except SampleError as exc:
        return str(exc)
    except Exception as exc:  # a per-sample failure must never kill the shard (issue 10, item 5)
        return f"cannot use this sample: {exc.__class__.__name__}: {exc}"


_TORCH_MODE = {"bilinear": "bilinear", "bicubic": "bicubic", "nearest": "nearest"}


def replay_views_tensor(image: torch.Tensor, views: Sequence[ViewParams], size: int,
                        interpolation: str = "bilinear") -> torch.Tensor:
    """GPU backend of `replay_view`: (uint8 CHW on any device, V views) -> (V, C, S, S) uint8 on that device.

    Same crop boxes and flips; resize in float32 with antialias (as torchvision does on CUDA), then round.
    """
    _, h, w = image.shape
    out = torch.empty((len(views), image.shape[0], size, size), dtype=torch.uint8, device=image.device)
    for i, v in enumerate(views):
        if v.top < 0 or v.left < 0 or v.top + v.height > h or v.left + v.width > w:
            raise ValueError(f"view {v} does not fit an image of {h}x{w}; the image changed since caching")
        crop = image[None, :, v.top:v.top + v.height, v.left:v.left + v.width].float()
        r = _resize_like_uint8(crop, size, interpolation)
        out[i] = r.flip(-1) if v.flip else r
    return out


def _resize_like_uint8(crop: torch.Tensor, size: int, interpolation: str) -> torch.Tensor:
    """Float resize that rounds like torchvision's uint8 CPU kernel: bicubic there rounds and clamps between its
    horizontal and vertical passes (one float pass differs by up to 11 levels; two passes by at most 2)."""
    mode = _TORCH_MODE[interpolation]
    if mode == "nearest":
        return torch.nn.functional.interpolate(crop, size=(size, size), mode=mode).to(torch.uint8)[0]
    resize = partial(torch.nn.functional.interpolate, mode=mode, antialias=True, align_corners=False)
    if mode == "bicubic":
        crop = resize(crop, size=(crop.shape[-2], size)).round_().clamp_(0, 255)
    r = resize(crop, size=(size, size))
    return r.round_().clamp_(0, 255).to(torch.uint8)[0]


def nvjpeg_candidate(im: Image.Image) -> bool:
    """A JPEG nvjpeg decodes to the same colours as Pillow: baseline/progressive RGB or greyscale."""
    return im.format == "JPEG" and im.mode in _NVJPEG_MODES


def decode_batch_gpu(raws: Sequence[RawSample], spec: DecodeSpec, device: torch.device
                     ) -> list[DecodedSample | str]:
    """GPU backend, one batch: nvjpeg for the JPEGs it takes, Pillow for the rest; views replayed on `device`."""
    from torchvision.io import ImageReadMode, decode_jpeg

    results: list[DecodedSample | str | None] = [None] * len(raws)
    labels: list[int | None] = [None] * len(raws)
    gpu_idx: list[int] = []
    gpu_data: list[torch.Tensor] = []
    for i, raw in enumerate(raws):
        try:
            labels[i] = parse_label(raw, spec.num_classes)
            ext, data = image_file(raw)
            with open_image(data, spec.max_pixels, ext) as im:
                use_gpu = nvjpeg_candidate(im)
        except SampleError as exc:
            results[i] = str(exc)
            continue
        if use_gpu:
            gpu_idx.append(i)
            gpu_data.append(torch.frombuffer(bytearray(data), dtype=torch.uint8))
        else:
            results[i] = _cpu_then_device(raw, spec, device)
    mode = ImageReadMode.GRAY if spec.channels == 1 else ImageReadMode.RGB
    images: list[torch.Tensor | None]
    try:
        images = list(decode_jpeg(gpu_data, mode=mode, device=device)) if gpu_data else []
    except RuntimeError:  # one refused file fails the whole batch call: retry one by one, then Pillow
        images = [_one_nvjpeg(d, mode, device) for d in gpu_data]
    for i, img in zip(gpu_idx, images, strict=True):
        raw = raws[i]
        if img is None:
            results[i] = _cpu_then_device(raw, spec, device)
            continue
        _, h, w = img.shape
        views = sample_views(raw.key, h, w, spec.policy)
        pixels = replay_views_tensor(img, views, spec.input_size, spec.interpolation)
        results[i] = DecodedSample(raw.key, labels[i], (h, w), views, pixels)
    return [r if r is not None else "internal: not decoded" for r in results]


def _one_nvjpeg(data: torch.Tensor, mode: object, device: torch.device) -> torch.Tensor | None:
    from torchvision.io import decode_jpeg

    try:
        return decode_jpeg(data, mode=mode, device=device)
    except RuntimeError:
        return None


def _cpu_then_device(raw: RawSample, spec: DecodeSpec, device: torch.device) -> DecodedSample | str:
    """Per-sample fallback: Pillow decode on the host, then the same device replay as the nvjpeg path."""
    try:
        label = parse_label(raw, spec.num_classes)
        ext, data = image_file(raw)
        img = decode_cpu(data, spec.channels, spec.max_pixels, ext).to(device, non_blocking=True)
    except SampleError as exc:
        return str(exc)
    except Exception as exc:  # never let one sample kill the batch
        return f"cannot use this sample: {exc.__class__.__name__}: {exc}"
    _, h, w = img.shape
    views = sample_views(raw.key, h, w, spec.policy)
    return DecodedSample(raw.key, label, (h, w), views,
                         replay_views_tensor(img, views, spec.input_size, spec.interpolation))
