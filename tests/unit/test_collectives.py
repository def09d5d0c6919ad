"""`evaluate` and the training loop's NaN flag under a real 2-rank gloo group (spawned processes).

On the CPU the "device tensors" are CPU tensors; what this pins is that the code reduces tensors on the device
it was given (NCCL needs that on GPUs) and that both ranks get the same totals and the same stop decision.
"""

import os

import torch
import torch.distributed as dist
from helpers import run_ranks

from distill.student_train.collectives import any_rank_bad
from distill.student_train.evaluate import evaluate


def _batch(logits_rows: list[int], labels: list[int], teacher: list[int], weight: list[float]) -> dict:
    n = len(labels)
    return {"pixels": torch.eye(10)[logits_rows].reshape(n, 10, 1, 1), "label": torch.tensor(labels),
            "teacher_top1_view0": torch.tensor(teacher), "weight": torch.tensor(weight)}


def _forward(x: torch.Tensor) -> torch.Tensor:
    return x.flatten(1) * 5.0  # one-hot pixels -> logits whose top-1 is the hot index


def _worker(rank: int, port: int, out: dict) -> None:
    os.environ.pop("WORLD_SIZE", None)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        if rank == 0:  # 2 right, 1 wrong; teacher agrees on 2 of 3
            batches = [_batch([1, 2, 3], [1, 2, 4], [1, 2, 0], [1, 1, 1])]
        else:  # 1 right, 1 unlabelled, 1 padding row (weight 0, must not count)
            batches = [_batch([5, 6, 7], [5, -1, 7], [5, -1, 0], [1, 1, 0])]
        res = evaluate(_forward, batches, torch.device("cpu"), torch.float32)
        bad_none = any_rank_bad(torch.zeros(()), 2)
        bad_one = any_rank_bad(torch.tensor(1.0 if rank == 1 else 0.0), 2)
        out[rank] = (res, bad_none, bad_one)
    finally:
        dist.destroy_process_group()


def test_evaluate_and_nan_flag_agree_across_two_ranks():
    out = run_ranks(_worker)
    res0, res1 = out[0], out[1]
    assert res0 == res1  # every rank sees the same totals and makes the same stop decision
    metrics, bad_none, bad_one = res0
    assert metrics["val_samples"] == 5.0
    assert metrics["val_top1"] == 3 / 4  # 4 labelled rows with weight 1, 3 right
    assert metrics["val_teacher_agreement"] == 3 / 4  # rows with a teacher id: 1,2,0 | 5 -> agree 1,2,5
    assert bad_none is False and bad_one is True
