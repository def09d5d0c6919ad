"""DeepSpeed epoch checkpoints that survive crashes and cannot run code when loaded.

- Save: DeepSpeed writes the tag directory (without its own `latest`); then rank 0 fsyncs every file, records
  their SHA-256 in `<tag>/distill_digests.json`, and only then points `latest` at the tag (atomic rename). Older
  tags beyond `keep` are deleted, so disk use stays bounded.
- Resume: the newest tag whose files match their recorded digests on every rank is loaded; a damaged last tag
  (a crash mid-save, a full disk) falls back to the previous good one instead of stopping resume for good.
- Every file is loaded with `torch.load(weights_only=True)`, allowing only the few plain DeepSpeed types its
  ZeRO optimizer states hold: a planted pickle that would run code is refused, never executed.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import pickle
import re
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from core.atomic_io import atomic_write, fsync_dir

log = logging.getLogger(__name__)

DIGESTS = "distill_digests.json"
_TAG = re.compile(r"^epoch(\d+)$")


class CheckpointError(RuntimeError):
    """A checkpoint that must not be loaded (it holds objects beyond plain tensors and containers)."""


def tag_for(epoch: int) -> str:
    return f"epoch{epoch}"


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _seal(tag_dir: Path) -> None:
    """fsync every file of a complete tag and record its digests (the tag's 'complete and intact' mark)."""
    digests = {}
    for f in sorted(p for p in tag_dir.iterdir() if p.is_file() and p.name != DIGESTS):
        with open(f, "rb") as fh:
            os.fsync(fh.fileno())
        digests[f.name] = _sha256(f)
    atomic_write(tag_dir / DIGESTS, json.dumps(digests, indent=1))


def save(engine: Any, ckpt_dir: Path, epoch: int, client_state: dict, keep: int, rank: int) -> None:
    """Save epoch `epoch`; `latest` moves only once the tag is complete and sealed. Call on every rank."""
    tag = tag_for(epoch)
    engine.save_checkpoint(str(ckpt_dir), tag=tag, client_state=client_state, save_latest=False)  # ends in a barrier
    if rank == 0:
        _seal(ckpt_dir / tag)
        fsync_dir(ckpt_dir)
        atomic_write(ckpt_dir / "latest", tag)
        _prune(ckpt_dir, keep)


def _epochs(ckpt_dir: Path) -> list[int]:
    """Epoch numbers of the tag directories, newest first."""
    if not ckpt_dir.is_dir():
        return []
    found = [int(m.group(1)) for p in ckpt_dir.iterdir() if p.is_dir() and (m := _TAG.match(p.name))]
    return sorted(found, reverse=True)


def _prune(ckpt_dir: Path, keep: int) -> None:
    """Keep the newest `keep` sealed tags; older ones (and unsealed leftovers older than them) go."""
    sealed = [e for e in _epochs(ckpt_dir) if (ckpt_dir / tag_for(e) / DIGESTS).exists()]
    if len(sealed) <= keep:
        return
    oldest_kept = sealed[keep - 1]
    for e in _epochs(ckpt_dir):
        if e < oldest_kept:
            shutil.rmtree(ckpt_dir / tag_for(e), ignore_errors=True)


def verify(tag_dir: Path) -> str:
    """'' when the tag is sealed and every file matches its digest, else why not."""
    try:
        digests = json.loads((tag_dir / DIGESTS).read_text())
    except FileNotFoundError:
        return "not sealed (incomplete save)"
    except ValueError as exc:
        return f"{DIGESTS} unreadable ({exc})"
    for name, want in digests.items():
        f = tag_dir / name
        if not f.is_file():
            return f"{name} missing"
        if _sha256(f) != want:
            return f"{name} does not match its recorded digest (damaged or replaced)"
    return ""


def _agree(ok: bool, world: int) -> bool:
    """True only if every rank says ok (all ranks must load the same tag)."""
    if world == 1:
        return ok
    flag = torch.tensor([1 if ok else 0], dtype=torch.int32)
    dist.all_reduce(flag, op=dist.ReduceOp.MIN)
    return bool(flag.item())


def resume(engine: Any, ckpt_dir: Path, rank: int, world: int) -> dict | None:
    """Load the newest intact tag; its client state, or None when there is none. Call on every rank."""
    epochs = _epochs(ckpt_dir)
    if world > 1:  # one candidate list for all ranks (a rank may still see a tag another one is deleting)
        box = [epochs]
        dist.broadcast_object_list(box, src=0)
        epochs = box[0]
    for e in epochs:
        tag_dir = ckpt_dir / tag_for(e)
        problem = verify(tag_dir)
        if not _agree(not problem, world):
            log.warning("checkpoint %s skipped: %s; trying the previous one", tag_dir,
                        problem or "damaged on another rank")
            continue
        with weights_only_loads(engine):
            _, client = engine.load_checkpoint(str(ckpt_dir), tag=tag_for(e))
        log.info("resuming from checkpoint %s", tag_dir)
        return client or {}
    if epochs:
        log.warning("no intact checkpoint in %s; training this variant from the start", ckpt_dir)
    return None


def _allowed_globals() -> list[Any]:
    """The only non-plain types DeepSpeed puts in its ZeRO optimizer states (data holders, no code)."""
    from deepspeed.runtime.fp16.loss_scaler import LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return [LossScaler, ZeroStageEnum, fragment_address]


@contextmanager
def weights_only_loads(engine: Any) -> Iterator[None]:
    """Route every file DeepSpeed loads for this engine through torch.load(weights_only=True)."""
    ce = engine.checkpoint_engine
    unsafe_load = ce.load

    def safe_load(path: str, map_location: Any = None) -> Any:
        try:
            with torch.serialization.safe_globals(_allowed_globals()):
                return torch.load(path, map_location=map_location, weights_only=True)
        except pickle.UnpicklingError as exc:
            first = str(exc).strip().splitlines()[0]
            raise CheckpointError(f"{path}: refused to load, it holds more than tensors and plain containers "
                                  f"({first}); if you did not plant it, delete {Path(path).parent} and re-run "
                                  "to resume from the epoch before") from None

    ce.load = safe_load
    try:
        yield
    finally:
        ce.load = unsafe_load
