"""Shard scheduling over teacher actors that may die: retries, placement deadlines, lost-node bookkeeping.

Pure bookkeeping (no Ray import), so the rules are unit-tested without a cluster; `ray_pool` drives it with
real actors. The rules:

- a shard whose actor died (node lost, OOM, killed) goes back to the FRONT of the queue and is retried on a
  live actor, up to `max_retries` times; then it fails with the reason;
- a shard whose labeller raised (the actor is alive) fails at once: the same input would fail again;
- one replacement is started per dead actor while work remains; an actor that is not placed (and loaded)
  within the deadline while other actors work is dropped, and the run finishes with the actors it has;
  after `MAX_STARTS_IN_A_ROW` starts in a row that failed or were dropped, no more replacements are tried
  while other actors still work;
- when the last actor dies, one is always started again (the cluster has room now, unless the node went with
  it) and waited for up to `alone_deadline_s`; only when it cannot start (constructor errors in a row, or the
  deadline) do the remaining shards fail, with one clear reason.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from typing import Generic, TypeVar

A = TypeVar("A")  # an actor handle (opaque here)
T = TypeVar("T")  # a task (anything with a `stem`)
MAX_STARTS_IN_A_ROW = 3  # failed or dropped actor starts before the pool stops asking for replacements


@dataclass
class PoolReport:
    """What happened to the pool, for the run summary."""

    retried: dict[str, int] = field(default_factory=dict)  # stem -> times it was put back
    lost_nodes: list[str] = field(default_factory=list)  # nodes whose actors died with them
    actors_died: int = 0
    actors_dropped: int = 0  # replacements never placed within the deadline
    progress_lost: bool = False  # the progress channel died; counts come from finished shards anyway


@dataclass
class _Starting(Generic[A]):
    actor: A
    since: float


class ShardScheduler(Generic[A, T]):
    """Which shard goes to which actor, and what a death or a deadline means."""

    def __init__(self, tasks: list[T], max_retries: int, start_timeout_s: float,
                 alone_deadline_s: float = float("inf")) -> None:
        self.todo: deque[tuple[T, int]] = deque((t, 0) for t in tasks)
        self.max_retries = max_retries
        self.start_timeout_s = start_timeout_s
        self.alone_deadline_s = alone_deadline_s
        self.idle: list[A] = []
        self.busy: dict[int, tuple[A, T, int]] = {}  # id(actor) -> (actor, task, attempt)
        self.starting: dict[int, _Starting[A]] = {}
        self.report = PoolReport()
        self.failed_starts = 0  # in a row: the constructor raised or the node died before it was ready
        self.dropped_starts = 0  # in a row: not placed within start_timeout_s while other actors worked
        self.gave_up_waiting = False  # alone, and no actor was placed within alone_deadline_s

    # actor lifecycle -------------------------------------------------------------------------------------
    def started(self, actor: A, now: float) -> None:
        self.starting[id(actor)] = _Starting(actor, now)

    def ready(self, actor: A) -> None:
        if self.starting.pop(id(actor), None) is not None:
            self.idle.append(actor)
            self.failed_starts = self.dropped_starts = 0

    def start_failed(self, actor: A) -> None:
        """The actor died before it was ready (its node went away, or its constructor raised)."""
        if self.starting.pop(id(actor), None) is not None:
            self.report.actors_died += 1
            self.failed_starts += 1

    def overdue(self, now: float) -> list[A]:
        """Starting actors past the deadline while others work: dropped (the caller kills them).

        With no live actor there is nothing to go on with: keep waiting (a busy cluster places them later; an
        infeasible request is refused before the run by the resource check), up to `alone_deadline_s`.
        """
        alone = not (self.idle or self.busy)
        limit = self.alone_deadline_s if alone else self.start_timeout_s
        late = [s.actor for s in self.starting.values() if now - s.since > limit]
        for actor in late:
            del self.starting[id(actor)]
            self.report.actors_dropped += 1
        self.dropped_starts += len(late)
        self.gave_up_waiting = self.gave_up_waiting or bool(late and alone)
        return late

    # work ------------------------------------------------------------------------------------------------
    def assignments(self) -> list[tuple[A, T]]:
        out = []
        while self.idle and self.todo:
            actor = self.idle.pop()
            task, attempt = self.todo.popleft()
            self.busy[id(actor)] = (actor, task, attempt)
            out.append((actor, task))
        return out

    def finished(self, actor: A) -> T:
        """The shard came back (ok or not, from the labeller itself): the actor is free again."""
        _, task, _ = self.busy.pop(id(actor))
        self.idle.append(actor)
        return task

    def actor_died(self, actor: A) -> tuple[T, bool]:
        """The actor died while labelling: (its task, whether that task was queued again)."""
        _, task, attempt = self.busy.pop(id(actor))
        self.report.actors_died += 1
        if attempt < self.max_retries:
            self.todo.appendleft((task, attempt + 1))
            stem = task.stem  # type: ignore[attr-defined]
            self.report.retried[stem] = self.report.retried.get(stem, 0) + 1
            return task, True
        return task, False

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
        return [*self.idle, *(a for a, _, _ in self.busy.values()), *(s.actor for s in self.starting.values())]
