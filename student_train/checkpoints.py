"""DeepSpeed epoch checkpoints that survive crashes, node-local disks, and cannot run code when loaded.

- Storage: before the first save, the ranks find out which of them see the same checkpoint directory (each
  writes a probe file, each reports which probes it sees). One directory for all (a shared filesystem) or one
  per node (node-local disks) both work: on node-local disks DeepSpeed writes the model states on every node
  (`use_node_local_storage`) and each node's lowest rank seals what its disk holds. Anything else (ranks of one
  node seeing different directories, or two nodes sharing one) is refused with what to do.
- Save: DeepSpeed writes the tag directory (without its own `latest`); then one rank per directory (the "sealer")
  fsyncs every file, records their SHA-256 in `<tag>/distill_digests.json`, and only then points `latest` at the
  tag (atomic rename). Older tags beyond `keep` are deleted, so disk use stays bounded.
- Resume: the newest tag that every rank has intact (its files match their recorded digests in that rank's own
  directory) is loaded; a damaged last tag (a crash mid-save, a full disk, a node whose disk lost it) falls back
  to the previous good one instead of stopping resume for good.
- Every file is loaded with `torch.load(weights_only=True)`, allowing only the few plain DeepSpeed types its
  ZeRO optimizer states hold: a planted pickle that would run code is refused, never executed.
- Every collective uses a tensor on the worker's device (student_train.collectives): NCCL accepts no others.
"""

from __future__ import annotations

import json
import logging
import os
import pickle
import re
import shutil
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from distill.core.atomic_io import atomic_write, file_sha256, fsync_dir
from distill.core.errors import DistillError
from distill.student_train.collectives import all_ranks_ok, broadcast_int, gather_ints, sync

log = logging.getLogger(__name__)

DIGESTS = "distill_digests.json"
FUSED_FILE = "fused_student.pt"  # a student trained fused with others (fused_unit.py) writes this, not DeepSpeed's
_TAG = re.compile(r"^epoch(\d+)$")


class CheckpointError(DistillError, RuntimeError):
    """A checkpoint that must not be loaded (it holds objects beyond plain tensors and containers)."""


def tag_for(epoch: int) -> str:
    return f"epoch{epoch}"


def _seal(tag_dir: Path) -> None:
    """fsync every file of a complete tag and record its digests (the tag's 'complete and intact' mark)."""
    digests = {}
    for f in sorted(p for p in tag_dir.iterdir() if p.is_file() and p.name != DIGESTS):
        with open(f, "rb") as fh:
            os.fsync(fh.fileno())
        digests[f.name] = file_sha256(f)
    atomic_write(tag_dir / DIGESTS, json.dumps(digests, indent=1))


@dataclass(frozen=True)
class Storage:
    """How the ranks see a checkpoint directory: `shared` (one directory for all ranks) or one per node."""

    shared: bool = True
    sealer: bool = True  # this rank seals (and prunes) the tags of the directory it sees

    def ds_config(self) -> dict[str, Any]:
        """DeepSpeed's checkpoint section: on node-local disks every node writes the model states it loads."""
        return {"use_node_local_storage": not self.shared}


def probe_storage(ckpt_dir: Path, rank: int, world: int, local_rank: int, device: torch.device) -> Storage:
    """Find out which ranks see the same `ckpt_dir` (call on every rank, before the engine is built)."""
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    if world == 1:
        return Storage()
    nonce = broadcast_int(int.from_bytes(os.urandom(7), "little"), world, device)
    mine = ckpt_dir / f".storage-probe-{nonce:x}-rank{rank}"
    mine.write_text(str(rank))
    sync(world, device)
    seen = [q for q in range(world) if (ckpt_dir / f".storage-probe-{nonce:x}-rank{q}").exists()]
    views = gather_ints(seen, world, device)
    local_ranks = [r[0] for r in gather_ints([local_rank], world, device)]
    sync(world, device)  # every rank has looked before any probe goes
    mine.unlink(missing_ok=True)
    groups = {tuple(v) for v in views}
    if any(r not in v for r, v in enumerate(views)) or sorted(q for g in groups for q in g) != list(range(world)):
        raise CheckpointError(f"{ckpt_dir}: the ranks see this directory inconsistently ({views}); put run_dir on "
                              "storage every node sees, or on a disk local to each node")
    if len(groups) > 1:
        writers = [[q for q in g if local_ranks[q] == 0] for g in sorted(groups)]
        if any(len(w) != 1 for w in writers):
            raise CheckpointError(
                f"{ckpt_dir}: ranks {sorted(groups)} share checkpoint directories that do not match nodes "
                f"(local ranks {local_ranks}); use one directory every node sees (a shared filesystem) or one "
                "disk per node, not a mix")
        log.info("checkpoints of %s are node-local (ranks by directory: %s): each node keeps its own copy",
                 ckpt_dir, sorted(groups))
    return Storage(shared=len(groups) == 1, sealer=rank == min(views[rank]))


def save(engine: Any, ckpt_dir: Path, epoch: int, client_state: dict, keep: int, storage: Storage) -> None:
    """Save epoch `epoch`; `latest` moves only once the tag is complete and sealed. Call on every rank."""
    tag = tag_for(epoch)
    engine.save_checkpoint(str(ckpt_dir), tag=tag, client_state=client_state, save_latest=False)  # ends in a barrier
    if storage.sealer:
        seal_tag(ckpt_dir, tag, keep)


def seal_tag(ckpt_dir: Path, tag: str, keep: int) -> None:
    """Seal a complete tag directory, point `latest` at it, prune old tags (one rank per directory)."""
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
        if file_sha256(f) != want:
            return f"{name} does not match its recorded digest (damaged or replaced)"
    return ""


def resume_tag(ckpt_dir: Path, world: int, device: torch.device, load: Callable[[Path], Any]) -> Any:
    """`load(tag_dir)` of the newest tag every rank has intact, or None when there is none. Call on every rank.

    Each rank lists and verifies the tags in the directory it sees (on node-local disks, its own node's copy)."""
    epochs = sorted({e for mine in gather_ints(_epochs(ckpt_dir), world, device) for e in mine}, reverse=True)
    for e in epochs:
        tag_dir = ckpt_dir / tag_for(e)
        problem = verify(tag_dir) if tag_dir.is_dir() else "missing in the directory this rank sees"
        if not all_ranks_ok(not problem, world, device):
            log.warning("checkpoint %s skipped: %s; trying the previous one", tag_dir,
                        problem or "damaged or missing on another rank")
            continue
        out = load(tag_dir)
        log.info("resuming from checkpoint %s", tag_dir)
        return out
    if epochs:
        log.warning("no checkpoint in %s is intact on every rank; training from the start", ckpt_dir)
    return None


def resume(engine: Any, ckpt_dir: Path, world: int, device: torch.device) -> dict | None:
    """Load the newest tag every rank has intact into the engine; its client state, or None. Call on every rank."""
    def load(tag_dir: Path) -> dict:
        if (tag_dir / FUSED_FILE).exists():
            raise CheckpointError(f"{tag_dir} was written by a fused group (students of one architecture as one "
                                  "model), but this student now trains on its own engine; re-run with "
                                  f"train.horizontal: on, or delete {ckpt_dir} to start it again")
        with weights_only_loads(engine):
            _, client = engine.load_checkpoint(str(ckpt_dir), tag=tag_dir.name)
        return client or {}

    return resume_tag(ckpt_dir, world, device, load)


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
