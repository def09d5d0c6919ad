"""Versions a reader holds: a directory per manifest version that nobody changes, and that stays while a process
uses it (a shared flock on its ``.in-use`` file, taken before it is filled and kept until the process ends: a
killed process's flock goes with it).

Two kinds share this: the object-store mirror (core/storage/mirror.py: the version's files copied and checked)
and a local or shared-filesystem cache (`local_version`): ``<dir>/.versions/<version>/`` holds the manifest as
the reader planned with it, a ``.data`` mark naming the directory its files are in (``../..``) and links to the
run summaries (``last_run.json``: they describe the last writer, so a reader sees the current one). A local cache
publishes every file under a content-addressed name, so a name never changes content; the writer removes a file
only when neither the current manifest nor a held version lists it (`collect`), so a refresh never takes a file
from under a running job. No hard links: another user's files cannot be linked where the kernel protects them
(fs.protected_hardlinks), and not every shared filesystem has them.

A reader registers a version under a shared flock on ``.versions/.gc`` and the writer collects under an exclusive
one, so a collection sees every version registered before it, and a registration reads a manifest no collection
can have thinned since.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import logging
import os
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path

from distill.core.atomic_io import atomic_symlink, atomic_write
from distill.core.storage.base import View
from distill.core.storage.names import under

log = logging.getLogger(__name__)
COMPLETE = ".complete"
IN_USE = ".in-use"
VERSIONS = ".versions"
DATA_MARK = ".data"  # in a local version directory: where its files are, relative to it
FILES_MARK = ".files"  # in a local version directory: the names of the files it reads there (JSON list)
GC_LOCK = ".gc"
_HELD: dict[str, int] = {}  # version directory -> fd of its shared flock, for this process's lifetime
# a reader that cannot write the cache directory reads it live (no version): the refresh may then change it
_UNWRITABLE = (errno.EACCES, errno.EPERM, errno.EROFS)


def complete(directory: Path) -> bool:
    return (directory / COMPLETE).exists()


def hold(directory: Path) -> Path:
    """Mark a version directory in use by this process: a shared flock on its `.in-use` file, kept until the
    process ends (or `release`). Taken before the directory is filled, so nobody prunes it under us."""
    if str(directory) in _HELD:
        return directory
    for _ in range(5):
        directory.mkdir(parents=True, exist_ok=True)
        fd = os.open(directory / IN_USE, os.O_RDWR | os.O_CREAT, 0o644)
        fcntl.flock(fd, fcntl.LOCK_SH)
        try:
            same = os.fstat(fd).st_ino == os.stat(directory / IN_USE).st_ino
        except FileNotFoundError:
            same = False  # pruned between our open and our flock: make it again
        if same:
            _HELD[str(directory)] = fd
            return directory
        os.close(fd)
    raise OSError(f"{directory}: removed every time we opened it (another process prunes these versions)")


def hold_version(directory: Path) -> Path:
    """`directory` as this process reads it: a version directory (local or mirrored) is held while it lives,
    so a worker process keeps what its driver planned with even after the driver is gone; any other directory
    is returned as it is."""
    if complete(directory):
        try:
            hold(directory)
        except OSError as exc:  # a version this user may not write (another user's registration)
            log.warning("%s: cannot hold this version (%s); its files may be collected once its other holders end",
                        directory, exc.strerror or exc)
    return directory


def release(directory: Path) -> None:
    """Let go of a version this process held (a long-lived process that moves on; tests)."""
    fd = _HELD.pop(str(directory), None)
    if fd is not None:
        os.close(fd)


def versions(base: Path) -> list[Path]:
    try:
        return [p for p in base.iterdir() if p.is_dir()]
    except FileNotFoundError:
        return []


def remove_unless_held(directory: Path) -> bool:
    """Remove a version directory unless a process holds it (its `.in-use` flock cannot be taken exclusively, or
    this process holds it). True when it went."""
    if str(directory) in _HELD:
        return False
    try:
        fd = os.open(directory / IN_USE, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError:
        return False
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return False  # a running job (or server) reads it
        shutil.rmtree(directory, ignore_errors=True)
        log.info("removed version %s (no process uses it)", directory)
        return True
    finally:
        os.close(fd)


def prune(base: Path, keep: Path | None = None, held: Callable[[Path], None] | None = None) -> int:
    """Remove the versions under `base` that no process holds (their flock can be taken exclusively); call
    `held(directory)` for each one that a process holds. Returns how many went."""
    gone = 0
    for d in versions(base):
        if d != keep and remove_unless_held(d):
            gone += 1
        elif held is not None:
            held(d)
    return gone


@contextlib.contextmanager
def gc_lock(root: Path, exclusive: bool) -> Iterator[None]:
    """Readers register versions under a shared flock, the writer collects under an exclusive one."""
    base = root / VERSIONS
    base.mkdir(parents=True, exist_ok=True)
    fd = os.open(base / GC_LOCK, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH)
        yield
    finally:
        os.close(fd)


def data_dir(directory: Path) -> Path:
    """Where the files of a cache directory are: itself, or for a local version the directory its mark names."""
    try:
        rel = (Path(directory) / DATA_MARK).read_text().strip()
    except (FileNotFoundError, NotADirectoryError):
        return Path(directory)
    return Path(os.path.normpath(Path(directory) / rel))


def local_version(root: Path, build: Callable[[], View], version: str | None = None) -> Path:
    """The version directory of a local cache's current state (or of `version`, which must be the current one
    unless it is registered already). Falls back to `root` itself, with a warning, where this reader may not
    write (a read-only share): then a refresh may change files under it."""
    base = root / VERSIONS
    if root.parent.name == VERSIONS:  # a version directory itself: nothing to make
        return hold_version(root)
    if version is not None and complete(base / version) and complete(hold(base / version)):
        return base / version
    try:
        with gc_lock(root, exclusive=False):  # no collection between reading the manifest and holding it
            view = build()
            if version is not None and view.version != version:
                raise FileNotFoundError(
                    f"{root}: version {version} of this cache is not held on this machine and the directory now "
                    f"holds version {view.version} (refreshed since the job was planned); re-run the job")
            target = hold(base / view.version)
            if not complete(target):
                _fill(root, view, target)
    except OSError as exc:
        if exc.errno not in _UNWRITABLE:
            raise
        log.warning("%s: cannot register a version here (%s); reading the directory as it is, so a refresh during "
                    "this job may change or remove files under it", root, exc.strerror or exc)
        return root
    prune(base, keep=target)
    return target


def _fill(root: Path, view: View, target: Path) -> None:
    """The files readers trust (the manifest as planned), and links to the run summaries (they describe the last
    writer, not a version: a reader sees the current ones); the listed files stay in `root` (content-addressed:
    their names never change content) and are read there."""
    for name in view.optional:
        if "/" not in name:  # run summaries (error files of older builds are read from the data dir)
            link = under(target, name)
            try:
                atomic_symlink(link, os.path.relpath(root / name, target))
            except OSError:  # a filesystem without symlinks: a copy, as it is now
                if (root / name).is_file():
                    atomic_write(link, (root / name).read_bytes())
    for name, data in view.last.items():
        atomic_write(under(target, name), data)
    files = sorted(set(view.files) | {n for n in view.optional if "/" in n})  # (error files of older builds)
    atomic_write(target / FILES_MARK, json.dumps(files).encode())
    atomic_write(target / DATA_MARK, os.path.relpath(root, target).encode())
    atomic_write(target / COMPLETE, view.version.encode())


def _listed_by(directory: Path) -> set[str]:
    try:
        return set(json.loads((directory / FILES_MARK).read_bytes()))
    except FileNotFoundError:  # being filled (under the shared gc lock, so not now) or not ours: keep it whole
        return set()
    except ValueError as exc:
        raise OSError(f"{directory / FILES_MARK}: damaged ({exc}); delete {directory} once no job uses it") from exc


def collect(root: Path, names: list[str]) -> list[str]:
    """Under the exclusive gc lock (`gc_lock`), by the writer: remove the versions nobody holds, and return those
    of `names` (files no current manifest entry lists) that no held version lists either: they may go."""
    keep: set[str] = set()
    prune(root / VERSIONS, held=lambda d: keep.update(_listed_by(d)))
    return [n for n in names if n not in keep]
