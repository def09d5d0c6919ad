"""The shard scheduling rules of the cache's actor pool (no Ray: actors are plain objects here)."""

from __future__ import annotations

from dataclasses import dataclass

from distill.teacher_cache.actor_pool import MAX_STARTS_IN_A_ROW, ShardScheduler


@dataclass(frozen=True)
class Task:
    stem: str


def _pool(n_tasks: int, retries: int = 2, timeout: float = 10.0) -> tuple[ShardScheduler, list[Task]]:
    tasks = [Task(f"s{i}") for i in range(n_tasks)]
    return ShardScheduler(tasks, retries, timeout), tasks


def test_dead_actor_requeues_its_shard_first_and_a_live_actor_takes_it():
    sched, tasks = _pool(4)
    a, b = object(), object()
    for actor in (a, b):
        sched.started(actor, 0.0)
        sched.ready(actor, 0.0)
    given = {id(x): t for x, t, _ in sched.assignments(0.0)}
    lost = given[id(b)]
    task, requeued = sched.actor_died(b)
    assert task == lost and requeued and sched.report.retried == {lost.stem: 1}
    sched.finished(a)
    (actor, nxt, _), = sched.assignments(0.0)
    assert actor is a and nxt == lost  # the retried shard goes first, to the surviving actor


def test_retry_limit_then_the_shard_fails():
    sched, tasks = _pool(1, retries=1)
    for _ in range(2):
        actor = object()
        sched.started(actor, 0.0)
        sched.ready(actor, 0.0)
        (_, task, _), = sched.assignments(0.0)
        _, requeued = sched.actor_died(actor)
    assert not requeued and sched.done and sched.report.retried == {"s0": 1}


def test_unplaced_replacement_is_dropped_after_the_deadline_and_the_survivor_finishes():
    sched, tasks = _pool(3, timeout=5.0)
    survivor, dead = object(), object()
    for actor in (survivor, dead):
        sched.started(actor, 0.0)
        sched.ready(actor, 0.0)
    sched.assignments(0.0)
    sched.actor_died(dead)
    assert sched.wants_replacement(2)
    replacement = object()
    sched.started(replacement, 1.0)
    assert not sched.wants_replacement(2)  # one replacement per death, not one per loop
    assert sched.overdue(5.5) == [] and sched.overdue(6.5) == [replacement]
    assert sched.report.actors_dropped == 1 and sched.stranded() == []  # the survivor is still there
    finished = 0
    sched.finished(survivor)
    while not sched.done:
        for actor, _, _ in sched.assignments(0.0):
            sched.finished(actor)
            finished += 1
    assert finished == 2  # the retried shard and the one never started


def test_with_no_live_actor_a_slow_start_is_waited_for_not_dropped():
    sched, tasks = _pool(3, timeout=1.0)
    actor = object()
    sched.started(actor, 0.0)
    assert sched.overdue(100.0) == [] and sched.stranded() == []  # nothing else could do the work: wait


def test_with_no_live_actor_the_hard_deadline_strands_the_queue():
    sched = ShardScheduler([Task("s0")], 2, 1.0, alone_deadline_s=50.0)
    actor = object()
    sched.started(actor, 0.0)
    assert sched.overdue(49.0) == [] and sched.overdue(51.0) == [actor]
    assert [t.stem for t in sched.stranded()] == ["s0"]


def test_no_actor_left_strands_the_queue_with_all_shards_named():
    sched, tasks = _pool(3, timeout=1.0)
    actor = object()
    sched.started(actor, 0.0)
    sched.ready(actor, 0.0)
    sched.assignments(0.0)
    sched.actor_died(actor)
    assert sched.wants_replacement(2) and sched.stranded() == []  # the last actor died: try another first
    for _ in range(MAX_STARTS_IN_A_ROW):  # e.g. the teacher no longer loads
        assert sched.stranded() == []
        replacement = object()
        sched.started(replacement, 1.0)
        sched.start_failed(replacement)
    assert not sched.wants_replacement(2)
    assert [t.stem for t in sched.stranded()] == ["s0", "s1", "s2"] and sched.done


def test_the_last_actor_dying_after_slow_replacements_were_dropped_still_gets_a_replacement():
    """CI, loaded 2-core machine: the second actor was dropped (slow start) three times while the first worked;
    then the first one's node was lost. The queue must not be failed: nothing has tried the free node since."""
    sched, tasks = _pool(5, timeout=5.0)
    worker = object()
    sched.started(worker, 0.0)
    sched.ready(worker, 0.0)
    sched.assignments(0.0)
    for i in range(MAX_STARTS_IN_A_ROW):
        assert sched.wants_replacement(2)
        slow = object()
        sched.started(slow, 10.0 * i)
        assert sched.overdue(10.0 * i + 6) == [slow]
    assert not sched.wants_replacement(2)  # the survivor works on: no endless replacements on a full cluster
    sched.actor_died(worker)
    assert sched.wants_replacement(2) and sched.stranded() == []
    again = object()
    sched.started(again, 100.0)
    assert sched.overdue(200.0) == []  # alone: waited for up to alone_deadline_s
    sched.ready(again, 150.0)
    (actor, task, _), = sched.assignments(0.0)
    assert actor is again and task.stem == "s0" and sched.report.retried == {"s0": 1}


def test_after_the_alone_deadline_no_more_starts_are_tried():
    sched = ShardScheduler([Task("s0"), Task("s1")], 2, 1.0, alone_deadline_s=50.0)
    actor = object()
    sched.started(actor, 0.0)
    assert sched.overdue(51.0) == [actor]
    assert not sched.wants_replacement(2) and sched.gave_up_waiting
    assert [t.stem for t in sched.stranded()] == ["s0", "s1"]


def test_start_failure_is_counted_and_not_retried_as_work():
    sched, _ = _pool(2)
    actor = object()
    sched.started(actor, 0.0)
    sched.start_failed(actor)
    assert sched.report.actors_died == 1 and sched.live_actors() == []


def test_autoscaling_cluster_keeps_booting_actors_when_the_first_becomes_ready():
    """Issue 21 item 13: min_workers 0, four GPU actors asked for at once; nodes arrive minutes apart. The first
    ready actor must not get the three still booting dropped in the same tick (the pass ran on one GPU)."""
    sched, _ = _pool(8, timeout=120.0)
    actors = [object() for _ in range(4)]
    for a in actors:
        sched.started(a, 0.0)
    assert sched.overdue(199.0) == []  # alone: waited for
    sched.ready(actors[0], 200.0)
    sched.assignments(200.0)
    assert sched.overdue(200.5) == []  # the cluster is growing: its clock restarts at the last arrival
    sched.ready(actors[1], 290.0)
    assert sched.overdue(400.0) == []  # 110 s since the last arrival
    late = sched.overdue(411.0)
    assert set(map(id, late)) == {id(actors[2]), id(actors[3])}
    assert sched.wants_replacement(4)  # one round of drops, not two: replacements are still asked for


def test_actors_dropped_together_count_as_one_round_and_three_rounds_stop_the_replacements():
    sched, _ = _pool(8, timeout=10.0)
    worker = object()
    sched.started(worker, 0.0)
    sched.ready(worker, 0.0)
    sched.assignments(0.0)
    now = 0.0
    for _ in range(MAX_STARTS_IN_A_ROW):
        started = []
        while sched.wants_replacement(4):
            started.append(object())
            sched.started(started[-1], now)
        assert len(started) == 3  # target 4, one works: three wanted
        now += 11.0
        assert len(sched.overdue(now)) == 3
    assert not sched.wants_replacement(4)  # a full cluster: stop asking after three rounds


def test_broken_actor_is_retired_and_its_shard_retried_on_another():
    """Issue 21 item 12: the labeller raised something other than a shard error (a sticky CUDA error)."""
    sched, _ = _pool(3, retries=1)
    broken, good = object(), object()
    for a in (broken, good):
        sched.started(a, 0.0)
        sched.ready(a, 0.0)
    given = {id(a): t for a, t, _ in sched.assignments(0.0)}
    task, requeued = sched.actor_broken(broken)
    assert task == given[id(broken)] and requeued and sched.report.retried == {task.stem: 1}
    assert broken not in sched.live_actors() and sched.report.actors_retired == 1
    assert sched.wants_replacement(2)
    sched.finished(good)
    (actor, nxt, attempt), = sched.assignments(1.0)
    assert actor is good and nxt == task and attempt == 1
    assert sched.actor_broken(good) == (task, False)  # the retry limit holds for broken actors too


def test_a_shard_past_its_deadline_retires_its_actor_and_is_retried_then_fails():
    """Issue 21 item 14: the deadline of an attempt scales with the task (here: its stem's number)."""
    tasks = [Task("s0"), Task("s9")]
    sched = ShardScheduler(tasks, 1, 10.0, deadline_of=lambda t: 100.0 * (1 + int(t.stem[1:])))
    a, b = object(), object()
    for x in (a, b):
        sched.started(x, 0.0)
        sched.ready(x, 0.0)
    given = {t.stem: x for x, t, _ in sched.assignments(0.0)}
    assert sched.hung(100.0) == []
    (actor, task, attempt, requeued), = sched.hung(100.5)  # s0: 100 s; s9 has 1,000 s
    assert actor is given["s0"] and task.stem == "s0" and attempt == 0 and requeued
    assert sched.report.timed_out == {"s0": 1} and sched.report.retried == {"s0": 1}
    c = object()
    sched.started(c, 101.0)
    sched.ready(c, 102.0)
    (_, again, attempt), = sched.assignments(102.0)
    assert again.stem == "s0" and attempt == 1
    assert [(t.stem, r) for _, t, _, r in sched.hung(203.0)] == [("s0", False)]  # out of retries: it fails
    assert sched.hung(999.0) == [] and sched.hung(1000.5)[0][1].stem == "s9"
