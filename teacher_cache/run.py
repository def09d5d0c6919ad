"""`distill cache`: validate, plan the incremental refresh, label shards (Ray pool or in-process), keep the manifest."""

from __future__ import annotations

import contextlib
import json
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import yaml
from tqdm import tqdm

from distill.core.atomic_io import checksum_matches
from distill.core.errors import DistillError
from distill.core.graceful_stop import StopRequested, sigterm_deferred, sigterm_received
from distill.core.ray_cluster import InfeasibleResourcesError
from distill.core.run_phase import begin_work
from distill.core.storage import FileInfo, Published, Store, open_store
from distill.core.storage.names import UnsafeNameError, check_part
from distill.images.shards import ShardIdentity, ShardPath, expand_shard_patterns, shard_stem
from distill.teacher.hooks import check_features
from distill.teacher.load import LoadedTeacher, load_teacher
from distill.teacher_cache import metrics
from distill.teacher_cache.config import CacheConfig
from distill.teacher_cache.fingerprint import fingerprint
from distill.teacher_cache.fingerprint_memo import recall_fingerprint, remember_fingerprint
from distill.teacher_cache.inspect_cache import teacher_score, weak_teacher_warning
from distill.teacher_cache.labeler import ProgressEvent, ShardResult, ShardTask, label_in_process
from distill.teacher_cache.manifest import Manifest, ManifestWriter, ShardEntry, plan_refresh
from distill.teacher_cache.placement import resolve_placement
from distill.teacher_cache.reader import ERRORS_DIR
from distill.teacher_cache.tracking import record_cache_run

log = logging.getLogger(__name__)
SUMMARY_NAME = "last_run.json"


class RunFailedError(DistillError, RuntimeError):
    """The run got past validation (lock held, work begun) and then failed: not "bad input, nothing done".

    Shards finished before the failure are in the manifest; re-running continues with the rest.
    """


@dataclass
class CacheResult:
    cache_dir: Path  # local: the cache directory; for an object-store cache_root, where uploads wait (staging)
    fingerprint: str
    cache_url: str | None = None  # the fingerprint directory readers use: a local path or an s3:// prefix
    labelled: list[str] = field(default_factory=list)
    new: list[str] = field(default_factory=list)
    changed: list[str] = field(default_factory=list)
    unchanged: list[str] = field(default_factory=list)
    touched: list[str] = field(default_factory=list)
    failed: dict[str, str] = field(default_factory=dict)
    vanished: list[str] = field(default_factory=list)
    retried: dict[str, int] = field(default_factory=dict)  # shards labelled again after their actor died
    lost_nodes: list[str] = field(default_factory=list)  # Ray nodes that died with a labelling actor
    labelled_on_driver: list[str] = field(default_factory=list)  # by this process while Ray started (head_start)
    ray_start_seconds: float = 0.0  # connecting to Ray or starting a local cluster (in `seconds`)
    stopped: bool = False  # SIGTERM (e.g. `ray job stop`) ended the run; what is listed is kept
    images: int = 0
    decode_errors: int = 0
    seconds: float = 0.0
    teacher_seconds: float = 0.0
    label_seconds: float = 0.0  # inside the labeller (on actors with Ray); the driver's own share is the rest
    wait_seconds: float = 0.0  # the teacher waiting for decoded batches, summed over shards
    write_seconds: float = 0.0  # packing and publishing cache files, summed over shards
    teacher_top1: float | None = None  # the cached teacher's view-0 top-1 on every labelled row of the cache
    labelled_rows: int = 0  # rows with a label in the whole cache (what teacher_top1 is measured on)

    @property
    def status(self) -> str:
        """success (nothing failed), partial (some shards failed), failure (every shard to label failed),
        stopped (SIGTERM arrived: the shards in `labelled` are cached, a re-run labels the rest)."""
        if self.stopped:
            return "stopped"
        if not self.failed:
            return "success"
        return "failure" if not self.labelled else "partial"

    def summary(self) -> dict:
        d = asdict(self)
        d["cache_dir"], d["status"] = str(self.cache_dir), self.status
        return d


def map_shards(patterns: list[str]) -> dict[str, ShardPath]:
    """stem -> path; two inputs with the same file name would overwrite each other's cache, so refuse; a name that
    is no plain file name part (``...tar``, a backslash) is refused as every reader would refuse it."""
    out: dict[str, ShardPath] = {}
    for p in expand_shard_patterns(patterns):
        stem = shard_stem(p)
        try:
            check_part(stem, str(p))
        except UnsafeNameError as exc:
            raise UnsafeNameError(f"{exc}; rename the shard") from None
        if stem in out:
            raise ValueError(f"two shards share the name '{stem}': {out[stem]} and {p}; cache files are named "
                             "after the shard, so give shards unique file names")
        out[stem] = p
    return out


def prepare(cfg: CacheConfig) -> tuple[LoadedTeacher, str]:
    """Load and check the teacher (fails on bad input before any work) and compute its fingerprint."""
    teacher = load_teacher(cfg.teacher)
    if cfg.topk > teacher.num_classes:
        raise ValueError(f"topk={cfg.topk} is larger than the teacher's {teacher.num_classes} classes; "
                         f"set topk <= {teacher.num_classes}")
    if cfg.features.enabled:
        check_features(teacher.model, cfg.features.dim)  # a head to hook and a dim it has, before any work
    fp = fingerprint(teacher, cfg)
    remember_fingerprint(cfg, fp)
    return teacher, fp


def run(cfg: CacheConfig, wait_for_lock: bool = False) -> CacheResult:
    """Label new/changed shards, skip unchanged ones, record everything in the manifest.

    A no-op refresh (same teacher files, same shards) neither loads the teacher nor reads shard data: the
    fingerprint comes from a memo keyed by the teacher files' size+mtime+ctime+inode and the fingerprint-relevant
    config. ``last_run.json`` is written while the lock is held, so it always describes the last writer.
    """
    t0 = time.perf_counter()
    cfg = resolve_placement(cfg.anchored())  # paths absolute; device, precision, decode backend: once, here
    teacher: LoadedTeacher | None = None
    fp = recall_fingerprint(cfg)
    early = fp is not None and not wait_for_lock  # a run that waits for the lock lists after getting it
    walk = _prefetch(open_store(cfg.cache_root, cfg.staging_dir).child(fp).walk) if fp is not None and early else None
    shards = map_shards(cfg.shards)  # (listing the shards while the cache directory is listed)
    if fp is None:
        teacher, fp = prepare(cfg)
    store = open_store(cfg.cache_root, cfg.staging_dir).child(fp)
    result = CacheResult(cache_dir=store.workdir, fingerprint=fp, cache_url=store.location)
    with store.lock(wait_for_lock, cfg.lock_lease_s):
        writer = ManifestWriter(store)
        try:
            _plan_and_label(cfg, fp, teacher, shards, store, writer, result, t0, walk or store.walk)
        except BaseException:
            writer.abandon()  # what is journalled stays; nothing is written once the lock is lost
            raise
        writer.finish()  # the journal folded into the snapshot
        if writer.replaced:  # files of relabelled shards' previous labels, unless a reader's version holds them
            store.sweep(writer.replaced)
        _check_teacher(writer, result)
        result.seconds = time.perf_counter() - t0
        _write_summary(store, result)
    record_cache_run(cfg, result, writer.manifest_or_none())  # MLflow; never fails the pass
    metrics.RUN_SECONDS.set(result.seconds)
    if result.status == "success":
        metrics.LAST_SUCCESS.set_to_current_time()
    return result


def _check_teacher(writer: ManifestWriter, result: CacheResult) -> None:
    """The teacher's top-1 on the cache's labelled rows, and a warning here, before any student trains, when it is
    no better than chance (labels that are not its classes, or a broken teacher)."""
    result.teacher_top1, result.labelled_rows = teacher_score(writer.manifest.shards)
    classes = writer.manifest.teacher.get("num_classes")
    if (warning := weak_teacher_warning(result.teacher_top1, result.labelled_rows, classes)) is not None:
        log.warning("%s", warning)


def _prefetch(fn: Callable[[], dict[str, FileInfo]]) -> Callable[[], dict[str, FileInfo]]:
    """Start `fn` in a daemon thread; the getter returns its result (or raises its error) when needed."""
    out: list = []

    def target() -> None:
        try:
            out.append(fn())
        except BaseException as exc:  # noqa: BLE001 - handed to the getter
            out.append(exc)

    thread = threading.Thread(target=target, name="list-cache-dir", daemon=True)
    thread.start()

    def get() -> dict[str, FileInfo]:
        thread.join()
        if isinstance(out[0], BaseException):
            raise out[0]
        return out[0]

    return get


def _plan_and_label(cfg: CacheConfig, fp: str, teacher: LoadedTeacher | None, shards: dict[str, ShardPath],
                    store: Store, writer: ManifestWriter, result: CacheResult, t0: float,
                    walk: Callable[[], dict[str, FileInfo]]) -> None:
    """Under the lock: recover the manifest, remove orphans, plan, label. Everything is written via `store`.

    `walk` lists the cache directory (started before the lock, beside the shard listing): a file it missed
    (written by a writer that finished just before we got the lock) is relabelled, and a file it saw that the
    manifest read under the lock does not list was never committed by anyone, so removing it is safe.
    """
    manifest = writer.open(fp)
    shards_now = manifest.shards if manifest is not None else {}
    files = walk()  # one listing: orphans to remove, and what a no-op refresh checks of the cache files
    if (n := store.sweep(orphans(files, shards_now))):
        log.info("removed %d file(s) no manifest lists (replaced, or left by an interrupted run)", n)

    def check(entry: ShardEntry) -> str | None:
        if entry.errors_file is not None and entry.errors_file not in files:  # (an older build's sweep removes it)
            return f"{store.location}/{entry.errors_file} is missing"
        return cache_file_moved(store, entry, files.get(entry.file))

    plan = plan_refresh(manifest, shards, store.workdir, cache_file_check=check)
    if plan.todo and teacher is None:
        teacher, fp2 = prepare(cfg)
        if fp2 != fp:  # the memo was stale (files rewritten with the same mtime): start over, correctly
            raise RunFailedError(f"teacher fingerprint changed during the run ({fp} -> {fp2}); re-run")
    if manifest is None:
        assert teacher is not None  # every shard is new, so the teacher was loaded above
        writer.start(Manifest(fingerprint=fp, teacher=teacher.info))
    for stem, ident in plan.touched.items():  # same content, moved cheap identity: remember the new one
        entry = writer.manifest.shards[stem]
        entry.update_identity(ident, str(shards[stem]))
        writer.put(stem, entry)
    store.write("cache_config.resolved.yaml", yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False).encode())
    result.unchanged, result.touched, result.vanished = plan.unchanged, sorted(plan.touched), plan.vanished
    result.new = [stem for stem, _, why in plan.todo if why == "new"]
    result.changed = [stem for stem, _, why in plan.todo if why != "new"]
    for decision, n in (("label", len(plan.todo)), ("unchanged", len(plan.unchanged)),
                        ("vanished", len(plan.vanished))):
        metrics.SHARDS_PLANNED.labels(decision).set(n)
    if plan.vanished:
        log.warning("%d cached shards are no longer in the input: %s", len(plan.vanished),
                    ", ".join(plan.vanished[:5]))
    log.info("cache %s: %d shards to label (%d unchanged)", store.location, len(plan.todo), len(plan.unchanged))
    tasks = [ShardTask(stem, path, store) for stem, path, _ in plan.todo]
    if not tasks:
        return
    assert teacher is not None
    begin_work()  # from here an error is "failed during the run" (exit 6), not "bad input" (core/run_phase.py)
    try:
        _execute(cfg, fp, teacher, tasks, writer, store, result)
    except InfeasibleResourcesError:  # a config this cluster can never place: bad input, nothing done
        raise
    except BaseException as exc:  # noqa: BLE001 - re-raised with what it means; nothing is swallowed
        if sigterm_received():  # record what was done before the lock is released (SIGKILL may follow)
            writer.finish()
            result.stopped, result.seconds = True, time.perf_counter() - t0
            _write_summary(store, result)
            log.warning("stopped after %d of %d shards; they are cached, a re-run labels the rest",
                        len(result.labelled), len(tasks))
            raise StopRequested("stopped by SIGTERM") from None
        if not isinstance(exc, Exception):
            raise
        raise RunFailedError(f"{exc.__class__.__name__}: {exc} (after {len(result.labelled)} of "
                             f"{len(tasks)} shards were cached; they are kept, re-run to continue)") from exc


def orphans(files: dict[str, FileInfo], shards: dict[str, ShardEntry]) -> list[str]:
    """Cache and error files no entry names: replaced by a relabel, or left by an interrupted run."""
    listed = {name for stem, e in shards.items() for name in e.files(stem)}
    return [n for n in files if n not in listed and (
        (n.endswith(".parquet") and "/" not in n) or (n.startswith(f"{ERRORS_DIR}/") and n.endswith(".jsonl")))]


def cache_file_moved(store: Store, entry: ShardEntry, now: FileInfo | None) -> str | None:
    """Why a listed cache file must be labelled again, from one listing: missing, another size, or its own
    identity moved (a same-size rewrite) and, locally, its checksum no longer matches the manifest."""
    if now is None:
        return f"{store.location}/{entry.file} is missing"
    if now.size != entry.file_bytes:
        return f"{entry.file}: {now.size} bytes, the manifest says {entry.file_bytes}"
    recorded = entry.file_info()
    if recorded is None:
        return None  # an older build's entry: size only, as before
    if recorded.etag is not None:
        return None if now.etag == recorded.etag else f"{entry.file}: replaced (ETag {now.etag})"
    if (now.mtime_ns, now.ctime_ns, now.inode) == (recorded.mtime_ns, recorded.ctime_ns, recorded.inode):
        return None
    if checksum_matches(store.workdir / entry.file, entry.file_sha256):
        return None  # touched (chmod, a copy that kept the bytes): the same file
    return f"{entry.file}: altered since it was written (checksum)"


def _write_summary(store: Store, result: CacheResult) -> None:
    store.write(SUMMARY_NAME, json.dumps(result.summary(), indent=1).encode())


def _execute(cfg: CacheConfig, fp: str, teacher: LoadedTeacher, tasks: list[ShardTask], writer: ManifestWriter,
             store: Store, result: CacheResult) -> None:
    before = {}  # full stat of each shard before it is handed out (see complete_identity)
    for task in tasks:
        with contextlib.suppress(OSError):  # a vanished file is reported by the labeller as a failed shard
            before[task.stem] = ShardIdentity.stat(task.path)
    paths = {task.stem: task.path for task in tasks}
    disable = not cfg.progress
    shard_bar = tqdm(total=len(tasks), desc="shards", unit="shard", position=0, disable=disable)
    image_bar = tqdm(desc="images", unit="img", position=1, disable=disable)

    def on_progress(ev: ProgressEvent) -> None:  # live, best effort; counters come from finished shards
        image_bar.update(ev.images)
        for s in ev.batch_seconds:
            metrics.BATCH_LATENCY.observe(s)

    def on_result(r: ShardResult) -> None:
        shard_bar.update(1)
        if not r.ok:
            result.failed[r.stem] = r.message or "unknown error"
            metrics.SHARDS.labels("failed").inc()
            log.error("shard failed: %s", r.message)
            return
        assert r.identity is not None and r.file is not None and r.file_sha256 is not None
        ident = complete_identity(r.identity, paths[r.stem], before.get(r.stem))
        with sigterm_deferred():  # the manifest and the summary agree on what was done, even on `ray job stop`
            errors = _save_errors(store, r)  # after the shard's file, before its record; a new name each time
            info = r.file_info or FileInfo(r.file_bytes, 0)
            writer.put(r.stem, ShardEntry(
                source=r.source, size=ident.size, mtime_ns=ident.mtime_ns,
                content_sha256=ident.sha256 or "", file=r.file, file_bytes=r.file_bytes,
                file_sha256=r.file_sha256, rows=r.rows, errors=len(r.error_records),
                ctime_ns=ident.ctime_ns, inode=ident.inode, etag=ident.etag, seen_ns=ident.seen_ns,
                errors_file=errors.name if errors else None, errors_sha256=errors.sha256 if errors else None,
                file_mtime_ns=info.mtime_ns if r.file_info and info.etag is None else None,
                file_ctime_ns=info.ctime_ns, file_inode=info.inode, file_etag=info.etag, **r.stats))
            result.labelled.append(r.stem)
            result.images += r.rows
            result.decode_errors += len(r.error_records)
        metrics.IMAGES.inc(r.rows)
        metrics.DECODE_ERRORS.inc(len(r.error_records))
        result.teacher_seconds += r.teacher_seconds
        result.label_seconds += r.seconds
        result.wait_seconds += r.wait_seconds
        result.write_seconds += r.write_seconds
        metrics.SHARDS.labels("done").inc()
        metrics.BYTES_WRITTEN.inc(r.file_bytes)

    try:
        if cfg.ray.enabled:
            from distill.teacher_cache.head_start import label_on_ray

            report = label_on_ray(cfg, fp, teacher, tasks, on_result, on_progress, result.labelled_on_driver)
            result.retried, result.lost_nodes, result.ray_start_seconds = (report.retried, report.lost_nodes,
                                                                           report.ray_start_s)
            if report.lost_nodes:
                log.warning("lost Ray node(s) %s; shards labelled again elsewhere: %s", ", ".join(report.lost_nodes),
                            ", ".join(sorted(report.retried)) or "none")
        else:
            label_in_process(cfg, fp, teacher, tasks, on_result, on_progress)
    finally:
        image_bar.close()
        shard_bar.close()


def complete_identity(ident: ShardIdentity, path: ShardPath, before: ShardIdentity | None) -> ShardIdentity:
    """Fill ctime/inode when the labeller reported only size+mtime+hash.

    ``before`` is the full stat taken just before the shard was handed out. If a stat now is identical to it
    (ctime included, which every write moves), the file did not change while it was read, so its ctime and
    inode belong to the hashed content. Otherwise leave them unknown: the next refresh hashes the shard once.
    """
    if (ident.ctime_ns is not None and ident.inode is not None) or ident.etag is not None:
        return ident  # complete already, or an object (its listed identity is all there is)
    try:
        now = ShardIdentity.stat(path)
    except OSError:
        return ident
    if before is not None and now.same_cheap(before) and (now.size, now.mtime_ns) == (ident.size, ident.mtime_ns):
        return replace(ident, ctime_ns=now.ctime_ns, inode=now.inode)
    return ident


def _save_errors(store: Store, r: ShardResult) -> Published | None:
    """The shard's error file, published like a cache file (a content-addressed name, its checksum in the
    record), so it is never rewritten under a reader; the one it replaces goes with the next sweep. A clean
    shard costs no request."""
    if not r.error_records:
        return None
    data = "".join(json.dumps(e) + "\n" for e in r.error_records).encode()

    def write(tmp: Path) -> None:
        tmp.write_bytes(data)

    return store.publish(f"{ERRORS_DIR}/{r.stem}.jsonl", write)
