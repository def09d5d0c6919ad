"""A test's hold on a variant between two epochs: the defined point where SIGTERM, SIGKILL or a lost node land.

The tests of `ray job stop`, of a killed Ray Train worker and of a lost node must act after epoch n and before the
variant ends, on a fast machine as on a slow one; polling for epoch n and racing the next epochs cannot promise
that. A named pipe (FIFO) `.hold-after-epoch-<n>` in a variant's output directory makes rank 0 wait after epoch n
(its checkpoint sealed, its metrics row written) until whoever holds the pipe's write end closes it; the waiting
process is interrupted by SIGTERM like a training one. Only a FIFO holds (a regular file or a directory of that
name is ignored), so a production run is never held by accident; without one it costs one stat per epoch.
"""

from __future__ import annotations

import logging
import stat
from pathlib import Path

log = logging.getLogger(__name__)
HOLD_PREFIX = ".hold-after-epoch-"


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
