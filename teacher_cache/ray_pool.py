"""Thin Ray wrapper: a pool of teacher actors, each loads the teacher once and takes whole shards from a queue."""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable

from teacher_cache.config import CacheConfig
from teacher_cache.labeler import Labeler, ProgressEvent, ShardResult, ShardTask
from teacher_cache.ray_resources import StartDeadline, check_fits

log = logging.getLogger(__name__)


class ClusterConnectionError(ConnectionError):
    """The Ray cluster named by --address / RAY_ADDRESS cannot be reached or refuses us."""


_HINT = ("check --address / RAY_ADDRESS (host:port of the GCS, or ray://host:10001); with Ray's token auth set "
         "RAY_AUTH_MODE=token and put the cluster's token in ~/.ray/auth_token")


def check_address(address: str, timeout: float = 3.0) -> None:
    """Fail in seconds, not minutes: ray.init retries an unreachable GCS for a long time."""
    import socket

    if address == "auto":
        return
    hostport = address.split("://", 1)[-1].rstrip("/")
    host, _, port = hostport.rpartition(":")
    if not host or not port.isdigit():
        raise ClusterConnectionError(f"Ray address '{address}' is not host:port or ray://host:port; {_HINT}")
    try:
        with socket.create_connection((host, int(port)), timeout=timeout):
            pass
    except OSError as exc:
        raise ClusterConnectionError(f"cannot reach the Ray cluster at {address} ({exc.strerror or exc}); "
                                     f"{_HINT}") from None


def connect_ray(address: str | None, num_cpus: int | None = None) -> bool:
    """Connect to `address` / RAY_ADDRESS, or start a local cluster bound to 127.0.0.1. True if we started it."""
    import ray

    if ray.is_initialized():
        return False
    address = address or os.environ.get("RAY_ADDRESS")
    if address:
        check_address(address)
        try:
            ray.init(address=address, log_to_driver=True)
        except (ConnectionError, RuntimeError, ValueError, PermissionError) as exc:
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else exc.__class__.__name__
            raise ClusterConnectionError(f"cannot join the Ray cluster at {address}: {first}; {_HINT}") from None
        return True
    keep_ray_on_loopback()
    ray.init(address="local", num_cpus=num_cpus, include_dashboard=False, _node_ip_address="127.0.0.1",
             log_to_driver=True)
    return True


def keep_ray_on_loopback() -> None:
    """A local cluster must not listen on routable addresses (tests, demo, laptops).

    Ray reads RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER once, at import; with it off, every listener binds 127.0.0.1.
    Set it for the processes Ray spawns and for this already-imported process.
    """
    os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
    from ray._private import ray_constants

    ray_constants.ENABLE_RAY_CLUSTER = False


class TeacherActor:
    """Ray actor body: one Labeler (one teacher load) per actor; progress goes to a Ray queue."""

    def __init__(self, cfg_dict: dict, fingerprint: str, progress_queue: object) -> None:
        self.labeler = Labeler(CacheConfig.model_validate(cfg_dict), fingerprint)
        self.queue = progress_queue
        self._pending = ProgressEvent()
        self._last = 0.0

    def _progress(self, ev: ProgressEvent) -> None:
        p = self._pending
        p.images += ev.images
        p.errors += ev.errors
        p.batch_seconds.extend(ev.batch_seconds)
        if time.monotonic() - self._last > 0.5:
            self.flush()

    def flush(self) -> None:
        if self._pending.images or self._pending.errors or self._pending.batch_seconds:
            self.queue.put_nowait(self._pending)  # type: ignore[attr-defined]
            self._pending = ProgressEvent()
        self._last = time.monotonic()

    def label(self, task: ShardTask) -> ShardResult:
        try:
            return self.labeler.label_shard(task, self._progress)
        finally:
            self.flush()


def label_with_ray(cfg: CacheConfig, fingerprint: str, tasks: list[ShardTask],
                   on_result: Callable[[ShardResult], None], on_progress: Callable[[ProgressEvent], None]) -> None:
    """Schedule whole shards onto free actors; an actor that dies fails only its shard and is replaced."""
    import ray
    from ray.util.queue import Queue

    check_fits([{"CPU": cfg.ray.cpus_per_actor, "GPU": cfg.ray.gpus_per_actor}], "a teacher actor (ray.*_per_actor)")
    progress_q = Queue(actor_options={"num_cpus": 0})
    actor_cls = ray.remote(num_cpus=cfg.ray.cpus_per_actor, num_gpus=cfg.ray.gpus_per_actor,
                           max_restarts=0)(TeacherActor)
    cfg_dict = cfg.model_dump(mode="json")

    def spawn() -> object:
        return actor_cls.remote(cfg_dict, fingerprint, progress_q)

    idle = [spawn() for _ in range(min(cfg.ray.num_actors, len(tasks)))]
    started = StartDeadline(idle, "teacher actor")
    todo = list(tasks)
    pending: dict = {}
    try:
        while todo or pending:
            while idle and todo:
                actor, task = idle.pop(), todo.pop(0)
                pending[actor.label.remote(task)] = (actor, task)
            done, _ = ray.wait(list(pending), num_returns=1, timeout=0.25)
            started.check()
            _drain(progress_q, on_progress)
            for ref in done:
                actor, task = pending.pop(ref)
                try:
                    result = ray.get(ref)
                    idle.append(actor)
                except (ray.exceptions.RayActorError, ray.exceptions.RayTaskError) as exc:
                    msg = " ".join(str(exc).split())[:300]
                    result = ShardResult(stem=task.stem, source=str(task.path), ok=False,
                                         message=f"{task.path}: labeller failed: {msg}")
                    ray.kill(actor)
                    if todo:
                        idle.append(spawn())
                on_result(result)
        _drain(progress_q, on_progress)
    finally:
        for actor, _ in pending.values():
            ray.kill(actor)
        for actor in idle:
            ray.kill(actor)
        ray.kill(progress_q.actor)


def _drain(q: object, on_progress: Callable[[ProgressEvent], None]) -> None:
    while not q.empty():  # type: ignore[attr-defined]
        on_progress(q.get_nowait())  # type: ignore[attr-defined]
