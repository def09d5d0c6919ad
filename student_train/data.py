"""Stream WebDataset shards side by side with their cache files, joined by __key__, as training batches.

Sharding: each epoch the shard order is shuffled (seeded by epoch), then shard i goes to global loader slot
i mod (ranks x loader workers). Every slot's sample count is known from the manifest, so every rank computes
the same number of steps per epoch; a rank that runs out early pads with zero-weight batches (they keep
collectives in step and contribute nothing). No sample is dropped or repeated within an epoch.
"""

from __future__ import annotations

import functools
import math
import random
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import IterableDataset, get_worker_info

from distill.images.decode import DEFAULT_MAX_PIXELS, SampleError, decode_cpu, image_file, parse_label
from distill.images.preprocessing import Preprocessing
from distill.images.shards import (
    IMAGE_EXTS,
    RawSample,
    ShardIdentity,
    ShardPath,
    ShardReader,
    expand_shard_patterns,
    file_sha256,
    open_shard,
    shard_stem,
)
from distill.images.views import match_channels, normalize, replay_view
from distill.teacher_cache.contract import CacheError, CacheReader, ShardArrays


class DataJoinError(CacheError):
    """A shard and its cache file do not line up; names the shard and the key."""


@dataclass(frozen=True)
class ShardPair:
    stem: str
    tar: ShardPath
    rows: int
    labelled: int | None = None  # rows with a label (None = not counted)
    unlabelled: bool = False  # from the unlabelled pool: labels are ignored even where a .cls exists


def resolve_split(patterns: list[str], reader: CacheReader, split: str) -> list[ShardPair]:
    """Check every shard of a split against the cache before training: cached, unchanged since, same teacher."""
    pairs: list[ShardPair] = []
    problems: list[str] = []
    for path in expand_shard_patterns(patterns):
        stem = shard_stem(path)
        entry = reader.manifest.shards.get(stem)
        if entry is None:
            problems.append(f"{path}: no cache file in {reader.directory} (run `distill cache` over this shard)")
            continue
        ident = ShardIdentity.stat(path)  # size+mtime+ctime+inode; any moved (or unknown): compare content
        if not ident.same_cheap(entry.identity()) and (
                ident.size != entry.size or file_sha256(path) != entry.content_sha256):
            problems.append(f"{path}: changed since it was cached (keys may not match); re-run `distill cache`")
            continue
        try:
            reader.check(stem)  # the cache file's checksum, once per file per run, before anything reads it
        except CacheError as exc:
            problems.append(str(exc))
            continue
        pairs.append(ShardPair(stem, path, entry.rows))
    if problems:
        raise DataJoinError(f"{split} shards do not match the cache:\n  " + "\n  ".join(problems))
    for p in pairs[:1]:
        reader.meta(p.stem)  # schema version + metadata check (raises naming the file)
    return pairs


def assign_shards(pairs: list[ShardPair], epoch: int, seed: int, slots: int, shuffle: bool) -> list[list[ShardPair]]:
    order = list(pairs)
    if shuffle:
        random.Random(seed * 100_003 + epoch).shuffle(order)
    return [order[s::slots] for s in range(slots)]


def shard_groups(slot: list[ShardPair], interleave: int) -> list[list[ShardPair]]:
    """A loader slot's shards, `interleave` at a time: the rows of a group are read mixed (see `mixed`)."""
    k = max(1, interleave)
    return [slot[i:i + k] for i in range(0, len(slot), k)]


def mixed(streams: list[Iterator[dict]], rng: random.Random) -> Iterator[dict]:
    """The rows of several shards, each next row from a random one of those not yet exhausted (seeded, so an
    epoch replays exactly). Beside an unlabelled pool this spreads the labelled rows over the epoch's batches
    instead of one block of batches per labelled shard."""
    live = list(streams)
    while live:
        i = rng.randrange(len(live)) if len(live) > 1 else 0  # one stream: the rng is left as it was
        try:
            yield next(live[i])
        except StopIteration:
            live.pop(i)


def steps_per_epoch(pairs: list[ShardPair], epoch: int, seed: int, world: int, loader_workers: int,
                    batch_size: int, shuffle: bool, interleave: int = 1) -> int:
    """Batches of the busiest rank this epoch (every rank computes the same number): one partial batch per
    group of `interleave` shards read together."""
    nw = max(1, loader_workers)
    slots = assign_shards(pairs, epoch, seed, world * nw, shuffle)
    per_rank = [sum(math.ceil(sum(p.rows for p in g) / batch_size)
                    for w in range(nw) for g in shard_groups(slots[r * nw + w], interleave))
                for r in range(world)]
    return max(per_rank) if per_rank else 0


def count_samples(path: ShardPath) -> tuple[int, int]:
    """(samples with an image, samples with a .cls) of a shard without a cache: headers only (seeks over data)."""
    import tarfile

    from distill.images.shards import split_member_name

    images: set[str] = set()
    labels: set[str] = set()
    try:
        with open_shard(path, seekable=True) as raw, tarfile.open(fileobj=raw) as tar:
            for member in tar:
                key, ext = split_member_name(member.name)
                if ext in IMAGE_EXTS:
                    images.add(key)
                elif ext == "cls":
                    labels.add(key)
    except (tarfile.TarError, OSError, EOFError) as exc:
        raise DataJoinError(f"{path}: corrupt or truncated tar ({exc}); re-create this shard") from exc
    return len(images), len(images & labels)


def _cache_dir_here(cache_dir: Path, location: str | None) -> Path:
    """The cache directory on this node: the planner's (a shared filesystem, or the driver's mirror), else a mirror
    of the same manifest version made here, checksums checked: once per process and version, not per shard."""
    return _mirrored_here(cache_dir, location)


@functools.cache
def _mirrored_here(cache_dir: Path, location: str | None) -> Path:
    from distill.teacher_cache.contract import cache_dir_here

    return cache_dir_here(cache_dir, location)


@dataclass
class StreamSpec:
    """Everything a loader worker needs (picklable). cache_dir None = plain supervised data (no teacher)."""

    cache_dir: Path | None
    pairs: list[ShardPair]
    student: Preprocessing  # size / mean / std / interpolation / channels of the student input
    teacher: Preprocessing | None  # set for online KD: the live teacher's own input
    num_classes: int
    views: int  # cycle through views 0..views-1
    train: bool
    batch_size: int
    shuffle_buffer: int
    seed: int
    epoch: int
    rank: int
    world: int
    loader_workers: int
    crop_scale: tuple[float, float] = (0.35, 1.0)  # live random crops when there is no cache
    max_image_pixels: int = DEFAULT_MAX_PIXELS
    crop_ratio: tuple[float, float] = (3 / 4, 4 / 3)
    flip: bool = True
    rotate: float = 0.0  # live rotations of ±rotate degrees when there is no cache
    cache_location: str | None = None  # the cache's fingerprint directory in its store (local path or s3://):
    # a worker that does not see cache_dir mirrors the same version (cache_dir's name) from there
    passes: int = 1  # passes over `pairs` in this epoch, each its own shard order and view (see pass_epochs)
    interleave: int = 1  # training reads this many shards of its slot at a time, rows mixed (see `mixed`)


def pass_epochs(epoch: int, passes: int) -> range:
    """The data epochs (shard order, shuffle, view) of training epoch `epoch` made of `passes` passes: a twin
    that makes 10 passes per epoch sees its rows in the orders and views of 10 plain epochs."""
    return range(epoch * passes, (epoch + 1) * passes)


def rotate_live(pixels: torch.Tensor, key: str, seed: int, degrees: float) -> torch.Tensor:
    """A rotation of ±degrees about the centre, drawn from (seed, key) like the views (reproducible), zero fill."""
    import hashlib

    from torchvision.transforms.v2 import InterpolationMode
    from torchvision.transforms.v2.functional import rotate

    h = int.from_bytes(hashlib.blake2b(f"{seed}/{key}/rotate".encode(), digest_size=8).digest(), "little")
    angle = (h / 2**64 * 2 - 1) * degrees
    return rotate(pixels, angle, interpolation=InterpolationMode.BILINEAR, fill=0)


def view_for(key: str, epoch: int, views: int, train: bool) -> int:
    """Eval always uses view 0; training cycles through the cached views, offset per key."""
    if not train or views <= 1:
        return 0
    offset = int.from_bytes(key.encode()[-4:].rjust(4, b"\0"), "little") % views
    return (epoch + offset) % views


class JoinedStream(IterableDataset):
    """Yields ready batches (dicts of tensors) for this rank and loader worker."""

    def __init__(self, spec: StreamSpec) -> None:
        super().__init__()
        self.spec = spec

    def _my_shards(self) -> list[ShardPair]:
        s = self.spec
        info = get_worker_info()
        wid, nw = (info.id, info.num_workers) if info is not None else (0, 1)
        slots = assign_shards(s.pairs, s.epoch, s.seed, s.world * max(1, s.loader_workers), s.train)
        return slots[s.rank * max(1, s.loader_workers) + wid] if nw == max(1, s.loader_workers) else []

    def _uncached(self, pair: ShardPair) -> Iterator[dict]:
        """No cache (teacher pre-training, baselines): labels from .cls, views drawn live, same replay code."""
        from distill.images.views import ViewPolicy, sample_views

        s = self.spec
        policy = ViewPolicy(num_views=2, seed=s.seed * 1000 + s.epoch, crop_pct=s.student.crop_pct,
                            scale=s.crop_scale, ratio=s.crop_ratio, flip=s.flip)
        for raw in ShardReader(pair.tar):
            try:
                _, data = image_file(raw)
                pixels = decode_cpu(data, s.student.decode_channels, s.max_image_pixels)
                label = parse_label(raw, s.num_classes)
            except SampleError:
                continue  # the same samples `distill cache` would skip and record
            label = -1 if label is None else label
            view = sample_views(raw.key, pixels.shape[1], pixels.shape[2], policy)[1 if s.train else 0]
            zeros = np.zeros(1, dtype=np.float32)
            out = match_channels(replay_view(pixels, view, s.student.input_size, s.student.interpolation),
                                 s.student.channels)
            if s.train and s.rotate > 0:
                out = rotate_live(out, raw.key, policy.seed, s.rotate)  # the views' (seed, epoch) draw
            yield {"pixels": out, "label": label,
                   "ids": np.zeros(1, dtype=np.int64), "vals": zeros, "tail": np.full(1, -np.inf, np.float32),
                   "teacher_top1_view0": -1}

    def _samples(self, pair: ShardPair) -> Iterator[dict]:
        s = self.spec
        if s.cache_dir is None:
            yield from self._uncached(pair)
            return
        cache_dir = _cache_dir_here(s.cache_dir, s.cache_location)
        reader = CacheReader.shared(cache_dir)  # the manifest once per process, not once per shard
        arrays = reader.arrays(pair.stem)
        index = {k: i for i, k in enumerate(arrays.keys)}
        skipped = {e["key"] for e in reader.errors(pair.stem)}
        seen = 0
        for raw in ShardReader(pair.tar):
            i = index.get(raw.key)
            if i is None:
                if raw.key in skipped:
                    continue
                raise DataJoinError(f"{pair.tar}: key '{raw.key}' is not in its cache file; re-run `distill cache`")
            if i != seen:
                raise DataJoinError(f"{pair.tar}: key '{raw.key}' out of order against the cache (row {i}, "
                                    f"expected {seen}); re-run `distill cache`")
            seen += 1
            yield self._sample(pair, raw.files, arrays, i)
        if seen != len(arrays.keys):
            raise DataJoinError(f"{pair.tar}: {len(arrays.keys) - seen} cached keys missing from the shard "
                                f"(first: '{arrays.keys[seen]}'); re-run `distill cache`")

    def _sample(self, pair: ShardPair, files: dict[str, bytes], a: ShardArrays, i: int) -> dict:
        s = self.spec
        try:  # the decoder the cache pass used (same formats, same pixel limit)
            _, data = image_file(RawSample(a.keys[i], files))
            pixels = decode_cpu(data, s.student.decode_channels, s.max_image_pixels)
        except SampleError as exc:
            raise DataJoinError(f"{pair.tar}: image '{a.keys[i]}' was cached but cannot be decoded now ({exc}); "
                                "re-run `distill cache`") from None
        if (pixels.shape[1], pixels.shape[2]) != tuple(int(x) for x in a.image_hw[i]):
            raise DataJoinError(f"{pair.tar}: image '{a.keys[i]}' is {tuple(pixels.shape[1:])}, cached as "
                                f"{tuple(a.image_hw[i])}; re-run `distill cache`")
        v = view_for(a.keys[i], s.epoch, s.views, s.train)
        view = a.view(i, v)
        student = match_channels(replay_view(pixels, view, s.student.input_size, s.student.interpolation),
                                 s.student.channels)  # a grey cache's pixels, replicated for a 3-channel student
        out = {"pixels": student,
               "label": -1 if pair.unlabelled else int(a.labels[i]), "ids": a.topk_ids[i, v],
               "vals": a.topk_logits[i, v],
               "tail": a.tail_lse[i, v], "teacher_top1_view0": int(a.topk_ids[i, 0, 0])}
        if s.teacher is not None:
            out["teacher_pixels"] = replay_view(pixels, view, s.teacher.input_size, s.teacher.interpolation)
        if a.features is not None:  # schema v2 cache with teacher features (feature KD)
            out["teacher_feat"] = a.features[i, v]
        return out

    def _collate(self, items: list[dict]) -> dict[str, torch.Tensor]:
        s = self.spec
        ids = torch.from_numpy(np.stack([it["ids"] for it in items]).astype(np.int64))
        if s.cache_dir is None:
            ids = torch.zeros(len(items), 1, dtype=torch.int64)
        batch = {
            "pixels": normalize(torch.stack([it["pixels"] for it in items]), s.student.mean, s.student.std),
            "label": torch.tensor([it["label"] for it in items], dtype=torch.int64),
            # the teacher as cached (k ids + logits + tail), not a distribution at one temperature: every
            # student of a group rebuilds it at its own T on the device (teacher_log_probs)
            "topk_ids": ids,
            "topk_logits": torch.from_numpy(np.stack([it["vals"] for it in items]).astype(np.float32)),
            "tail_lse": torch.from_numpy(np.stack([it["tail"] for it in items]).astype(np.float32)),
            "teacher_top1": ids[:, 0].clone(),
            "teacher_top1_view0": torch.tensor([it["teacher_top1_view0"] for it in items], dtype=torch.int64),
            "weight": torch.ones(len(items)),
        }
        if s.teacher is not None:
            batch["teacher_pixels"] = normalize(torch.stack([it["teacher_pixels"] for it in items]),
                                                s.teacher.mean, s.teacher.std)
        if "teacher_feat" in items[0]:
            batch["teacher_feat"] = torch.from_numpy(np.stack([it["teacher_feat"] for it in items]).astype(np.float32))
        return batch

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        base = self.spec
        try:
            for e in pass_epochs(base.epoch, base.passes):
                self.spec = replace(base, epoch=e, passes=1)
                yield from self._one_pass()
        finally:
            self.spec = base

    def _one_pass(self) -> Iterator[dict[str, torch.Tensor]]:
        s = self.spec
        info = get_worker_info()
        rng = random.Random(s.seed * 7919 + s.epoch * 104_729 + s.rank * 1_009 + (info.id if info else 0))
        for group in shard_groups(self._my_shards(), s.interleave if s.train else 1):
            buffer: list[dict] = []
            batch: list[dict] = []
            for sample in mixed([self._samples(pair) for pair in group], rng):
                if s.train and s.shuffle_buffer > 1:
                    buffer.append(sample)
                    if len(buffer) < s.shuffle_buffer:
                        continue
                    sample = buffer.pop(rng.randrange(len(buffer)))
                batch.append(sample)
                if len(batch) == s.batch_size:
                    yield self._collate(batch)
                    batch = []
            rng.shuffle(buffer)
            for sample in buffer:
                batch.append(sample)
                if len(batch) == s.batch_size:
                    yield self._collate(batch)
                    batch = []
            if batch:  # one partial batch per shard group keeps the step count computable from the manifest
                yield self._collate(batch)


def placeholder_batch(spec: StreamSpec) -> dict[str, torch.Tensor]:
    """A one-row, zero-weight batch for a rank whose slot got no shard this epoch (it still joins collectives)."""
    p = spec.student
    batch = {"pixels": torch.zeros(1, p.channels, p.input_size, p.input_size), "label": torch.full((1,), -1),
             "topk_ids": torch.zeros(1, 1, dtype=torch.int64), "topk_logits": torch.zeros(1, 1),
             "tail_lse": torch.full((1,), -math.inf),
             "teacher_top1": torch.zeros(1, dtype=torch.int64), "teacher_top1_view0": torch.full((1,), -1),
             "weight": torch.zeros(1)}
    if spec.teacher is not None:
        t = spec.teacher
        batch["teacher_pixels"] = torch.zeros(1, t.channels, t.input_size, t.input_size)
    return batch


def padded(batches: Iterator[dict[str, torch.Tensor]], steps: int,
           placeholder: dict[str, torch.Tensor]) -> Iterator[dict[str, torch.Tensor]]:
    """Exactly `steps` batches: real ones first, then zero-weight copies of the last real one."""
    last: dict[str, torch.Tensor] | None = None
    n = 0
    for b in batches:
        if n == steps:
            raise RuntimeError(f"data produced more than the planned {steps} batches; the cache manifest is stale")
        last = b
        n += 1
        yield b
    while n < steps:
        pad = dict(last if last is not None else placeholder)
        pad["weight"] = torch.zeros_like(pad["weight"])
        n += 1
        yield pad
