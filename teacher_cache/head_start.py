"""A local Ray run's first seconds, put to work: the driver labels shards while Ray and the teacher actors start.

Before an actor labels anything, Ray's processes start and each teacher actor imports torch and loads the teacher:
on a quiet 2-core node 4.4 s + 4 s, as long as labelling 2,048 images (BENCHMARKS.md, issue 31). The driver has the
teacher loaded already (the fingerprint needs it). So when this run starts a local cluster itself (no `ray.address`,
no RAY_ADDRESS, Ray not yet up in this process: the driver's CPUs are then the cluster's), the driver labels shards
in a background thread, a whole shard at a time, with the same labeller as `--no-ray`, while the main thread starts
Ray and the actors (actors created from another thread were never placed) and receives the results (manifest writes
and SIGTERM belong to the main thread). Once an actor is ready (or failed to start) the remaining shards go to the
pool, which retries and replaces actors as before (teacher_cache/actor_pool.py). A Ray Data pipeline's read tasks
run while its actor loads in the same way. On a cluster the driver labels nothing: it may run on a head node with no
room for a teacher. `ray.label_while_starting: false` turns it off.
"""

from __future__ import annotations

import contextlib
import logging
import os
import queue
import threading
import time
from collections.abc import Callable

from distill.core import hooks_for_tests
from distill.core.graceful_stop import sigterm_deferred
from distill.core.ray_cluster import check_fits, connect_ray
from distill.teacher.load import LoadedTeacher
from distill.teacher_cache.actor_pool import PoolReport
from distill.teacher_cache.config import CacheConfig
from distill.teacher_cache.labeler import ProgressEvent, ShardResult, ShardTask, label_in_process
from distill.teacher_cache.ray_pool import label_with_ray, open_pool

log = logging.getLogger(__name__)


def driver_labels(cfg: CacheConfig) -> bool:
    """Whether this run starts a local cluster itself, and so may label on the driver while it starts."""
    import ray

    return (cfg.ray.label_while_starting and not cfg.ray.address and not os.environ.get("RAY_ADDRESS")
            and not ray.is_initialized())


def label_on_ray(cfg: CacheConfig, fp: str, teacher: LoadedTeacher, tasks: list[ShardTask],
                 on_result: Callable[[ShardResult], None], on_progress: Callable[[ProgressEvent], None],
                 on_driver: list[str] | None = None) -> PoolReport:
    """Label `tasks` with Ray's teacher actors; on a local cluster started here, the driver labels the first ones
    (their stems are appended to `on_driver` as they are passed to `on_result`, also when the run fails)."""
    head = driver_labels(cfg)
    if head:
        _check_fits_this_node(cfg)  # bad input stays "nothing done": checked before the driver labels anything
    labeller = _DriverLabeller(cfg, fp, teacher, tasks, on_driver if on_driver is not None else []) if head else None
    pool = None
    try:
        t0 = time.perf_counter()
        connect_ray(cfg.ray.address)  # in this thread: actors spawned from another thread were never placed
        ray_start_s = time.perf_counter() - t0
        log.info("Ray: connected in %.1f s", ray_start_s)  # SIGTERM is ours again from here (graceful_stop.py)
        if labeller is None:
            report = label_with_ray(cfg, fp, tasks, on_result, on_progress)
            report.ray_start_s = ray_start_s
            return report
        # SIGTERM is raised between these calls, never inside Ray's Python code or a queue's lock (an exception raised
        # there can leave a lock held, and the stop path below hung once on a loaded machine)
        with sigterm_deferred():
            pool = open_pool(cfg, fp, len(tasks), on_result, on_progress)
        while True:
            with sigterm_deferred():
                if not labeller.running(on_result, on_progress):
                    break
                if pool.answered():  # an actor is ready (or failed to start): it takes over after this shard
                    labeller.stop()
    except BaseException:
        if labeller is not None:  # what it finished is recorded before the error (or the stop) goes on
            with contextlib.suppress(BaseException):
                labeller.finish(on_result, on_progress)
        if pool is not None:
            pool.close()
        raise
    rest = labeller.finish(on_result, on_progress)
    if labeller.done:
        log.info("labelled %d shard(s) in this process while Ray and the teacher actors started; %d left for the "
                 "actors", len(labeller.done), len(rest))
    report = label_with_ray(cfg, fp, rest, on_result, on_progress, pool=pool)
    report.labelled_on_driver, report.ray_start_s = list(labeller.done), ray_start_s
    return report


def _check_fits_this_node(cfg: CacheConfig) -> None:
    """What `open_pool` checks against the cluster, checked against this node before the cluster exists."""
    if cfg.ray.cpus_per_actor is None and cfg.ray.gpus_per_actor == 0:
        return  # the defaults are sized from the cluster itself
    try:
        from ray._private.utils import get_num_cpus  # what a local cluster registers (cgroup limits included)

        cpus = float(get_num_cpus())
    except (ImportError, AttributeError):
        cpus = float(len(os.sched_getaffinity(0)))
    import torch

    gpus = float(torch.cuda.device_count()) if torch.cuda.is_available() else 0.0
    check_fits([{"CPU": cfg.ray.cpus_per_actor or 0.0, "GPU": cfg.ray.gpus_per_actor}],
               "a teacher actor (ray.*_per_actor)", nodes=[{"CPU": cpus, "GPU": gpus}])


class _DriverLabeller:
    """The driver's labeller in a thread, whole shards until `stop()`; its results and progress are handed to the
    main thread (`running`, `finish`), where the manifest is written and SIGTERM arrives."""

    def __init__(self, cfg: CacheConfig, fp: str, teacher: LoadedTeacher, tasks: list[ShardTask],
                 done: list[str]) -> None:
        self.done = done  # stems of the results passed on
        self.rest: list[ShardTask] = list(tasks)
        self._events: queue.Queue = queue.Queue()
        self._stop = threading.Event()
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, args=(cfg, fp, teacher), name="driver-labeller",
                                        daemon=True)
        self._thread.start()

    def _run(self, cfg: CacheConfig, fp: str, teacher: LoadedTeacher) -> None:
        cap = hooks_for_tests.driver_shard_cap()  # None unless a test set it
        finished = 0

        def on_result(r: ShardResult) -> None:
            nonlocal finished
            finished += 1
            self._events.put(r)

        def until() -> bool:
            return self._stop.is_set() or (cap is not None and finished >= cap)

        try:
            self.rest = label_in_process(cfg, fp, teacher, self.rest, on_result, self._events.put, until=until,
                                         labellers_on_node=2)  # the node is shared with Ray's and the actors' start
        except BaseException as exc:  # noqa: BLE001 - raised again in the main thread by finish()
            self._error = exc

    def stop(self) -> None:
        self._stop.set()

    def running(self, on_result: Callable[[ShardResult], None], on_progress: Callable[[ProgressEvent], None],
                wait_s: float = 0.1) -> bool:
        """Pass on what the thread reported; whether it still labels."""
        alive = self._thread.is_alive()
        with contextlib.suppress(queue.Empty):
            item = self._events.get(timeout=wait_s)
            while True:
                self._deliver(item, on_result, on_progress)
                item = self._events.get_nowait()
        return alive

    def finish(self, on_result: Callable[[ShardResult], None], on_progress: Callable[[ProgressEvent], None]
               ) -> list[ShardTask]:
        """Stop after the shard in hand, pass on everything, raise the thread's error; the shards not labelled."""
        self.stop()
        first: BaseException | None = None
        while True:  # every result is passed on, even after one of them raised (a SIGTERM deferred in on_result)
            try:
                with sigterm_deferred():
                    if not self.running(on_result, on_progress) and self._events.empty():
                        break
            except BaseException as exc:  # noqa: BLE001 - the first one is raised below
                first = first or exc
                if self._events.empty() and not self._thread.is_alive():
                    break
        if first is not None or self._error is not None:
            raise first or self._error  # type: ignore[misc]
        return self.rest

    def _deliver(self, item: ShardResult | ProgressEvent, on_result: Callable[[ShardResult], None],
                 on_progress: Callable[[ProgressEvent], None]) -> None:
        if isinstance(item, ShardResult):
            self.done.append(item.stem)
            on_result(item)
        else:
            on_progress(item)
