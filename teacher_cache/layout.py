"""How the cache pass lays itself out on a node's cores: actors per node, decode processes and torch threads
per labeller. Chosen by measurement (bench/ray_layout.py, BENCHMARKS.md "Cache pass: Ray layout vs Ray Data"),
so that the busy threads of all labellers on a node add up to its cores, not to a multiple of them.

- Actors (driver, when `ray.num_actors` / `ray.cpus_per_actor` are left empty): GPU actors, one per
  `gpus_per_actor` of the cluster's GPUs, 1 CPU each (their decode processes use the node's other cores);
  CPU actors, one per node, each reserving the CPUs of the smallest node, so Ray's accounting is the truth.
- Per labeller, its share S of the node's CPUs (node CPUs / labellers on the node):
  - on a GPU: S - 1 decode processes (one core feeds the GPU); torch threads as Ray sets them;
  - on the CPU, S <= 2: no decode process (the labeller's reading thread decodes between the teacher's
    batches) and S torch threads. Measured on 2 cores (2,048 JPEGs, a small teacher): a decode process costs a
    Python + torch start and a copy of every image through a pipe and was 30-35% slower; 1 torch thread left a
    core idle while the forward waited (7-11% slower); two 1-CPU actors instead of one were 3-7% faster in
    2026-12-05's runs (within the machine's noise: 4 runs each), and cost a teacher load and a process per CPU,
    which a many-core node cannot afford; so one actor per node stays;
  - on the CPU, S >= 3: S // 2 decode processes and S - S // 2 torch threads (reasoned, not measured: this
    machine has 2 cores; one reading thread decodes ~370 JPEGs/s, too few beside a many-core forward).
- Contention (issue 31): S counts the CPUs that are FREE, not the node's count alone. Torch's OpenMP threads
  spin at every barrier; one of them descheduled by another process stalls all: measured on 2 cores under load
  ~7, a 2-thread forward ran at 12-14 img/s and a 1-thread forward at 183-217 img/s. So the labeller samples
  /proc/stat (0.2 s) at start, counts what other processes keep busy (its own CPU time subtracted) and sizes
  from CPUs - busy (at least 1); between shards it re-sizes its torch threads from the same count over the
  shard just done. `decode_processes` / `torch_threads` in the config still win.
"""

from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass


def available_cpus() -> int:
    """CPUs this process may run on (cgroup/affinity aware where the OS says so)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def labellers_per_node(node_cpus: float, node_gpus: float, cpus_per_actor: float, gpus_per_actor: float,
                       num_actors: int) -> int:
    """How many actors Ray can place on one node: GPUs bind first (GPU actors), then CPUs; at most num_actors."""
    fits = [num_actors]
    if gpus_per_actor > 0:
        fits.append(int(node_gpus // gpus_per_actor))
    if cpus_per_actor > 0:
        fits.append(int(node_cpus // cpus_per_actor))
    return max(1, min(fits))


def labeller_split(share: int, on_gpu: bool) -> tuple[int, int | None]:
    """(decode processes, torch threads or None = leave torch's) for a labeller with `share` CPUs."""
    share = max(1, share)
    if on_gpu:
        return share - 1, None
    if share <= 2:
        return 0, share
    decode = share // 2
    return decode, share - decode


def default_actors(gpus_per_actor: float, node_cpus: list[float], cluster_gpus: float) -> tuple[int, float]:
    """(num_actors, cpus_per_actor) for a cluster whose alive nodes have `node_cpus` CPUs (nodes without CPUs
    left out) and `cluster_gpus` GPUs in all, counted when the pass starts."""
    if gpus_per_actor > 0:
        return max(1, int(cluster_gpus // gpus_per_actor)), 1.0
    cpus = [c for c in node_cpus if c >= 1]
    if not cpus:
        return 1, 1.0
    return len(cpus), float(int(min(cpus)))


@dataclass(frozen=True)
class Layout:
    """What a labeller runs, and why (logged)."""

    processes: int
    threads: int | None
    free: int
    reason: str


def free_cpus(cpus: int, others_busy: float | None) -> int:
    """CPUs of `cpus` that other work leaves free: half a core or more busy elsewhere takes a core (a torch
    thread that shares its core stalls the whole forward at the next barrier); never fewer than 1."""
    if others_busy is None:
        return max(1, cpus)
    return max(1, min(cpus, math.floor(cpus - max(0.0, others_busy) + 0.5)))


def plan_layout(cpus: int, others_busy: float | None, labellers_on_node: int, on_gpu: bool) -> Layout:
    """Decode processes and torch threads for one labeller, from the CPUs it may use and what others keep busy
    (None = unknown: not Linux, so the affinity set alone)."""
    free = free_cpus(cpus, others_busy)
    share = max(1, free // max(1, labellers_on_node))
    processes, threads = labeller_split(share, on_gpu)
    busy = "unknown load" if others_busy is None else f"{others_busy:.1f} busy with other work"
    reason = (f"{cpus} CPU(s) to run on, {busy} -> {free} free, {max(1, labellers_on_node)} labeller(s) on the "
              f"node -> share {share}")
    return Layout(processes, threads, free, reason)


def _proc_stat() -> tuple[float, float] | None:
    """(busy, total) jiffies of all CPUs since boot, from /proc/stat; None where there is none."""
    try:
        with open("/proc/stat") as f:
            fields = [float(x) for x in f.readline().split()[1:]]
    except (OSError, ValueError):
        return None
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0.0)  # idle + iowait
    return sum(fields[:8]) - idle, sum(fields[:8])


def _own_cpu_s(pids: list[int]) -> float:
    """CPU seconds of this process (all its threads) plus the given child processes (decode workers)."""
    t = os.times()
    own = t.user + t.system
    tick = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
    for pid in pids:
        try:
            with open(f"/proc/{pid}/stat") as f:
                parts = f.read().rsplit(")", 1)[1].split()
            own += (float(parts[11]) + float(parts[12])) / tick  # utime, stime
        except (OSError, IndexError, ValueError):
            continue
    return own


def others_busy_cpus(busy_jiffies: float, total_jiffies: float, machine_cpus: int, own_cpu_s: float, wall_s: float,
                     cpus: int) -> float:
    """CPUs (of the `cpus` this process may use) that other processes kept busy: the machine's busy share of
    /proc/stat over a window, less this process's own CPU time over the same window's wall time."""
    others = busy_jiffies / total_jiffies * machine_cpus - own_cpu_s / wall_s
    return max(0.0, others * cpus / machine_cpus)


class BusyMeter:
    """CPUs other processes keep busy between two calls: all CPUs' busy time from /proc/stat minus this
    process's own (and its decode workers'), over the wall time, scaled to the CPUs this process may use."""

    def __init__(self, cpus: int, pids: list[int] | None = None, min_s: float = 0.2) -> None:
        self.cpus, self.min_s = cpus, min_s
        self._mark = self._now(pids or [])

    def _now(self, pids: list[int]) -> tuple[float, tuple[float, float] | None, float]:
        return time.monotonic(), _proc_stat(), _own_cpu_s(pids)

    def others_busy(self, pids: list[int] | None = None) -> float | None:
        """Since the last call (or construction); None where /proc/stat is missing or under `min_s` passed
        (then the window goes on to the next call)."""
        t1, st1, own1 = now = self._now(pids or [])
        t0, st0, own0 = self._mark
        if t1 - t0 < self.min_s:
            return None
        self._mark = now
        if st0 is None or st1 is None or st1[1] <= st0[1]:
            return None
        return others_busy_cpus(st1[0] - st0[0], st1[1] - st0[1], os.cpu_count() or self.cpus, own1 - own0,
                                t1 - t0, self.cpus)


def sample_others_busy(cpus: int, seconds: float = 0.2) -> float | None:
    """What other processes keep busy now, over `seconds` (this process idle meanwhile)."""
    meter = BusyMeter(cpus, min_s=seconds)
    time.sleep(seconds)
    return meter.others_busy()
