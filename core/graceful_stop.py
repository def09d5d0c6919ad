"""Graceful stop: SIGTERM (`ray job stop`, `kubectl delete`, systemd) becomes an exception in the main thread.

Every stage then unwinds through its own `finally` blocks: the cache stage kills its actors, writes
`last_run.json` with status "stopped" and what was done, and releases its lock; training marks its unfinished
variants "interrupted" (the next run resumes them from their last epoch checkpoint). `StopRequested` derives from
BaseException so no `except Exception` on the way swallows it. Raised inside a C/Cython call (a `ray.wait`, a torch
op) it can surface as another exception (e.g. SystemError "returned a result with an exception set"), so the
stages decide by `sigterm_received()`, not by the exception's type. A second SIGTERM kills at once.

`ray job stop` waits RAY_JOB_STOP_WAIT_TIME_S (Ray's default: 3 s) after SIGTERM before it sends SIGKILL; set it
higher on the head (e.g. 30) to leave the stages time to finish their bookkeeping. A SIGKILL loses nothing either
(every file is written atomically and listed only once complete); it only skips the "stopped" record.
"""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Callable, Iterator
from types import FrameType

EXIT_STOPPED = 143  # 128 + SIGTERM, what a shell reports for a process ended by SIGTERM
_installed = False  # set by install_sigterm_handler (the CLI); library users keep their own handlers
_received = threading.Event()
_first_things: list[Callable[[], None]] = []  # run inside the handler, before anything unwinds
_deferring = 0  # > 0 inside sigterm_deferred(): the stop is raised when the block ends


class StopRequested(BaseException):
    """The process was asked to stop (SIGTERM); finished work is kept and a re-run continues."""


def _on_sigterm(signum: int, frame: FrameType | None) -> None:
    signal.signal(signal.SIGTERM, signal.SIG_DFL)  # a second SIGTERM ends the process without ceremony
    _received.set()
    for fn in list(_first_things):
        with contextlib.suppress(Exception):
            fn()
    if _deferring:
        return
    raise StopRequested(f"stopped by {signal.Signals(signum).name}")


def sigterm_received() -> bool:
    """True once SIGTERM arrived: whatever exception is unwinding now is the stop, not a failure."""
    return _received.is_set()


@contextlib.contextmanager
def first_on_sigterm(fn: Callable[[], None]) -> Iterator[None]:
    """While inside, SIGTERM runs `fn` in the handler itself, before any stack unwinds. For marks that must exist
    before libraries react to the interruption (Ray Tune stops its trials while the exception passes through it,
    and a trial whose workers vanish would otherwise record itself as failed)."""
    _first_things.append(fn)
    try:
        yield
    finally:
        _first_things.remove(fn)


@contextlib.contextmanager
def sigterm_deferred() -> Iterator[None]:
    """Bookkeeping that must not be cut in half (a shard listed in the manifest but missing from the summary):
    a SIGTERM that arrives inside is raised as StopRequested when the block has finished."""
    global _deferring
    _deferring += 1
    try:
        yield
    finally:
        _deferring -= 1
    if not _deferring:
        raise_if_stopping()


def raise_if_stopping() -> None:
    """For loops whose calls may swallow the interruption (a broad except around a Ray call): stop here."""
    if _received.is_set():
        raise StopRequested("stopped by SIGTERM")


def install_sigterm_handler() -> bool:
    """Turn SIGTERM into StopRequested; only possible (and only done) in the main thread. Returns whether it was."""
    global _installed
    if threading.current_thread() is not threading.main_thread():
        return False
    signal.signal(signal.SIGTERM, _on_sigterm)
    _installed = True
    return True


def reclaim_sigterm() -> None:
    """Put our handler back after `ray.init`, which replaces it in the driver (a Python handler that calls
    sys.exit, and a C++ one that logs "SIGTERM received" and exits). Only where the CLI installed ours."""
    if _installed and threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _on_sigterm)
