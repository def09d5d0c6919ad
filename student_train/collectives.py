"""What training ranks exchange: flags, agreements and small integer lists, always as tensors on the worker's device.

NCCL accepts no CPU tensors, so a collective on a host tensor crashes every GPU run with 2+ workers (issue 21 §6).
Each helper here builds its tensor on `device`, makes one collective and reads the result back once; with one rank
nothing is exchanged.
"""

from __future__ import annotations

import torch
import torch.distributed as dist


def any_rank_bad(bad: torch.Tensor, world: int) -> bool:
    """One collective on the device flag, so every rank stops on the same step (a lone stop would deadlock)."""
    return any_rank_flags(bad.reshape(1), world)[0]


def any_rank_flags(flags: torch.Tensor, world: int) -> list[bool]:
    """Per entry (e.g. per student of a group): true where any rank flagged it. `flags` lives on the device."""
    total = flags.detach().clone().float().reshape(-1)
    if world > 1:
        dist.all_reduce(total)
    return [bool(x > 0) for x in total.tolist()]  # host sync: only at log points and at epoch end


def all_ranks_ok(ok: bool, world: int, device: torch.device) -> bool:
    """True only if every rank says ok (e.g. all ranks must load the same checkpoint tag)."""
    if world == 1:
        return ok
    flag = torch.tensor([1 if ok else 0], dtype=torch.int32, device=device)
    dist.all_reduce(flag, op=dist.ReduceOp.MIN)
    return bool(flag.item())


def gather_ints(values: list[int], world: int, device: torch.device) -> list[list[int]]:
    """Every rank's list of non-negative integers, on every rank (lists may differ in length)."""
    if world == 1:
        return [list(values)]
    n = torch.tensor([len(values)], dtype=torch.int64, device=device)
    dist.all_reduce(n, op=dist.ReduceOp.MAX)
    width = max(1, int(n.item()))
    mine = torch.full((width,), -1, dtype=torch.int64, device=device)
    if values:
        mine[: len(values)] = torch.tensor(values, dtype=torch.int64, device=device)
    out = [torch.empty_like(mine) for _ in range(world)]
    dist.all_gather(out, mine)
    return [[int(x) for x in t.tolist() if x >= 0] for t in out]


def broadcast_int(value: int, world: int, device: torch.device, src: int = 0) -> int:
    """Rank `src`'s integer on every rank."""
    if world == 1:
        return value
    t = torch.tensor([value], dtype=torch.int64, device=device)
    dist.broadcast(t, src=src)
    return int(t.item())


def sync(world: int, device: torch.device) -> None:
    """A barrier made of one small all-reduce on the device (what NCCL wants)."""
    if world > 1:
        dist.all_reduce(torch.zeros(1, device=device))
