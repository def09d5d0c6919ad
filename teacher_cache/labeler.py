"""Label one shard: decode + views in worker processes (or nvjpeg on the GPU) while the teacher runs, then write
one Parquet file.

This is the whole per-shard computation; the Ray actor and the in-process path both call ``label_shard``.
The teacher step keeps the GPU fed: uint8 batches in pinned host memory, non_blocking copies, normalisation,
channels_last and autocast on the device, top-k + tail log-sum-exp packed there; only the small packed tensors
and a per-sample finiteness flag come back.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import queue
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import torch

from distill.core import hooks_for_tests
from distill.core.devices import resolve_device
from distill.core.storage import FileInfo, Store, open_store
from distill.images.decode import DecodedSample, DecodeSpec, decode_batch_gpu
from distill.images.decode_pool import DecodePool
from distill.images.shards import ShardError, ShardIdentity, ShardPath, ShardReader
from distill.images.views import normalize
from distill.teacher.hooks import Fp32Head
from distill.teacher.load import LoadedTeacher, load_teacher
from distill.teacher_cache.cache_file import publish_cache_file, shard_stats
from distill.teacher_cache.config import CacheConfig
from distill.teacher_cache.features import FeatureExtractor, teacher_forward
from distill.teacher_cache.fingerprint import view_policy
from distill.teacher_cache.layout import BusyMeter, available_cpus, free_cpus, plan_layout, sample_others_busy
from distill.teacher_cache.placement import resolve_placement
from distill.teacher_cache.schema import SCHEMA_VERSION, CacheMeta
from distill.teacher_cache.topk import pack_topk

log = logging.getLogger(__name__)
_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
PREFETCH_BATCHES = 3  # decoded batches queued ahead of the forward: decode and view sampling overlap it


@dataclass
class ShardTask:
    stem: str
    path: ShardPath
    store: Store  # the fingerprint directory (local, or an object-store prefix) the cache file is published to

    def __post_init__(self) -> None:
        if not isinstance(self.store, Store):  # a local directory given as a path
            self.store = open_store(self.store)


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
    file_info: FileInfo | None = None  # the cache file's identity as published (mtime/ctime/inode, or ETag)
    identity: ShardIdentity | None = None
    stats: dict = field(default_factory=dict)  # labelled rows, teacher top-1 hits, top-k mass (the manifest's)
    seconds: float = 0.0
    teacher_seconds: float = 0.0
    wait_seconds: float = 0.0  # the teacher waiting for decoded batches (0 when decoding keeps ahead)
    write_seconds: float = 0.0  # packing and publishing the Parquet file


class Labeler:
    """Holds one loaded teacher; labels shard after shard. Built once per Ray actor or per in-process run."""

    def __init__(self, cfg: CacheConfig, fingerprint: str, teacher: LoadedTeacher | None = None,
                 labellers_on_node: int = 1) -> None:
        cfg = resolve_placement(cfg, in_this_process=True)  # a no-op on the driver's resolved config (Ray actors)
        self.cfg = cfg
        self.fingerprint = fingerprint
        self.gpu_decode = cfg.decode_backend == "gpu"
        self._cpus = available_cpus()
        sized = cfg.torch_threads is not None and (cfg.decode_processes is not None or self.gpu_decode)
        plan = plan_layout(self._cpus, None if sized else sample_others_busy(self._cpus), labellers_on_node,
                           cfg.device == "cuda")
        processes = 0 if self.gpu_decode else (cfg.decode_processes if cfg.decode_processes is not None
                                               else plan.processes)
        self._threads_before = torch.get_num_threads()  # given back on close(): the process may go on training
        self._resize = cfg.torch_threads is None and cfg.device != "cuda"  # threads follow the load between shards
        if threads := cfg.torch_threads or plan.threads:
            torch.set_num_threads(threads)
        self.teacher = teacher or load_teacher(cfg.teacher)
        self.device = resolve_device(cfg.device)
        self.dtype = _DTYPES[cfg.precision]
        self.model = self.teacher.model.to(self.device)
        if self.device.type == "cuda":
            self.model = self.model.to(memory_format=torch.channels_last)
        self.head = Fp32Head.install(self.model) if self.dtype != torch.float32 else None
        self.head_precision = "fp32" if self.head is not None or self.dtype == torch.float32 else cfg.precision
        self.prep = self.teacher.preprocessing
        self.policy = view_policy(cfg, self.prep)
        self.spec = DecodeSpec(self.prep.channels, self.prep.input_size, self.prep.interpolation, self.policy,
                               self.teacher.num_classes, cfg.max_image_pixels)
        self.pool = DecodePool(self.spec, processes)
        log.info("labeller: %s %s (head %s), %d torch thread(s), decode %s, %d batch(es) decoded ahead; layout: "
                 "%s%s", self.device, self.dtype, self.head_precision, torch.get_num_threads(),
                 "nvjpeg on the device" if self.gpu_decode else f"Pillow in {processes} process(es)",
                 PREFETCH_BATCHES, plan.reason, " (config overrides)" if cfg.decode_processes is not None
                 or cfg.torch_threads is not None else "")
        f = cfg.features
        self.features = FeatureExtractor(self.model, f.dim, f.seed, f.projection) if f.enabled else None
        self.ahead: queue.Queue = queue.Queue(maxsize=PREFETCH_BATCHES)
        self._meter = BusyMeter(self._cpus, self.pool.worker_pids())

    def _follow_load(self) -> None:
        """Between shards: torch threads from the CPUs other work left free over the shard just done."""
        others = self._meter.others_busy(self.pool.worker_pids())
        if not self._resize or others is None:
            return
        threads = max(1, free_cpus(self._cpus, others) - self.pool.processes)
        if threads != torch.get_num_threads():
            log.info("labeller: %d torch thread(s) (was %d): %.1f CPU(s) busy with other work of %d",
                     threads, torch.get_num_threads(), others, self._cpus)
            torch.set_num_threads(threads)

    def close(self) -> None:
        self.pool.close()
        torch.set_num_threads(self._threads_before)
        if self.head is not None:
            self.head.remove()

    def _decoded(self, reader: ShardReader) -> Iterator[tuple[str, DecodedSample | str]]:
        """(key, decoded sample or reason), in shard order, from the chosen backend."""
        if not self.gpu_decode:
            yield from self.pool.map(reader)
            return
        chunk: list = []
        for raw in reader:
            chunk.append(raw)
            if len(chunk) == 64:
                yield from zip([r.key for r in chunk], decode_batch_gpu(chunk, self.spec, self.device), strict=True)
                chunk = []
        if chunk:
            yield from zip([r.key for r in chunk], decode_batch_gpu(chunk, self.spec, self.device), strict=True)

    def _batches(self, reader: ShardReader, errors: list[dict], stem: str) -> Iterator[list[DecodedSample]]:
        """`batch_size // V` decoded samples per batch, in shard order; bad samples recorded, not yielded."""
        per_batch = max(1, self.cfg.batch_size // self.policy.num_views)
        batch: list[DecodedSample] = []
        for key, item in self._decoded(reader):
            if isinstance(item, str):
                errors.append({"shard": stem, "key": key, "reason": item})
                continue
            batch.append(item)
            if len(batch) == per_batch:
                yield batch
                batch = []
        if batch:
            yield batch

    def _producer(self, task: ShardTask, reader: ShardReader, out: queue.Queue, errors: list[dict],
                  stop: threading.Event) -> None:
        def put(item: object) -> bool:  # gives up when the consumer has left (it failed or was stopped)
            while not stop.is_set():
                try:
                    out.put(item, timeout=0.1)
                    return True
                except queue.Full:
                    continue
            return False

        try:
            for batch in self._batches(reader, errors, task.stem):
                if not put(batch):
                    return
            put(None)
        except BaseException as exc:  # forwarded to the consumer thread, which re-raises it
            put(exc)

    def label_shard(self, task: ShardTask, progress: Callable[[ProgressEvent], None] | None = None) -> ShardResult:
        """Label every sample of one shard and write its cache file; a broken shard returns ok=False."""
        t0 = time.perf_counter()
        result = ShardResult(stem=task.stem, source=str(task.path), ok=False)
        hooks_for_tests.check_labeller()  # off unless a test switched it on
        self._follow_load()
        try:
            identity = ShardIdentity.stat(task.path)
            reader = ShardReader(task.path)
            errors: list[dict] = []
            rows = self._run_teacher(task, reader, errors, progress, result)
            tw = time.perf_counter()
            meta = CacheMeta(SCHEMA_VERSION, self.fingerprint, self.cfg.topk, self.policy.num_views,
                             self.teacher.num_classes, self.prep.as_dict(), self.teacher.info, task.stem,
                             self.policy.as_dict(), self.features.spec.as_dict() if self.features else None,
                             self.cfg.precision, self.head_precision, self.cfg.decode_backend)
            published = publish_cache_file(task.store, task.stem, rows, meta)
            result.write_seconds = time.perf_counter() - tw
        except (ShardError, OSError) as exc:
            result.message = str(exc)
            result.seconds = time.perf_counter() - t0
            return result
        result.ok, result.rows, result.error_records = True, len(rows["key"]), errors
        result.stats = shard_stats(rows)
        result.file, result.file_bytes, result.file_sha256 = published.name, published.size, published.sha256
        result.file_info = published.info
        result.identity = dataclasses.replace(identity, sha256=reader.sha256)
        result.seconds = time.perf_counter() - t0
        return result

    def _run_teacher(self, task: ShardTask, reader: ShardReader, errors: list[dict],
                     progress: Callable[[ProgressEvent], None] | None, result: ShardResult) -> dict:
        q: queue.Queue = queue.Queue(maxsize=PREFETCH_BATCHES)
        self.ahead = q  # decoded batches waiting for the forward (the overlap; read by tests)
        stop = threading.Event()
        thread = threading.Thread(target=self._producer, args=(task, reader, q, errors, stop), daemon=True)
        thread.start()
        try:
            return self._consume(task, q, errors, progress, result)
        finally:  # also on failure or SIGTERM: no decoding thread may outlive the shard (or run into exit)
            stop.set()
            thread.join(timeout=60)

    def _consume(self, task: ShardTask, q: queue.Queue, errors: list[dict],
                 progress: Callable[[ProgressEvent], None] | None, result: ShardResult) -> dict:
        cols: dict[str, list] = {"key": [], "label": [], "hw": [], "views": [], "ids": [], "logits": [], "tail": [],
                                 "feat": []}
        n_err = 0
        while True:
            tq = time.perf_counter()
            item = q.get()
            result.wait_seconds += time.perf_counter() - tq
            if item is None:
                break
            if isinstance(item, BaseException):
                raise item
            tb = time.perf_counter()
            ids, vals, tail, finite, feats = self._teacher_step(item)
            dt = time.perf_counter() - tb
            result.teacher_seconds += dt
            v = self.policy.num_views
            for i, d in enumerate(item):
                if not finite[i]:  # a NaN/inf teacher output would poison every soft variant: record, skip
                    errors.append({"shard": task.stem, "key": d.key,
                                   "reason": "teacher logits are not finite (NaN/inf) for this image"})
                    continue
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
        if progress is not None and len(errors) > n_err:
            progress(ProgressEvent(errors=len(errors) - n_err))
        return cols

    def _teacher_step(self, item: list[DecodedSample]
                      ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """One forward over all views of a batch; returns host (ids, vals, tail, finite-per-sample)."""
        u8 = [d.pixels for d in item]
        if u8[0].device.type == "cpu" and self.device.type == "cuda":
            host = torch.empty((sum(p.shape[0] for p in u8), *u8[0].shape[1:]), dtype=torch.uint8, pin_memory=True)
            torch.cat(u8, out=host)  # pinned: the copy below runs asynchronously
            x = host.to(self.device, non_blocking=True)
        else:
            x = torch.cat(u8).to(self.device)
        x = normalize(x, self.prep.mean, self.prep.std)
        if self.device.type == "cuda":
            x = x.contiguous(memory_format=torch.channels_last)
        autocast = (torch.autocast(self.device.type, dtype=self.dtype) if self.dtype != torch.float32
                    else contextlib.nullcontext())
        with torch.inference_mode(), autocast:
            logits, feats = teacher_forward(self.model, self.features, x)
            logits = logits.float()
        finite = torch.isfinite(logits).all(dim=1).view(len(item), -1).all(dim=1)
        ids, vals, tail = pack_topk(torch.nan_to_num(logits), self.cfg.topk)
        packed = (ids.to(torch.int32), vals, tail, finite)
        ids, vals, tail, finite = (t.cpu() for t in packed)  # the one device->host transfer per batch: small tensors
        return ids, vals, tail, finite, feats.float().cpu() if feats is not None else None


def label_in_process(cfg: CacheConfig, fp: str, teacher: LoadedTeacher, tasks: list[ShardTask],
                     on_result: Callable[[ShardResult], None], on_progress: Callable[[ProgressEvent], None],
                     until: Callable[[], bool] | None = None, labellers_on_node: int = 1) -> list[ShardTask]:
    """Label `tasks` one after the other in this process; with `until`, stop before a shard once it says so.

    Returns the tasks not labelled (none unless `until` stopped it)."""
    labeler = Labeler(cfg, fp, teacher, labellers_on_node=labellers_on_node)
    rest = list(tasks)
    try:
        while rest and not (until is not None and until()):
            shown = 0

            def counted(ev: ProgressEvent) -> None:
                nonlocal shown
                shown += ev.images
                on_progress(ev)

            r = labeler.label_shard(rest.pop(0), counted)
            if not r.ok and shown:  # a shard that broke half-way gives its images back
                on_progress(ProgressEvent(images=-shown))
            on_result(r)
    finally:
        labeler.close()
    return rest
