"""Faults that only tests switch on, to exercise recovery with real processes where the real fault needs what
this machine lacks (a GPU whose context breaks) or what no sample we could ship does reliably (crash a codec).

Off unless a `DISTILL_TEST_*` environment variable is set; nothing in a config can switch them on. The Ray
pool forwards these variables to its actors (`forwarded_env`), so a test can set them after Ray started.

- `DISTILL_TEST_BREAK_LABELLER=PATH`: the first labeller that starts a shard while PATH exists deletes the file
  (one unlink succeeds, so exactly one labeller gets it) and is broken from then on: it raises a CUDA-style
  RuntimeError on that shard and on every later one, as a labeller with a sticky CUDA error does.
- `DISTILL_TEST_CRASH_DECODER=MARKER`: a CPU decode process that is given a sample whose image bytes contain
  MARKER kills itself with SIGSEGV before decoding it, as a crashing image codec would.
"""

from __future__ import annotations

import os
import signal

from distill.teacher_cache.shards import RawSample

BREAK_LABELLER = "DISTILL_TEST_BREAK_LABELLER"
CRASH_DECODER = "DISTILL_TEST_CRASH_DECODER"
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


def check_decode(raw: RawSample) -> None:
    """Kill this process with SIGSEGV if the sample carries the test's crash marker (see module doc)."""
    marker = os.environ.get(CRASH_DECODER)
    if marker and any(marker.encode() in data for data in raw.files.values()):
        os.kill(os.getpid(), signal.SIGSEGV)
