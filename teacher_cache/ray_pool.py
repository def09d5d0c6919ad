"""Thin Ray wrapper: a pool of teacher actors, each loads the teacher once and takes whole shards from a queue."""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Callable
from typing import Any

from distill.core.graceful_stop import raise_if_stopping
from distill.core.hooks_for_tests import forwarded_env
from distill.core.ray_cluster import check_fits
from distill.images.shards import ShardIdentity
from distill.teacher_cache.actor_pool import MAX_STARTS_IN_A_ROW, PoolReport, ShardScheduler
from distill.teacher_cache.config import CacheConfig
from distill.teacher_cache.labeler import Labeler, ProgressEvent, ShardResult, ShardTask
from distill.teacher_cache.layout import default_actors
from distill.teacher_cache.placement import resolve_placement

log = logging.getLogger(__name__)


def _labellers_on_this_node(cfg: CacheConfig) -> int:
    """How many labeller actors share this actor's node, from the node's Ray resources (GPUs bind first).

    The node's CPUs are then divided between them (see teacher_cache/layout.py).
    """
    import ray

    from distill.teacher_cache.layout import labellers_per_node

    node_id = ray.get_runtime_context().get_node_id()
    node = next((n for n in ray.nodes() if n.get("NodeID") == node_id), None)
    res = (node or {}).get("Resources", {})
    num, cpus = actor_layout(cfg)
    return labellers_per_node(res.get("CPU", 1.0), res.get("GPU", 0.0), cpus, cfg.ray.gpus_per_actor, num)


def actor_layout(cfg: CacheConfig) -> tuple[int, float]:
    """(ray.num_actors, ray.cpus_per_actor) once `_with_actor_defaults` has filled them in."""
    if cfg.ray.num_actors is None or cfg.ray.cpus_per_actor is None:
        raise RuntimeError("the actor layout is resolved on the driver before any actor starts")
    return cfg.ray.num_actors, cfg.ray.cpus_per_actor


class TeacherActor:
    """Ray actor body: one Labeler (one teacher load) per actor. Threaded (2 calls at once): while `label` runs a
    shard, the driver collects its progress with `take_progress`. Polled, so no channel actor starts beside the
    labellers (a Ray queue actor's start cost 1.3-1.9 s of a 2-core node's first seconds, and a synchronous put
    stalled the first shard until it was up).

    Progress is best effort: events are tagged (shard, attempt) so the driver can take back what a shard that
    died had counted; a finished shard is topped up to its rows, so polls that come late lose nothing.
    """

    def __init__(self, cfg_dict: dict, fingerprint: str) -> None:
        cfg = CacheConfig.model_validate(cfg_dict)
        self.labeler = Labeler(cfg, fingerprint, labellers_on_node=_labellers_on_this_node(cfg))
        self._lock = threading.Lock()
        self._tag: tuple[str, int] = ("", 0)
        self._pending = ProgressEvent()

    def node(self) -> str:
        """The node this actor runs on (also tells the driver the actor is placed and its teacher loaded)."""
        import ray

        return ray.get_runtime_context().get_node_id()

    def _progress(self, ev: ProgressEvent) -> None:
        with self._lock:
            p = self._pending
            p.images += ev.images
            p.errors += ev.errors
            p.batch_seconds.extend(ev.batch_seconds)

    def take_progress(self) -> tuple[tuple[str, int], ProgressEvent]:
        """What the running shard attempt counted since the last call."""
        with self._lock:
            out, self._pending = (self._tag, self._pending), ProgressEvent()
        return out

    def label(self, task: ShardTask, attempt: int = 0) -> ShardResult:
        with self._lock:
            self._tag, self._pending = (task.stem, attempt), ProgressEvent()
        return self.labeler.label_shard(task, self._progress)


class _Progress:
    """Driver side of progress: polls the labelling actors every `every` s; per-attempt counts, so a shard that
    dies gives its images back and a finished one is topped up to its rows."""

    def __init__(self, on_progress: Callable[[ProgressEvent], None], every: float = 0.5) -> None:
        self.on_progress = on_progress
        self.every, self.last = every, 0.0
        self.active: dict[tuple[str, int], int] = {}
        self.polls: dict = {}  # take_progress() ref -> actor

    def begin(self, stem: str, attempt: int) -> None:
        self.active[(stem, attempt)] = 0

    def end(self, stem: str, attempt: int, keep: bool, rows: int = 0) -> None:
        """A shard attempt is over: top its count up to `rows` (it was written) or take it back (it was not)."""
        shown = self.active.pop((stem, attempt), 0)
        if not keep and shown:
            self.on_progress(ProgressEvent(images=-shown))
        elif keep and rows > shown:
            self.on_progress(ProgressEvent(images=rows - shown))

    def add(self, tag: tuple[str, int], ev: ProgressEvent) -> None:
        if tag in self.active:  # events of an attempt that is over arrive late: ignored
            self.active[tag] += ev.images
            self.on_progress(ev)

    def poll(self, busy: list, now: float) -> None:
        """Collect answered polls; every `every` s ask each busy actor that has no poll in flight."""
        import ray

        if self.polls:
            done, _ = ray.wait(list(self.polls), num_returns=len(self.polls), timeout=0)
            for ref in done:
                del self.polls[ref]
                try:
                    tag, ev = ray.get(ref)
                except ray.exceptions.RayError:  # its actor died or was killed: its label() call says so
                    continue
                self.add(tuple(tag), ev)
        if now - self.last >= self.every:
            self.last = now
            asked = {id(a) for a in self.polls.values()}
            for actor in busy:
                if id(actor) not in asked:
                    self.polls[actor.take_progress.remote()] = actor


def label_with_ray(cfg: CacheConfig, fingerprint: str, tasks: list[ShardTask],
                   on_result: Callable[[ShardResult], None], on_progress: Callable[[ProgressEvent], None],
                   pool: PoolRun | None = None) -> PoolReport:
    """Schedule whole shards onto live actors; a dead actor's shard is retried elsewhere (see actor_pool).

    `pool`: actors started already (`open_pool`), given `tasks` now (teacher_cache/head_start.py)."""
    if pool is None:
        pool = open_pool(cfg, fingerprint, len(tasks), on_result, on_progress)
    pool.add(tasks)
    try:
        pool.run()
    finally:
        pool.close()
    report = pool.sched.report
    report.lost_nodes = sorted(n for n in set(report.lost_nodes) if _node_lost(n))
    return report


def _with_actor_defaults(cfg: CacheConfig) -> CacheConfig:
    """Fill `ray.num_actors` / `ray.cpus_per_actor` left empty from the cluster as it is now (layout.py)."""
    import ray

    if cfg.ray.num_actors is not None and cfg.ray.cpus_per_actor is not None:
        return cfg
    node_cpus = [n.get("Resources", {}).get("CPU", 0.0) for n in ray.nodes() if n.get("Alive")]
    num, cpus = default_actors(cfg.ray.gpus_per_actor, node_cpus, ray.cluster_resources().get("GPU", 0.0))
    ray_cfg = cfg.ray.model_copy(update={"num_actors": cfg.ray.num_actors or num,
                                         "cpus_per_actor": cfg.ray.cpus_per_actor if cfg.ray.cpus_per_actor is not None
                                         else cpus})
    log.info("teacher actors: %d x %g CPU, %g GPU", ray_cfg.num_actors, ray_cfg.cpus_per_actor, ray_cfg.gpus_per_actor)
    return cfg.model_copy(update={"ray": ray_cfg})


def open_pool(cfg: CacheConfig, fingerprint: str, shards: int, on_result: Callable[[ShardResult], None],
              on_progress: Callable[[ProgressEvent], None]) -> PoolRun:
    """Start the actors for `shards` shards (at most one each); they get their shards in `label_with_ray`."""
    cfg = resolve_placement(_with_actor_defaults(cfg))  # decided here, once: actors never resolve `auto` themselves
    check_fits([{"CPU": actor_layout(cfg)[1], "GPU": cfg.ray.gpus_per_actor}], "a teacher actor (ray.*_per_actor)")
    pool = PoolRun(cfg, fingerprint, min(actor_layout(cfg)[0], shards), on_result, on_progress)
    pool.start(time.monotonic())
    return pool


class PoolRun:
    """One run of the actor pool: Ray calls in, ShardScheduler decisions out."""

    def __init__(self, cfg: CacheConfig, fingerprint: str, target: int,
                 on_result: Callable[[ShardResult], None], on_progress: Callable[[ProgressEvent], None]) -> None:
        import ray

        self.cfg, self.on_result = cfg, on_result
        self.sched: ShardScheduler = ShardScheduler([], cfg.ray.max_shard_retries, cfg.ray.actor_start_timeout_s,
                                                    cfg.ray.actor_start_deadline_s,
                                                    deadline_of=lambda t: shard_deadline_s(cfg, t))
        self.progress = _Progress(on_progress)
        options: dict = {"num_cpus": cfg.ray.cpus_per_actor, "num_gpus": cfg.ray.gpus_per_actor, "max_restarts": 0,
                         "max_concurrency": 2}  # label() + take_progress()
        if env := forwarded_env():  # faults a test switched on (core/hooks_for_tests.py); never otherwise
            options["runtime_env"] = {"env_vars": env}
        self.actor_cls: Any = ray.remote(**options)(TeacherActor)  # an actor class (ray's stubs type it as the class)
        self.args = (cfg.model_dump(mode="json"), fingerprint)
        self.target = target
        self.ready_refs: dict = {}  # node() ref -> actor
        self.label_refs: dict = {}  # label() ref -> (actor, task, attempt)
        self.node_of: dict[int, str] = {}
        self.last_start_error = ""

    def spawn(self, now: float) -> None:
        actor = self.actor_cls.remote(*self.args)
        self.sched.started(actor, now)
        self.ready_refs[actor.node.remote()] = actor

    def retire(self, actor: Any) -> None:
        """Kill an actor the pool gave up on (broken or hung); its call in flight, if any, is forgotten."""
        import ray

        self.label_refs = {r: v for r, v in self.label_refs.items() if v[0] is not actor}
        with contextlib.suppress(Exception):  # gone already if its node died
            ray.kill(actor)

    def fail(self, task: ShardTask, message: str) -> None:
        self.on_result(ShardResult(stem=task.stem, source=str(task.path), ok=False, message=message))

    def start(self, now: float) -> None:
        for _ in range(self.target):
            self.spawn(now)

    def add(self, tasks: list[ShardTask]) -> None:
        self.sched.add(tasks)

    def answered(self) -> bool:
        """An actor is ready, or failed to start: the pool has something to act on."""
        import ray

        refs = list(self.ready_refs)
        return not refs or bool(ray.wait(refs, num_returns=1, timeout=0)[0])

    def run(self) -> None:
        import ray

        while not self.sched.done:
            raise_if_stopping()  # a SIGTERM swallowed by a best-effort call (a progress poll) ends it here
            for actor, task, attempt in self.sched.assignments(time.monotonic()):
                self.progress.begin(task.stem, attempt)
                self.label_refs[actor.label.remote(task, attempt)] = (actor, task, attempt)
            refs = [*self.label_refs, *self.ready_refs]
            done = ray.wait(refs, num_returns=1, timeout=0.25)[0] if refs else []
            if not refs:
                time.sleep(0.25)
            self.progress.poll([v[0] for v in self.label_refs.values()], time.monotonic())
            for ref in done:
                if ref in self.ready_refs:
                    self.on_ready(ref)
                else:
                    self.on_label(ref)
            self.housekeeping()

    def on_ready(self, ref: Any) -> None:
        import ray

        actor = self.ready_refs.pop(ref)
        try:
            self.node_of[id(actor)] = ray.get(ref)
            self.sched.ready(actor, time.monotonic())
        except ray.exceptions.RayError as exc:  # its node died, or the teacher did not load
            self.sched.start_failed(actor)
            self.last_start_error = _one_line(exc)
            log.warning("a teacher actor failed to start: %s", self.last_start_error)

    def on_label(self, ref: Any) -> None:
        import ray

        actor, task, attempt = self.label_refs.pop(ref)
        try:
            result = ray.get(ref)
        except ray.exceptions.RayActorError as exc:  # the actor (or its node) died mid-shard
            self.progress.end(task.stem, attempt, keep=False)
            _, requeued = self.sched.actor_died(actor)
            with contextlib.suppress(Exception):
                ray.kill(actor)
            _note_death(self.sched.report, self.node_of.get(id(actor)), task.stem, exc)
            if not requeued:
                self.fail(task, f"{task.path}: the teacher actor died {attempt + 1} time(s) while labelling this "
                                f"shard (last: {_one_line(exc)}); raise ray.max_shard_retries or check the nodes")
            return
        except ray.exceptions.RayTaskError as exc:  # not a shard error (the labeller returns those): a CUDA error,
            self.progress.end(task.stem, attempt, keep=False)  # OOM, a bug; the actor may be broken for good
            _, requeued = self.sched.actor_broken(actor)
            self.retire(actor)
            log.warning("the labeller raised on %s (%s); replacing its actor%s", task.stem, _one_line(exc),
                        " and retrying the shard" if requeued else "")
            if not requeued:
                self.fail(task, f"{task.path}: the labeller failed on {attempt + 1} actor(s), each replaced "
                                f"after its failure (last: {_one_line(exc)})")
            return
        self.sched.finished(actor)
        self.progress.end(task.stem, attempt, keep=result.ok, rows=result.rows)
        self.on_result(result)

    def housekeeping(self) -> None:
        """Drop actors that were never placed, start replacements, fail shards no actor will take."""
        import ray

        now = time.monotonic()
        for actor, task, attempt, requeued in self.sched.hung(now):
            self.progress.end(task.stem, attempt, keep=False)
            self.retire(actor)
            limit = shard_deadline_s(self.cfg, task)
            log.warning("%s: no result within %.0f s; killed its actor%s", task.stem, limit,
                        ", retrying the shard on another" if requeued else "")
            if not requeued:
                self.fail(task, f"{task.path}: no result within {limit:.0f} s on {attempt + 1} attempt(s), each on "
                                "a fresh actor (a hung decode or read?); the deadline is ray.shard_timeout_s + "
                                "ray.shard_timeout_s_per_mb x shard MB x views: raise them if the shard is just slow")
        for actor in self.sched.overdue(now):
            log.warning("a teacher actor was not placed within %.0f s; going on without it (the cluster has %s)",
                        self.cfg.ray.actor_start_timeout_s, _resources_text())
            self.ready_refs = {r: a for r, a in self.ready_refs.items() if a is not actor}
            ray.kill(actor)
        while self.sched.wants_replacement(self.target):  # all in one tick: one round if they are dropped
            self.spawn(now)
        if self.sched.gave_up_waiting or not self.last_start_error:
            why = f"none started within {self.cfg.ray.actor_start_deadline_s:g} s (ray.actor_start_deadline_s): " \
                  "other jobs may hold the resources"
        else:
            why = f"{MAX_STARTS_IN_A_ROW} actor starts in a row failed; last: {self.last_start_error}"
        for task in self.sched.stranded():
            self.fail(task, f"{task.path}: no teacher actor is left to label it ({why}; the cluster has "
                            f"{_resources_text()})")

    def close(self) -> None:
        import ray

        for actor in self.sched.live_actors():
            ray.kill(actor)


def shard_deadline_s(cfg: CacheConfig, task: ShardTask) -> float:
    """Seconds one attempt at a shard may take before its actor counts as hung: a base plus a share per MB and
    view, so a big shard or many views get more time; an unreadable size counts as 0 MB."""
    try:
        size = ShardIdentity.stat(task.path).size
    except OSError:
        size = 0
    return cfg.ray.shard_timeout_s + cfg.ray.shard_timeout_s_per_mb * size / 1e6 * cfg.views.num_views


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split())[:300] or exc.__class__.__name__


def _note_death(report: PoolReport, node: str | None, stem: str, exc: BaseException) -> None:
    import ray

    # Ray says "unavailable" when it cannot reach an actor it has not declared dead: its result is lost all the same,
    # so the actor is killed (it must not publish the shard beside its retry) and the shard goes elsewhere
    what = "was unreachable (killed)" if isinstance(exc, ray.exceptions.ActorUnavailableError) else "died"
    log.warning("teacher actor on node %s %s while labelling %s: %s", (node or "?")[:12], what, stem, _one_line(exc))
    if node and node not in report.lost_nodes:
        report.lost_nodes.append(node)  # a suspect until _node_lost() confirms it at the end


def _node_lost(node_id: str) -> bool:
    """Dead to the GCS, or its raylet no longer answers (the GCS notices a SIGKILLed node only after ~30 s)."""
    import socket

    import ray

    info = next((n for n in ray.nodes() if n["NodeID"] == node_id), None)
    if info is None or not info["Alive"]:
        return True
    try:
        with socket.create_connection((info["NodeManagerAddress"], info["NodeManagerPort"]), timeout=2):
            return False
    except OSError:
        return True


def _resources_text() -> str:
    import ray

    total = ray.cluster_resources()
    return f"{total.get('CPU', 0):g} CPU, {total.get('GPU', 0):g} GPU in total"
