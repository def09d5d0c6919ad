"""Shard scheduling over teacher actors that may die: retries, placement deadlines, lost-node bookkeeping.

Pure bookkeeping (no Ray import), so the rules are unit-tested without a cluster; `ray_pool` drives it with
real actors. The rules:

- a shard whose actor died (node lost, OOM, killed) goes back to the FRONT of the queue and is retried on a
  live actor, up to `max_retries` times; then it fails with the reason;
- a shard whose labeller raised something other than a shard error (a sticky CUDA error, OOM: the labeller
  catches shard errors itself) retires its actor, which may be broken for good, and is retried the same way;
- a shard past its deadline (`deadline_of(task)` seconds after it was handed out: a hung decode or read)
  retires its actor (the caller kills it) and is retried the same way;
- one replacement is started per retired actor while work remains; an actor that is not placed (and loaded)
  within the start timeout while other actors work is dropped, and the run finishes with the actors it has.
  The timeout counts from the later of its start and the last time an actor became ready: while actors keep
  arriving (an autoscaling cluster adding nodes one by one) the cluster is still growing, so the others are
  not dropped the moment the first one is ready. Actors dropped in one check count as one failed round (they
  waited for the same capacity); after `MAX_STARTS_IN_A_ROW` rounds of starts that failed or were dropped, no
  more replacements are tried while other actors still work;
- when the last actor dies, one is always started again (the cluster has room now, unless the node went with
  it) and waited for up to `alone_deadline_s`; only when it cannot start (constructor errors in a row, or the
  deadline) do the remaining shards fail, with one clear reason.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Generic, TypeVar

A = TypeVar("A")  # an actor handle (opaque here)
T = TypeVar("T")  # a task (anything with a `stem`)
MAX_STARTS_IN_A_ROW = 3  # failed starts, or rounds of dropped starts, before the pool stops asking for more


@dataclass
class PoolReport:
    """What happened to the pool, for the run summary."""

    retried: dict[str, int] = field(default_factory=dict)  # stem -> times it was put back
    lost_nodes: list[str] = field(default_factory=list)  # nodes whose actors died with them
    actors_died: int = 0
    actors_dropped: int = 0  # replacements never placed within the deadline
    actors_retired: int = 0  # alive but replaced: the labeller raised (maybe broken for good) or a shard hung
    timed_out: dict[str, int] = field(default_factory=dict)  # stem -> attempts that passed the shard deadline
    labelled_on_driver: list[str] = field(default_factory=list)  # while the actors started (head_start.py)
    ray_start_s: float = 0.0  # connecting to Ray, or starting a local cluster (0 when this process was connected)


@dataclass
class _Starting(Generic[A]):
    actor: A
    since: float


@dataclass
class _Busy(Generic[A, T]):
    actor: A
    task: T
    attempt: int
    deadline: float  # monotonic time after which the shard counts as hung


class ShardScheduler(Generic[A, T]):
    """Which shard goes to which actor, and what a death or a deadline means."""

    def __init__(self, tasks: list[T], max_retries: int, start_timeout_s: float,
                 alone_deadline_s: float = float("inf"), deadline_of: Callable[[T], float] | None = None) -> None:
        self.todo: deque[tuple[T, int]] = deque((t, 0) for t in tasks)
        self.max_retries = max_retries
        self.start_timeout_s = start_timeout_s
        self.alone_deadline_s = alone_deadline_s
        self.deadline_of = deadline_of  # seconds one attempt at a task may take; None = no deadline
        self.idle: list[A] = []
        self.busy: dict[int, _Busy[A, T]] = {}  # id(actor) -> what it labels
        self.starting: dict[int, _Starting[A]] = {}
        self.report = PoolReport()
        self.failed_starts = 0  # in a row: the constructor raised or the node died before it was ready
        self.dropped_starts = 0  # rounds in a row: not placed within start_timeout_s while other actors worked
        self.gave_up_waiting = False  # alone, and no actor was placed within alone_deadline_s
        self.last_ready = float("-inf")  # when an actor last became ready: the cluster was growing then

    # actor lifecycle -------------------------------------------------------------------------------------
    def started(self, actor: A, now: float) -> None:
        self.starting[id(actor)] = _Starting(actor, now)

    def ready(self, actor: A, now: float) -> None:
        if self.starting.pop(id(actor), None) is not None:
            self.idle.append(actor)
            self.failed_starts = self.dropped_starts = 0
            self.last_ready = max(self.last_ready, now)

    def start_failed(self, actor: A) -> None:
        """The actor died before it was ready (its node went away, or its constructor raised)."""
        if self.starting.pop(id(actor), None) is not None:
            self.report.actors_died += 1
            self.failed_starts += 1

    def overdue(self, now: float) -> list[A]:
        """Starting actors past the start timeout while others work: dropped (the caller kills them).

        The timeout runs from the later of the actor's start and the last time any actor became ready, so a
        cluster that is still adding nodes is not cut off when its first node arrives. With no live actor
        there is nothing to go on with: keep waiting (a busy cluster places them later; an infeasible
        request is refused before the run by the resource check), up to `alone_deadline_s` from its start.
        """
        alone = not (self.idle or self.busy)
        if alone:
            late = [s.actor for s in self.starting.values() if now - s.since > self.alone_deadline_s]
        else:
            late = [s.actor for s in self.starting.values()
                    if now - max(s.since, self.last_ready) > self.start_timeout_s]
        for actor in late:
            del self.starting[id(actor)]
            self.report.actors_dropped += 1
        self.dropped_starts += bool(late)  # one round: they all waited for the same capacity
        self.gave_up_waiting = self.gave_up_waiting or bool(late and alone)
        return late

    # work ------------------------------------------------------------------------------------------------
    def add(self, tasks: list[T]) -> None:
        """Queue more tasks (first attempts), after the ones queued already."""
        self.todo.extend((t, 0) for t in tasks)

    def assignments(self, now: float) -> list[tuple[A, T, int]]:
        """(actor, task, attempt) for every idle actor that gets a queued task now."""
        out = []
        while self.idle and self.todo:
            actor = self.idle.pop()
            task, attempt = self.todo.popleft()
            limit = self.deadline_of(task) if self.deadline_of is not None else float("inf")
            self.busy[id(actor)] = _Busy(actor, task, attempt, now + limit)
            out.append((actor, task, attempt))
        return out

    def finished(self, actor: A) -> T:
        """The shard came back (ok or not, from the labeller itself): the actor is free again."""
        task = self.busy.pop(id(actor)).task
        self.idle.append(actor)
        return task

    def actor_died(self, actor: A) -> tuple[T, bool]:
        """The actor died while labelling: (its task, whether that task was queued again)."""
        self.report.actors_died += 1
        return self._retry(self.busy.pop(id(actor)))

    def actor_broken(self, actor: A) -> tuple[T, bool]:
        """The labeller raised something other than a shard error: the actor may be broken for good (a sticky
        CUDA error, OOM), so it is retired (the caller kills it) and its shard retried on another actor."""
        self.report.actors_retired += 1
        return self._retry(self.busy.pop(id(actor)))

    def hung(self, now: float) -> list[tuple[A, T, int, bool]]:
        """Shards past their deadline: (actor, task, attempt, queued again); each actor is retired (the caller
        kills it: a blocked read cannot be interrupted any other way)."""
        out = []
        for b in [b for b in self.busy.values() if now > b.deadline]:
            del self.busy[id(b.actor)]
            self.report.actors_retired += 1
            stem = b.task.stem  # type: ignore[attr-defined]
            self.report.timed_out[stem] = self.report.timed_out.get(stem, 0) + 1
            out.append((b.actor, b.task, b.attempt, self._retry(b)[1]))
        return out

    def _retry(self, b: _Busy[A, T]) -> tuple[T, bool]:
        if b.attempt < self.max_retries:
            self.todo.appendleft((b.task, b.attempt + 1))
            stem = b.task.stem  # type: ignore[attr-defined]
            self.report.retried[stem] = self.report.retried.get(stem, 0) + 1
            return b.task, True
        return b.task, False

    def wants_replacement(self, target: int) -> bool:
        """Start another actor only while queued work exceeds what live and starting actors can take.

        With no actor left at all, one is always wanted while work is queued (slow placements before do not
        count: nothing else can do the work), unless starts keep failing or the alone deadline passed.
        """
        if self.gave_up_waiting or self.failed_starts >= MAX_STARTS_IN_A_ROW or not self.todo:
            return False
        live = len(self.idle) + len(self.busy) + len(self.starting)
        if live == 0:
            return True
        return (self.dropped_starts + self.failed_starts < MAX_STARTS_IN_A_ROW and live < target
                and len(self.todo) > len(self.idle) + len(self.starting))

    def stranded(self) -> list[T]:
        """Queued shards that no actor will ever take (none live, none starting, none worth starting): they fail."""
        if self.idle or self.busy or self.starting or self.wants_replacement(1):
            return []
        out = [t for t, _ in self.todo]
        self.todo.clear()
        return out

    @property
    def done(self) -> bool:
        return not self.todo and not self.busy

    def live_actors(self) -> list[A]:
        return [*self.idle, *(b.actor for b in self.busy.values()), *(s.actor for s in self.starting.values())]
