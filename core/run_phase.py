"""Has this command's work begun? The CLI's exit code for an error depends on it.

Before a stage begins its work (validation, planning, loading and checking inputs) a ValueError /
FileNotFoundError / config error means "bad input, nothing was done" (exit 2). Once a stage has begun (labelling
shards, training variants, writing files others read), the same error means "failed during the run" (exit 6):
what finished is kept and a re-run continues. Each stage calls `begin_work()` at that point; the CLI reads
`work_begun()` when an error reaches it and resets the flag per command.
"""

from __future__ import annotations

_begun = False


def begin_work() -> None:
    """Call where a stage starts doing what a re-run would continue (after its inputs were checked)."""
    global _begun
    _begun = True


def work_begun() -> bool:
    return _begun


def reset_work() -> None:
    """The CLI, at the start of each command (several commands may run in one process: tests, notebooks)."""
    global _begun
    _begun = False
