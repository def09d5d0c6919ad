"""Run the CPU decode backend in worker processes (out of the GIL's reach), in order, with bounded read-ahead.

How many processes: ``teacher_cache.layout`` decides from the labeller's share of its node's CPUs (measured).
0 processes = decode in the calling thread (labellers with 2 CPUs or fewer, tests, debugging).

A decode process that dies (a codec crash, an OOM kill) never takes the labeller with it: the chunk it held is
decoded again one sample at a time in a fresh process, and a sample that kills that process too is recorded
as a bad sample (`errors/<shard>.jsonl`) and skipped. With 0 processes there is nothing to isolate: a crashing
sample crashes the caller. Tests make a real decode process crash with `core.hooks_for_tests`.
"""

from __future__ import annotations

import logging
import multiprocessing as mp
import os
import threading
import time
from collections import deque
from collections.abc import Iterable, Iterator
from concurrent.futures import Future, ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool

import numpy as np
import torch

from distill.core import hooks_for_tests
from distill.images.decode import DecodedSample, DecodeSpec, try_decode_cpu
from distill.images.shards import RawSample

log = logging.getLogger(__name__)
_Packed = tuple[str, object, tuple[int, int], list, np.ndarray] | str
CRASHED = "the decode process died on this sample (a crash in the image decoder); skipped"


def _exit_with_parent(parent: int, poll_s: float = 0.5) -> None:
    """Ends this process once its parent is gone (re-parented): a SIGKILLed labeller must not leave decode
    processes behind that hold its pipes (a caller waiting for EOF on them would wait forever)."""
    while True:
        time.sleep(poll_s)
        if os.getppid() != parent:
            os._exit(0)


def _init_worker(parent: int) -> None:
    """One intra-op thread per decode process: the processes are the parallelism (and forked OpenMP pools hang)."""
    torch.set_num_threads(1)
    threading.Thread(target=_exit_with_parent, args=(parent,), daemon=True, name="exit-with-parent").start()


def _decode(raw: RawSample, spec: DecodeSpec) -> DecodedSample | str:
    hooks_for_tests.check_decode(raw.files.values())  # off unless a test switched it on
    return try_decode_cpu(raw, spec)


def _decode_chunk(raws: list[RawSample], spec: DecodeSpec) -> list[_Packed]:
    """Runs in a worker process; numpy arrays travel back through the pipe (no shared-memory fds to leak)."""
    out: list[_Packed] = []
    for raw in raws:
        r = _decode(raw, spec)
        out.append(r if isinstance(r, str) else (r.key, r.label, r.hw, r.views, r.pixels.numpy()))
    return out


def _unpack(p: _Packed) -> DecodedSample | str:
    if isinstance(p, str):
        return p
    key, label, hw, views, arr = p
    return DecodedSample(key, label, hw, views, torch.from_numpy(arr))  # type: ignore[arg-type]


class DecodePool:
    """Ordered map of RawSample -> DecodedSample | reason, over `processes` worker processes (0 = inline)."""

    def __init__(self, spec: DecodeSpec, processes: int, chunk: int = 8) -> None:
        self.spec = spec
        self.processes = processes
        self.chunk = chunk
        self._pool: ProcessPoolExecutor | None = None
        if processes > 0:
            self._pool = self._new_pool(processes)

    def map(self, raws: Iterable[RawSample]) -> Iterator[tuple[str, DecodedSample | str]]:
        """(key, result) in input order; at most 2 chunks per process in flight (bounded memory)."""
        if self._pool is None:
            for raw in raws:
                yield raw.key, _decode(raw, self.spec)
            return
        window: deque[tuple[list[RawSample], Future]] = deque()
        limit = 2 * self.processes
        it = iter(raws)
        while True:
            while len(window) < limit:
                chunk = [r for _, r in zip(range(self.chunk), it, strict=False)]
                if not chunk:
                    break
                window.append((chunk, self._pool.submit(_decode_chunk, chunk, self.spec)))
            if not window:
                return
            chunk, fut = window.popleft()
            try:
                results = [_unpack(p) for p in fut.result()]
            except Exception as exc:  # a worker died (OOM kill, codec crash): never decode its chunk here
                log.warning("decode process failed (%s: %s); restarting the pool and decoding its %d samples one by "
                            "one in a fresh process", exc.__class__.__name__, exc, len(chunk))
                self._restart()
                window = deque((c, self._pool.submit(_decode_chunk, c, self.spec)) for c, _ in window)
                results = self._isolated(chunk)
            for raw, r in zip(chunk, results, strict=True):
                yield raw.key, r

    def worker_pids(self) -> list[int]:
        """The decode processes' ids (their CPU time is the labeller's own when it measures the node's load)."""
        return list(getattr(self._pool, "_processes", None) or {}) if self._pool is not None else []

    def _isolated(self, chunk: list[RawSample]) -> list[DecodedSample | str]:
        """Decode a dead worker's chunk sample by sample in a process of its own: the sample that kills it (if
        the crash was not a one-off) becomes a bad sample, and a fresh process takes the rest."""
        out: list[DecodedSample | str] = []
        solo: ProcessPoolExecutor | None = None
        try:
            for raw in chunk:
                solo = solo or self._new_pool(1)
                try:
                    out.append(_unpack(solo.submit(_decode_chunk, [raw], self.spec).result()[0]))
                except BrokenProcessPool:
                    log.warning("sample %s killed its decode process; recorded as a bad sample", raw.key)
                    out.append(CRASHED)
                    solo.shutdown(wait=False, cancel_futures=True)
                    solo = None
                except Exception as exc:  # noqa: BLE001 - whatever else broke, it broke on this sample alone
                    out.append(f"decoding failed in its process ({exc.__class__.__name__}: {exc}); skipped")
        finally:
            if solo is not None:
                solo.shutdown(wait=True)
        return out

    def _restart(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)
            self._pool = self._new_pool(self.processes)

    def _new_pool(self, processes: int) -> ProcessPoolExecutor:
        """spawn, not fork: a forked worker inherits the cache directory's lock fd (a SIGKILLed job would keep
        its lock while orphaned workers live) and is unsafe once CUDA is initialised. Costs one import each."""
        return ProcessPoolExecutor(processes, mp_context=mp.get_context("spawn"), initializer=_init_worker,
                                   initargs=(os.getpid(),))

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None
