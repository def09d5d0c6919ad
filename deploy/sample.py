"""A sample image for the bundle: one real held-out image, so the printed `curl` works as printed.

The first image of the training run's first test shard (else its first val shard), copied byte for byte (the
format it has in the shard: PNG, JPEG or WebP) to `<bundle>/sample.<ext>`, listed in bundle.json with its class.
"""

from __future__ import annotations

import logging
import tarfile
from dataclasses import dataclass

from distill.images.decode import SampleError, image_file
from distill.images.shards import ShardReader, expand_shard_patterns

log = logging.getLogger(__name__)
CONTENT_TYPES = {"png": "image/png", "jpg": "image/jpeg", "jpeg": "image/jpeg", "webp": "image/webp"}


@dataclass(frozen=True)
class Sample:
    name: str  # file name in the bundle: sample.<ext>
    data: bytes
    content_type: str
    label: str | None  # its class name (from .cls), None when the shard has no label
    source: str  # <shard>#<key>


def pick_sample(train_cfg: dict, classes: list[str]) -> Sample | None:
    """The first image of the first test shard, else val shard; None when there is neither (or it cannot be read:
    the bundle does not depend on it)."""
    try:
        return _first_image(train_cfg.get("data", {}), classes)
    except (OSError, tarfile.TarError, EOFError) as exc:
        log.warning("no sample image for the bundle: %s", exc)
        return None


def _first_image(data_cfg: dict, classes: list[str]) -> Sample | None:
    for split in ("test_shards", "val_shards"):
        patterns = data_cfg.get(split) or []
        if not patterns:
            continue
        try:
            shards = expand_shard_patterns(patterns)
        except FileNotFoundError:
            continue
        for shard in shards[:1]:
            for raw in ShardReader(shard):
                try:
                    ext, data = image_file(raw)
                except SampleError:
                    continue
                label = _label(raw.files.get("cls"), classes)
                ext = ext.lower()
                return Sample(f"sample.{ext}", data, CONTENT_TYPES.get(ext, "application/octet-stream"), label,
                              f"{shard}#{raw.key}")
    return None


def _label(cls: bytes | None, classes: list[str]) -> str | None:
    try:
        index = int(cls.decode().strip()) if cls is not None else None
    except (UnicodeDecodeError, ValueError):
        return None
    if index is None:
        return None
    return classes[index] if 0 <= index < len(classes) else str(index)
