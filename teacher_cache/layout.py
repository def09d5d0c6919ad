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
"""

from __future__ import annotations

import os


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
