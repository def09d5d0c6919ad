"""`distill cache`: validate, plan the incremental refresh, label shards (Ray pool or in-process), keep the manifest."""

from __future__ import annotations

import contextlib
import json
import logging
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import yaml
from tqdm import tqdm

from core.atomic_io import atomic_write, remove_stale_tmp
from core.graceful_stop import StopRequested, sigterm_deferred, sigterm_received
from core.object_store import ObjectLock, is_url, join
from core.ray_cluster import InfeasibleResourcesError, connect_ray
from teacher_cache import metrics
from teacher_cache.config import CacheConfig
from teacher_cache.features import check_features
from teacher_cache.fingerprint_memo import recall_fingerprint, remember_fingerprint
from teacher_cache.labeler import Labeler, ProgressEvent, ShardResult, ShardTask
from teacher_cache.manifest import (
    MANIFEST_NAME,
    DirectoryLock,
    Manifest,
    ShardEntry,
    plan_refresh,
)
from teacher_cache.placement import resolve_placement
from teacher_cache.reader import ERRORS_DIR
from teacher_cache.remote_cache import RemoteCacheDir, staging_root
from teacher_cache.shards import ShardIdentity, ShardPath, expand_shard_patterns, shard_stem
from teacher_cache.teacher import LoadedTeacher, fingerprint, load_teacher

log = logging.getLogger(__name__)
SUMMARY_NAME = "last_run.json"


class RunFailedError(RuntimeError):
    """The run got past validation (lock held, work begun) and then failed: not "bad input, nothing done".

    Shards finished before the failure are in the manifest; re-running continues with the rest.
    """


@dataclass
class CacheResult:
    cache_dir: Path  # local; for an object-store cache_root, the staging directory
    fingerprint: str
    cache_url: str | None = None  # the object-store directory readers use (cache_root is an s3:// prefix)
    labelled: list[str] = field(default_factory=list)
    new: list[str] = field(default_factory=list)
    changed: list[str] = field(default_factory=list)
    unchanged: list[str] = field(default_factory=list)
    touched: list[str] = field(default_factory=list)
    failed: dict[str, str] = field(default_factory=dict)
    vanished: list[str] = field(default_factory=list)
    retried: dict[str, int] = field(default_factory=dict)  # shards labelled again after their actor died
    lost_nodes: list[str] = field(default_factory=list)  # Ray nodes that died with a labelling actor
    progress_lost: bool = False
    stopped: bool = False  # SIGTERM (e.g. `ray job stop`) ended the run; what is listed is kept
    images: int = 0
    decode_errors: int = 0
    seconds: float = 0.0
    teacher_seconds: float = 0.0

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
    """stem -> path; two inputs with the same file name would overwrite each other's cache, so refuse."""
    out: dict[str, ShardPath] = {}
    for p in expand_shard_patterns(patterns):
        stem = shard_stem(p)
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
    cfg = resolve_placement(cfg)  # device, precision, decode backend: once, where the labellers will run
    shards = map_shards(cfg.shards)
    teacher: LoadedTeacher | None = None
    fp = recall_fingerprint(cfg)
    if fp is None:
        teacher, fp = prepare(cfg)
    remote: RemoteCacheDir | None = None
    if is_url(cfg.cache_root):
        out_dir = staging_root(str(cfg.cache_root), cfg.staging_dir) / fp
        remote = RemoteCacheDir(join(str(cfg.cache_root), fp), out_dir)
    else:
        out_dir = Path(cfg.cache_root) / fp
    result = CacheResult(cache_dir=out_dir, fingerprint=fp, cache_url=remote.url if remote else None)
    with contextlib.ExitStack() as locks:
        locks.enter_context(DirectoryLock(out_dir, wait=wait_for_lock))
        object_lock = locks.enter_context(ObjectLock(remote.url, cfg.lock_lease_s, wait_for_lock)) if remote else None
        if (n := remove_stale_tmp(out_dir)):
            log.info("removed %d temp files left by an interrupted run", n)
        if remote is not None:
            remote.pull_manifest()
        manifest = Manifest.load(out_dir, fp)
        if remote is not None and (n := remote.remove_orphans(manifest)):
            log.info("removed %d cache object(s) no manifest lists (left by an interrupted run)", n)
        plan = plan_refresh(manifest, shards, out_dir, cache_file_check=remote.check if remote else None)
        if plan.todo and teacher is None:
            teacher, fp2 = prepare(cfg)
            if fp2 != fp:  # the memo was stale (files rewritten with the same mtime): start over, correctly
                raise RunFailedError(f"teacher fingerprint changed during the run ({fp} -> {fp2}); re-run")
        if manifest is None:
            assert teacher is not None  # every shard is new, so the teacher was loaded above
            manifest = Manifest(fingerprint=fp, teacher=teacher.info)
        for stem, ident in plan.touched.items():  # same content, moved cheap identity: remember the new one
            manifest.shards[stem].update_identity(ident, str(shards[stem]))
        manifest.save(out_dir)
        atomic_write(out_dir / "cache_config.resolved.yaml",
                           yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False).encode())
        if remote is not None:
            remote.push("cache_config.resolved.yaml")
            if plan.touched or MANIFEST_NAME not in remote.sizes():
                remote.push(MANIFEST_NAME)
        result.unchanged, result.touched, result.vanished = plan.unchanged, sorted(plan.touched), plan.vanished
        result.new = [stem for stem, _, why in plan.todo if why == "new"]
        result.changed = [stem for stem, _, why in plan.todo if why != "new"]
        for decision, n in (("label", len(plan.todo)), ("unchanged", len(plan.unchanged)),
                            ("vanished", len(plan.vanished))):
            metrics.SHARDS_PLANNED.labels(decision).set(n)
        if plan.vanished:
            log.warning("%d cached shards are no longer in the input: %s", len(plan.vanished),
                        ", ".join(plan.vanished[:5]))
        log.info("cache %s: %d shards to label (%d unchanged)", out_dir, len(plan.todo), len(plan.unchanged))
        tasks = [ShardTask(stem, path, out_dir, remote.url if remote else None) for stem, path, _ in plan.todo]
        if tasks:
            assert teacher is not None
            try:
                _execute(cfg, fp, teacher, tasks, manifest, out_dir, result, remote, object_lock)
            except InfeasibleResourcesError:  # a config this cluster can never place: bad input, nothing done
                raise
            except BaseException as exc:  # noqa: BLE001 - re-raised with what it means; nothing is swallowed
                if sigterm_received():  # record what was done before the lock is released (SIGKILL may follow)
                    result.stopped, result.seconds = True, time.perf_counter() - t0
                    _write_summary(out_dir, result, remote)
                    log.warning("stopped after %d of %d shards; they are cached, a re-run labels the rest",
                                len(result.labelled), len(tasks))
                    raise StopRequested("stopped by SIGTERM") from None
                if not isinstance(exc, Exception):
                    raise
                raise RunFailedError(f"{exc.__class__.__name__}: {exc} (after {len(result.labelled)} of "
                                     f"{len(tasks)} shards were cached; they are kept, re-run to continue)") from exc
        result.seconds = time.perf_counter() - t0
        _write_summary(out_dir, result, remote)
    metrics.RUN_SECONDS.set(result.seconds)
    if result.status == "success":
        metrics.LAST_SUCCESS.set_to_current_time()
    return result


def _write_summary(out_dir: Path, result: CacheResult, remote: RemoteCacheDir | None) -> None:
    atomic_write(out_dir / SUMMARY_NAME, json.dumps(result.summary(), indent=1).encode())
    if remote is not None:
        remote.push(SUMMARY_NAME)


def _execute(cfg: CacheConfig, fp: str, teacher: LoadedTeacher, tasks: list[ShardTask], manifest: Manifest,
             out_dir: Path, result: CacheResult, remote: RemoteCacheDir | None = None,
             object_lock: ObjectLock | None = None) -> None:
    before = {}  # full stat of each shard before it is handed out (see complete_identity)
    for task in tasks:
        with contextlib.suppress(OSError):  # a vanished file is reported by the labeller as a failed shard
            before[task.stem] = ShardIdentity.stat(task.path)
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
        ident = complete_identity(r.identity, r.source, before.get(r.stem))
        if object_lock is not None and object_lock.lost:  # another job owns the prefix now: publish nothing more
            raise RunFailedError(f"lost the lock of {remote.url if remote else out_dir} (its lease of "
                                 f"{cfg.lock_lease_s:g} s expired); raise cache.lock_lease_s and re-run")
        with sigterm_deferred():  # the manifest and the summary agree on what was done, even on `ray job stop`
            manifest.shards[r.stem] = ShardEntry(
                source=r.source, size=ident.size, mtime_ns=ident.mtime_ns,
                content_sha256=ident.sha256 or "", file=r.file, file_bytes=r.file_bytes,
                file_sha256=r.file_sha256, rows=r.rows, errors=len(r.error_records),
                ctime_ns=ident.ctime_ns, inode=ident.inode, etag=ident.etag)
            _save_errors(out_dir, r)
            manifest.save(out_dir)
            if remote is not None:  # the cache file is up already (the labeller put it); the manifest goes last
                remote.push_errors(r.stem)
                remote.push(MANIFEST_NAME)
            result.labelled.append(r.stem)
            result.images += r.rows
            result.decode_errors += len(r.error_records)
        metrics.IMAGES.inc(r.rows)
        metrics.DECODE_ERRORS.inc(len(r.error_records))
        result.teacher_seconds += r.teacher_seconds
        metrics.SHARDS.labels("done").inc()
        metrics.BYTES_WRITTEN.inc(r.file_bytes)

    try:
        if cfg.ray.enabled:
            from teacher_cache.ray_pool import label_with_ray

            connect_ray(cfg.ray.address)
            report = label_with_ray(cfg, fp, tasks, on_result, on_progress)
            result.retried, result.lost_nodes, result.progress_lost = report.retried, report.lost_nodes, \
                report.progress_lost
            if report.lost_nodes:
                log.warning("lost Ray node(s) %s; shards labelled again elsewhere: %s", ", ".join(report.lost_nodes),
                            ", ".join(sorted(report.retried)) or "none")
        else:
            labeler = Labeler(cfg, fp, teacher)
            try:
                for task in tasks:
                    shown = 0

                    def counted(ev: ProgressEvent) -> None:
                        nonlocal shown
                        shown += ev.images
                        on_progress(ev)

                    r = labeler.label_shard(task, counted)
                    if not r.ok and shown:  # a shard that broke half-way gives its images back
                        on_progress(ProgressEvent(images=-shown))
                    on_result(r)
            finally:
                labeler.close()
    finally:
        image_bar.close()
        shard_bar.close()


def complete_identity(ident: ShardIdentity, source: str, before: ShardIdentity | None) -> ShardIdentity:
    """Fill ctime/inode when the labeller reported only size+mtime+hash.

    ``before`` is the full stat taken just before the shard was handed out. If a stat now is identical to it
    (ctime included, which every write moves), the file did not change while it was read, so its ctime and
    inode belong to the hashed content. Otherwise leave them unknown: the next refresh hashes the shard once.
    """
    if (ident.ctime_ns is not None and ident.inode is not None) or ident.etag is not None or is_url(source):
        return ident  # complete already, or an object (its listed identity is all there is)
    try:
        now = ShardIdentity.stat(Path(source))
    except OSError:
        return ident
    if before is not None and now.same_cheap(before) and (now.size, now.mtime_ns) == (ident.size, ident.mtime_ns):
        return replace(ident, ctime_ns=now.ctime_ns, inode=now.inode)
    return ident


def _save_errors(out_dir: Path, r: ShardResult) -> None:
    """Per-shard error files, replaced when a shard is relabelled, so records never duplicate."""
    path = out_dir / ERRORS_DIR / f"{r.stem}.jsonl"
    path.parent.mkdir(exist_ok=True)
    if r.error_records:
        atomic_write(path, "".join(json.dumps(e) + "\n" for e in r.error_records).encode())
    else:
        path.unlink(missing_ok=True)
