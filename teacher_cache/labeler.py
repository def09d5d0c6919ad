"""Label one shard: decode + views in background threads while the teacher runs, then write one Parquet file.

This is the whole per-shard computation; the Ray actor and the in-process path both call ``label_shard``.
"""

from __future__ import annotations

import io
import logging
import queue
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import torch
from PIL import Image

from teacher_cache.cache_file import write_cache_file
from teacher_cache.config import CacheConfig
from teacher_cache.features import FeatureExtractor, teacher_forward
from teacher_cache.schema import SCHEMA_VERSION, CacheMeta
from teacher_cache.shards import IMAGE_EXTS, RawSample, ShardError, ShardIdentity, ShardReader
from teacher_cache.teacher import LoadedTeacher, Preprocessing, load_teacher, view_policy
from teacher_cache.topk import pack_topk
from teacher_cache.views import ViewParams, ViewPolicy, image_to_tensor, normalize, replay_view, sample_views

log = logging.getLogger(__name__)
Image.MAX_IMAGE_PIXELS = 200_000_000  # keep PIL's bomb check, but allow large real photos


@dataclass
class ShardTask:
    stem: str
    path: Path
    out_dir: Path


@dataclass
class ProgressEvent:
    """Sent every batch from a labeller to the driver (progress bars and metrics live in the driver)."""

    images: int = 0
    errors: int = 0
    batch_seconds: list[float] = field(default_factory=list)


@dataclass
class ShardResult:
    stem: str
    source: str
    ok: bool
    message: str | None = None
    rows: int = 0
    error_records: list[dict] = field(default_factory=list)
    file: str | None = None
    file_bytes: int = 0
    file_sha256: str | None = None
    identity: ShardIdentity | None = None
    seconds: float = 0.0
    teacher_seconds: float = 0.0


@dataclass
class _Decoded:
    key: str
    label: int | None
    hw: tuple[int, int]
    views: list[ViewParams]
    pixels: torch.Tensor  # (V, C, S, S) uint8


def decode_sample(raw: RawSample, prep: Preprocessing, policy: ViewPolicy) -> _Decoded | str:
    """Raw sample -> decoded views, or a string saying why the sample is skipped."""
    ext = next((e for e in IMAGE_EXTS if e in raw.files), None)
    if ext is None:
        return f"no image file (expected one of .{', .'.join(IMAGE_EXTS)}; found {sorted(raw.files) or 'none'})"
    try:
        with Image.open(io.BytesIO(raw.files[ext])) as im:
            im.load()
            pixels = image_to_tensor(im, prep.channels)
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as exc:
        return f"cannot decode .{ext}: {exc.__class__.__name__}: {exc}"
    label = None
    if "cls" in raw.files:
        try:
            label = int(raw.files["cls"].decode().strip())
        except ValueError:
            return f"bad .cls (not an integer): {raw.files['cls'][:20]!r}"
    _, h, w = pixels.shape
    views = sample_views(raw.key, h, w, policy)
    out = torch.stack([replay_view(pixels, v, prep.input_size, prep.interpolation) for v in views])
    return _Decoded(raw.key, label, (h, w), views, out)


class Labeler:
    """Holds one loaded teacher; labels shard after shard. Built once per Ray actor or per in-process run."""

    def __init__(self, cfg: CacheConfig, fingerprint: str, teacher: LoadedTeacher | None = None) -> None:
        self.cfg = cfg
        self.fingerprint = fingerprint
        if cfg.torch_threads:
            torch.set_num_threads(cfg.torch_threads)
        self.teacher = teacher or load_teacher(cfg.teacher)
        want_cuda = cfg.device == "cuda" or (cfg.device == "auto" and torch.cuda.is_available())
        self.device = torch.device("cuda" if want_cuda else "cpu")
        self.model = self.teacher.model.to(self.device)
        self.prep = self.teacher.preprocessing
        self.policy = view_policy(cfg, self.prep)
        f = cfg.features
        self.features = FeatureExtractor(self.model, f.dim, f.seed, f.projection) if f.enabled else None

    def _batches(self, reader: ShardReader, errors: list[dict], stem: str) -> Iterator[list[_Decoded]]:
        """Decode in a thread pool, in order, `batch_size // V` samples per batch, bounded read-ahead."""
        per_batch = max(1, self.cfg.batch_size // self.policy.num_views)
        with ThreadPoolExecutor(self.cfg.decode_threads, thread_name_prefix="decode") as pool:
            window: list = []
            batch: list[_Decoded] = []
            limit = per_batch * 2 + self.cfg.decode_threads
            samples = iter(reader)
            while True:
                while len(window) < limit and (raw := next(samples, None)) is not None:
                    window.append((raw.key, pool.submit(decode_sample, raw, self.prep, self.policy)))
                if not window:
                    break
                key, fut = window.pop(0)
                item = fut.result()
                if isinstance(item, str):
                    errors.append({"shard": stem, "key": key, "reason": item})
                    continue
                batch.append(item)
                if len(batch) == per_batch:
                    yield batch
                    batch = []
            if batch:
                yield batch

    def _producer(self, task: ShardTask, reader: ShardReader, out: queue.Queue, errors: list[dict]) -> None:
        try:
            for batch in self._batches(reader, errors, task.stem):
                out.put(batch)
            out.put(None)
        except BaseException as exc:  # forwarded to the consumer thread, which re-raises it
            out.put(exc)

    def label_shard(self, task: ShardTask, progress: Callable[[ProgressEvent], None] | None = None) -> ShardResult:
        """Label every sample of one shard and write its cache file; a broken shard returns ok=False."""
        t0 = time.perf_counter()
        result = ShardResult(stem=task.stem, source=str(task.path), ok=False)
        try:
            identity = ShardIdentity.stat(task.path)
            reader = ShardReader(task.path)
            errors: list[dict] = []
            rows = self._run_teacher(task, reader, errors, progress, result)
            meta = CacheMeta(SCHEMA_VERSION, self.fingerprint, self.cfg.topk, self.policy.num_views,
                             self.teacher.num_classes, self.prep.as_dict(), self.teacher.info, task.stem,
                             self.policy.as_dict(), self.features.spec.as_dict() if self.features else None)
            final = task.out_dir / f"{task.stem}.parquet"
            nbytes, digest = write_cache_file(final, rows, meta)
        except (ShardError, OSError) as exc:
            result.message = str(exc)
            result.seconds = time.perf_counter() - t0
            return result
        result.ok, result.rows, result.error_records = True, len(rows["key"]), errors
        result.file, result.file_bytes, result.file_sha256 = final.name, nbytes, digest
        result.identity = ShardIdentity(identity.size, identity.mtime_ns, reader.sha256)
        result.seconds = time.perf_counter() - t0
        return result

    def _run_teacher(self, task: ShardTask, reader: ShardReader, errors: list[dict],
                     progress: Callable[[ProgressEvent], None] | None, result: ShardResult) -> dict:
        q: queue.Queue = queue.Queue(maxsize=3)
        thread = threading.Thread(target=self._producer, args=(task, reader, q, errors), daemon=True)
        thread.start()
        cols: dict[str, list] = {"key": [], "label": [], "hw": [], "views": [], "ids": [], "logits": [], "tail": [],
                                 "feat": []}
        n_err = 0
        while (item := q.get()) is not None:
            if isinstance(item, BaseException):
                raise item
            tb = time.perf_counter()
            x = normalize(torch.cat([d.pixels for d in item]), self.prep.mean, self.prep.std)
            with torch.inference_mode():
                logits, feats = teacher_forward(self.model, self.features, x.to(self.device, non_blocking=True))
                logits, feats = logits.float().cpu(), feats.float().cpu() if feats is not None else None
            ids, vals, tail = pack_topk(logits, self.cfg.topk)
            dt = time.perf_counter() - tb
            result.teacher_seconds += dt
            v = self.policy.num_views
            for i, d in enumerate(item):
                cols["key"].append(d.key)
                cols["label"].append(d.label)
                cols["hw"].append(d.hw)
                cols["views"].append(d.views)
                cols["ids"].append(ids[i * v:(i + 1) * v].numpy())
                cols["logits"].append(vals[i * v:(i + 1) * v].numpy())
                cols["tail"].append(tail[i * v:(i + 1) * v].numpy())
                if feats is not None:
                    cols["feat"].append(feats[i * v:(i + 1) * v].numpy())
            if progress is not None:
                progress(ProgressEvent(images=len(item), errors=len(errors) - n_err, batch_seconds=[dt]))
                n_err = len(errors)
        thread.join()
        if progress is not None and len(errors) > n_err:
            progress(ProgressEvent(errors=len(errors) - n_err))
        return cols

