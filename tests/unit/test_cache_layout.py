"""Issue 23 item 4: the default layout of the cache pass on a node's cores (teacher_cache/layout.py)."""

import pytest
import torch
from helpers import cache_cfg_dict, save_teacher

import distill.teacher_cache.labeler as labeler_module
from distill.teacher_cache.config import CacheConfig
from distill.teacher_cache.layout import default_actors, labeller_split, labellers_per_node


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
    cfg = CacheConfig.model_validate(cache_cfg_dict([str(tmp_path / "s.tar")], tmp_path / "cache",
                                                    save_teacher(tmp_path / "t.pt"), device="cpu"))
    before = torch.get_num_threads()
    lab = labeler_module.Labeler(cfg, "fp")
    try:
        assert (lab.pool.processes, torch.get_num_threads()) == (processes, threads)
    finally:
        lab.close()
    assert torch.get_num_threads() == before
