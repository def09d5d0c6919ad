"""Issue 23 item 4: the default layout of the cache pass on a node's cores (teacher_cache/layout.py)."""

import pytest
import torch
from helpers import cache_cfg_dict, save_teacher

import distill.teacher_cache.labeler as labeler_module
from distill.teacher_cache.config import CacheConfig
from distill.teacher_cache.layout import (
    BusyMeter,
    default_actors,
    free_cpus,
    labeller_split,
    labellers_per_node,
    others_busy_cpus,
    plan_layout,
)


def test_cpu_division_between_labellers_on_a_node():
    assert labellers_per_node(64, 8, 1, 1, 100) == 8
    assert labellers_per_node(64, 8, 1, 0.5, 100) == 16
    assert labellers_per_node(2, 0, 1, 0, 4) == 2
    assert labellers_per_node(16, 0, 1, 0, 1) == 1


def test_decode_processes_and_torch_threads_of_a_cpu_labeller_add_up_to_its_share():
    """Before: the in-process labeller on 2 cores ran a decode process beside 2 torch threads (3 processes' worth
    of work on 2 cores, 35% slower than the default now: BENCHMARKS.md)."""
    for share in range(1, 65):
        processes, threads = labeller_split(share, on_gpu=False)
        assert processes + threads == share, (share, processes, threads)
    assert labeller_split(2, on_gpu=False) == (0, 2)  # measured best on 2 cores: the reading thread decodes
    assert labeller_split(16, on_gpu=False) == (8, 8)


def test_a_gpu_labeller_gives_its_other_cores_to_decoding():
    assert labeller_split(8, on_gpu=True) == (7, None)  # 8 GPUs on a 64-core node: one core feeds each GPU
    assert labeller_split(1, on_gpu=True) == (0, None)


def test_default_actors_one_per_gpu_or_one_per_cpu_node():
    assert default_actors(1, [96.0, 96.0], 16.0) == (16, 1.0)
    assert default_actors(0.5, [96.0], 8.0) == (16, 1.0)
    assert default_actors(0, [2.0], 0.0) == (1, 2.0)  # this machine: one labeller with both cores
    assert default_actors(0, [0.0, 16.0, 8.0], 0.0) == (2, 8.0)  # a CPU-less head is no node for labellers
    assert default_actors(1, [0.0], 0.0) == (1, 1.0)  # autoscaling, no GPU node up yet: set ray.num_actors


def test_ray_actors_and_cpus_are_left_empty_for_the_layout_to_fill():
    """Before: 2 actors x 1 CPU whatever the cluster (on 2 cores, each actor's torch beside its decoding)."""
    d = cache_cfg_dict(["s.tar"], "c", "t.pt")
    del d["ray"]
    cfg = CacheConfig.model_validate(d)
    assert cfg.ray.num_actors is None and cfg.ray.cpus_per_actor is None
    assert cfg.decode_processes is None and cfg.torch_threads is None


@pytest.mark.parametrize(("cpus", "processes", "threads"), [(2, 0, 2), (8, 4, 4)])
def test_a_cpu_labeller_applies_the_split_and_gives_torch_threads_back(tmp_path, monkeypatch, cpus, processes,
                                                                       threads):
    """Before: 2 CPUs gave 1 decode process beside torch's own threads; 8 CPUs gave 7 beside them. The node's
    CPU count is the one thing set by the test (the split for a bigger node than this one)."""
    monkeypatch.setattr(labeler_module, "available_cpus", lambda: cpus)
    monkeypatch.setattr(labeler_module, "sample_others_busy", lambda n: 0.0)  # the node's load, given: quiet
    cfg = CacheConfig.model_validate(cache_cfg_dict([str(tmp_path / "s.tar")], tmp_path / "cache",
                                                    save_teacher(tmp_path / "t.pt"), device="cpu"))
    before = torch.get_num_threads()
    lab = labeler_module.Labeler(cfg, "fp")
    try:
        assert (lab.pool.processes, torch.get_num_threads()) == (processes, threads)
    finally:
        lab.close()
    assert torch.get_num_threads() == before


def test_free_cpus_leave_out_what_other_work_keeps_busy():
    """Issue 31: on 2 cores beside a busy loop the pass gets 1 CPU (not 2 torch threads that stall at every
    barrier when one is descheduled); half a core busy or more takes a core; never fewer than 1."""
    assert free_cpus(2, 0.0) == 2
    assert free_cpus(2, 0.3) == 2  # the OS, a monitor: noise
    assert free_cpus(2, 1.0) == 1  # a busy loop on one core
    assert free_cpus(2, 7.0) == 1  # load 7 on 2 cores: one thread, not none
    assert free_cpus(16, 5.6) == 10
    assert free_cpus(16, None) == 16  # load unknown (no /proc/stat): the affinity set alone


def test_plan_layout_sizes_processes_and_threads_from_free_cpus():
    """Before: the split came from the core count alone (2 torch threads beside a busy loop on 2 cores)."""
    quiet = plan_layout(2, 0.1, 1, on_gpu=False)
    assert (quiet.processes, quiet.threads, quiet.free) == (0, 2, 2)
    busy = plan_layout(2, 1.0, 1, on_gpu=False)
    assert (busy.processes, busy.threads, busy.free) == (0, 1, 1)
    assert "1.0 busy" in busy.reason and "1 free" in busy.reason
    big = plan_layout(16, 4.0, 1, on_gpu=False)  # 12 free: 6 decode processes, 6 threads
    assert (big.processes, big.threads) == (6, 6)
    two = plan_layout(16, 0.0, 2, on_gpu=False)  # two labellers on the node share what is free
    assert (two.processes, two.threads) == (4, 4)
    gpu = plan_layout(16, 8.0, 1, on_gpu=True)
    assert (gpu.processes, gpu.threads) == (7, None)


def test_a_labeller_beside_busy_work_starts_with_fewer_threads(tmp_path, monkeypatch):
    """The Labeler applies plan_layout to what it measured (given here) unless the config sets the sizes."""
    monkeypatch.setattr(labeler_module, "available_cpus", lambda: 2)
    monkeypatch.setattr(labeler_module, "sample_others_busy", lambda n: 1.0)
    d = cache_cfg_dict([str(tmp_path / "s.tar")], tmp_path / "cache", save_teacher(tmp_path / "t.pt"), device="cpu")
    lab = labeler_module.Labeler(CacheConfig.model_validate(d), "fp")
    try:
        assert (lab.pool.processes, torch.get_num_threads()) == (0, 1)
    finally:
        lab.close()
    lab = labeler_module.Labeler(CacheConfig.model_validate({**d, "torch_threads": 2, "decode_processes": 0}), "fp")
    try:  # the config's sizes win over the load
        assert (lab.pool.processes, torch.get_num_threads()) == (0, 2)
    finally:
        lab.close()


def test_other_work_is_the_machine_busy_share_less_this_process():
    """This process's own CPU time is its work, not other work (else a busy pass would shrink itself)."""
    assert others_busy_cpus(100, 100, 2, own_cpu_s=2.0, wall_s=1.0, cpus=2) == 0.0  # all busy, all ours
    assert others_busy_cpus(100, 100, 2, own_cpu_s=1.0, wall_s=1.0, cpus=2) == 1.0  # a busy loop beside us
    assert others_busy_cpus(50, 100, 2, own_cpu_s=0.0, wall_s=0.2, cpus=2) == 1.0  # sampled while idle
    assert others_busy_cpus(60, 100, 10, own_cpu_s=0.0, wall_s=1.0, cpus=5) == 3.0  # affinity: half the machine


def test_busy_meter_waits_for_a_window_long_enough_to_mean_something():
    meter = BusyMeter(2, min_s=60.0)
    assert meter.others_busy() is None  # a few microseconds of /proc/stat are noise, not load


@pytest.mark.parametrize("processes", [0, 1])
def test_decoding_runs_ahead_of_the_forward(tmp_path, monkeypatch, processes):
    """Issue 31: decode and view sampling overlap the teacher's forward: while the first forward is held, the
    decoder (the reading thread, or a decode process) fills the queue of PREFETCH_BATCHES batches. Had decoding
    waited for the forward, the queue would stay empty (checked by making the producer wait: seen == [0])."""
    import time

    from helpers import mnist_shard

    from distill.teacher_cache.labeler import PREFETCH_BATCHES, ShardTask

    shard = mnist_shard(tmp_path / "s.tar", 64)
    cfg = CacheConfig.model_validate(cache_cfg_dict([str(shard)], tmp_path / "cache", save_teacher(tmp_path / "t.pt"),
                                                    device="cpu", batch_size=8, decode_processes=processes))
    lab = labeler_module.Labeler(cfg, "fp")
    forward = lab._teacher_step
    seen: list[int] = []

    def held(item):  # a gate at a defined point (the first forward), released once the queue is full
        if not seen:
            deadline = time.monotonic() + 120
            while not lab.ahead.full() and time.monotonic() < deadline:
                time.sleep(0.01)
            seen.append(lab.ahead.qsize())
        return forward(item)

    monkeypatch.setattr(lab, "_teacher_step", held)
    try:
        result = lab.label_shard(ShardTask("s", shard, tmp_path / "cache"))
    finally:
        lab.close()
    assert result.ok and result.rows == 64
    assert PREFETCH_BATCHES >= 2 and seen == [PREFETCH_BATCHES]
    assert lab.pool.processes == processes
