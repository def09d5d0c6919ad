"""Every hook a test uses to reach inside a real run, in one place; none of them acts in a production run.

Faults that only tests switch on, to exercise recovery with real processes where the real fault needs what
this machine lacks (a GPU whose context breaks) or what no sample we could ship does reliably (crash a codec).
Off unless a `DISTILL_TEST_*` environment variable is set; nothing in a config can switch them on. The Ray
pool forwards these variables to its actors (`forwarded_env`), so a test can set them after Ray started.

- `DISTILL_TEST_BREAK_LABELLER=PATH`: the first labeller that starts a shard while PATH exists deletes the file
  (one unlink succeeds, so exactly one labeller gets it) and is broken from then on: it raises a CUDA-style
  RuntimeError on that shard and on every later one, as a labeller with a sticky CUDA error does.
- `DISTILL_TEST_DRIVER_SHARDS=N`: while a local Ray cluster starts, the driver labels at most N shards
  (teacher_cache/head_start.py), so a test knows which shards the actors label whatever the machine's speed.
- `DISTILL_TEST_CRASH_DECODER=MARKER`: a CPU decode process that is given a sample whose image bytes contain
  MARKER kills itself with SIGSEGV before decoding it, as a crashing image codec would.

A test's hold on a training variant between two epochs: the defined point where SIGTERM, SIGKILL or a lost node
land. The tests of `ray job stop`, of a killed Ray Train worker and of a lost node must act after epoch n and before
the variant ends, on a fast machine as on a slow one; polling for epoch n and racing the next epochs cannot promise
that. A named pipe (FIFO) `.hold-after-epoch-<n>` in a variant's output directory makes rank 0 wait after epoch n
(its checkpoint sealed, its metrics row written) until whoever holds the pipe's write end closes it; the waiting
process is interrupted by SIGTERM like a training one. Only a FIFO holds (a regular file or a directory of that
name is ignored), so a production run is never held by accident; without one it costs one stat per epoch.
"""

from __future__ import annotations

import logging
import os
import signal
import stat
from collections.abc import Iterable
from pathlib import Path

log = logging.getLogger(__name__)
HOLD_PREFIX = ".hold-after-epoch-"

BREAK_LABELLER = "DISTILL_TEST_BREAK_LABELLER"
CRASH_DECODER = "DISTILL_TEST_CRASH_DECODER"
DRIVER_SHARDS = "DISTILL_TEST_DRIVER_SHARDS"
_broken = False


def forwarded_env() -> dict[str, str]:
    """The test-fault variables set in this process, for the environment of Ray actors (empty normally)."""
    return {k: v for k, v in os.environ.items() if k.startswith("DISTILL_TEST_")}


def check_labeller() -> None:
    """Raise like a labeller whose GPU context is broken for good, if a test asked for one (see module doc)."""
    global _broken
    gate = os.environ.get(BREAK_LABELLER)
    if gate and not _broken:
        try:
            os.unlink(gate)
            _broken = True
        except OSError:  # absent, or another labeller took it
            pass
    if _broken:
        raise RuntimeError(f"CUDA error: an illegal memory access was encountered (injected by {BREAK_LABELLER})")


def driver_shard_cap() -> int | None:
    """At most this many shards for the driver while Ray starts, if a test asked (see module doc)."""
    value = os.environ.get(DRIVER_SHARDS)
    return int(value) if value else None


def check_decode(files: Iterable[bytes]) -> None:
    """Kill this process with SIGSEGV if a sample's files carry the test's crash marker (see module doc)."""
    marker = os.environ.get(CRASH_DECODER)
    if marker and any(marker.encode() in data for data in files):
        os.kill(os.getpid(), signal.SIGSEGV)


def hold_path(variant_dir: Path, epoch: int) -> Path:
    """Where a test puts the FIFO that holds the variant after `epoch` (1-based, as in metrics.csv)."""
    return Path(variant_dir) / f"{HOLD_PREFIX}{epoch}"


def hold_after_epoch(variant_dir: Path, epoch: int) -> None:
    """Wait while a test holds this variant after `epoch`; return at once when nothing does."""
    gate = hold_path(variant_dir, epoch)
    try:
        if not stat.S_ISFIFO(gate.stat().st_mode):
            return
        log.warning("%s: held after epoch %d by %s (a test's gate) until it is released", gate.parent.name, epoch,
                    gate)
        with open(gate, "rb") as f:  # returns at EOF: the holder closed its end
            f.read()
    except FileNotFoundError:  # no hold, or released between the stat and the open
        return
