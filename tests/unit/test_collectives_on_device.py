"""Every collective of training uses a tensor on the worker's device (issue 21 §6): NCCL refuses CPU tensors, so a
CPU tensor in a collective crashed every resume with 2+ GPU workers.

There is no GPU here, so two stand-ins, said plainly. `CudaStandIn` (a TorchFunctionMode) turns every tensor the
code creates on, or moves to, device "cuda" into a `FakeCuda` tensor: CPU memory, marked as device memory. A spy in
front of torch.distributed plays NCCL: it raises NCCL's error for any tensor that is not marked, and otherwise runs
the real collective over gloo between two real processes. The code under test is the real one, told that its
device is "cuda".
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
import torch.distributed as dist
from helpers import run_ranks
from torch.overrides import TorchFunctionMode

CUDA = torch.device("cuda")
COLLECTIVES = ("all_reduce", "broadcast", "all_gather", "all_gather_into_tensor", "reduce", "reduce_scatter",
               "all_to_all", "gather", "scatter")


class FakeCuda(torch.Tensor):
    """A CPU tensor standing in for device memory (no GPU on this machine)."""


class CudaStandIn(TorchFunctionMode):
    """device='cuda' (factories, .to, .cuda) -> a FakeCuda tensor on the CPU; .cpu() / .to('cpu') -> a plain one."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = dict(kwargs or {})
        target = None  # where the result lives: "cuda" (marked), "cpu" (unmarked) or as computed
        if func is torch.Tensor.cuda:
            func, target = torch.Tensor.cpu, "cuda"
        elif func is torch.Tensor.cpu:
            target = "cpu"
        elif func is torch.Tensor.to:
            rest = list(args[1:])
            for i, a in enumerate(rest):
                if isinstance(a, (str, torch.device)):
                    target, rest[i] = torch.device(a).type, "cpu"
            args = (args[0], *rest)
        if isinstance(kwargs.get("device"), (str, torch.device)):
            target, kwargs["device"] = torch.device(kwargs["device"]).type, "cpu"
        out = func(*args, **kwargs)
        if isinstance(out, torch.Tensor) and target in ("cuda", "cpu"):
            out = out.as_subclass(FakeCuda if target == "cuda" else torch.Tensor)
        return out


def _plain(x: object) -> object:
    if isinstance(x, torch.Tensor):
        if not isinstance(x, FakeCuda):
            raise RuntimeError("Tensors must be CUDA and dense (the spy standing in for NCCL: a CPU tensor reached "
                               "a collective)")
        return x.as_subclass(torch.Tensor)  # same storage: the real gloo collective writes where NCCL would
    if isinstance(x, list):
        return [_plain(t) for t in x]
    return x


def _install_spy() -> list[str]:
    seen: list[str] = []
    for name in COLLECTIVES:
        real = getattr(dist.distributed_c10d, name)

        def spy(*args, _real=real, _name=name, **kwargs):
            seen.append(_name)
            args, kwargs = [_plain(a) for a in args], {k: _plain(v) for k, v in kwargs.items()}
            with torch._C.DisableTorchFunction():  # the real gloo collective, outside the stand-in
                return _real(*args, **kwargs)

        setattr(dist.distributed_c10d, name, spy)
        setattr(dist, name, spy)
    return seen


def _worker(rank: int, port: int, root: str, out: dict) -> None:
    from distill.student_train import checkpoints
    from distill.student_train.collectives import any_rank_flags, gather_ints
    from distill.student_train.evaluate import evaluate

    os.environ.pop("WORLD_SIZE", None)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    seen = _install_spy()
    try:
        with CudaStandIn():
            res = {}
            # node-local disks: each rank its own checkpoint directory (same path on two machines, in effect)
            ckpt = Path(root) / f"node{rank}" / "ds_ckpt"
            storage = checkpoints.probe_storage(ckpt, rank, 2, 0, CUDA)
            res["storage"] = (storage.shared, storage.sealer)
            for epoch in (0, 1):  # epoch 0 sealed on both ranks, epoch 1 sealed on rank 0 only (a crash on rank 1)
                tag = ckpt / checkpoints.tag_for(epoch)
                tag.mkdir(parents=True)
                (tag / "mp_rank_00_model_states.pt").write_bytes(b"weights")
                if epoch == 0 or rank == 0:
                    checkpoints.seal_tag(ckpt, tag.name, keep=5)
            res["resumed"] = checkpoints.resume_tag(ckpt, 2, CUDA, lambda tag_dir: tag_dir.name)
            res["lists"] = gather_ints([rank, 7] if rank else [3], 2, CUDA)
            res["flags"] = any_rank_flags(torch.tensor([0.0, 1.0 if rank else 0.0], device=CUDA), 2)
            batch = {"pixels": torch.eye(10)[[1, 2]].reshape(2, 10, 1, 1), "label": torch.tensor([1, 3]),
                     "teacher_top1_view0": torch.tensor([1, 2]), "weight": torch.ones(2)}
            res["val_top1"] = evaluate(lambda x: x.flatten(1) * 5.0, [batch], CUDA, torch.float32)["val_top1"]
        res["collectives"] = sorted(set(seen))
        out[rank] = res
    finally:
        dist.destroy_process_group()


def test_every_collective_is_on_the_device_nccl_style(tmp_path):
    res = run_ranks(_worker, str(tmp_path))
    assert res[0]["storage"] == (False, True) and res[1]["storage"] == (False, True)  # each node seals its own
    assert res[0]["resumed"] == res[1]["resumed"] == "epoch0"  # the newest tag intact on every rank
    assert res[0]["lists"] == res[1]["lists"] == [[3], [1, 7]]
    assert res[0]["flags"] == res[1]["flags"] == [False, True]
    assert res[0]["val_top1"] == res[1]["val_top1"] == 0.5
    assert {"all_reduce", "all_gather", "broadcast"} <= set(res[0]["collectives"])
