"""Crash-safe local files: a reader sees the old content or the new one, never an empty or half-written file.

`atomic_write` is the project's one way to write a file that something else will trust: the content goes to a
temp name in the same directory, is fsynced, renamed over the target, and the directory is fsynced. A plain
`write_text` truncates first, so a crash or a full disk leaves an empty status.json / manifest / `latest` that
every later run trips over. A temp name is ``<name>.tmp-<pid>-<ns>``, a form no published name can take (those
end in their suffix: ``.parquet``, ``.jsonl``, ``.json``), so a directory's owner can sweep what a killed writer
left behind (`remove_stale_tmp`) without touching a file whose name merely contains ``.tmp-`` (a shard may be
called that).
"""

from __future__ import annotations

import hashlib
import os
import re
import time
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO

TMP_MARK = ".tmp-"
_TMP = re.compile(r"\.tmp-\d+-\d+$")


def is_tmp(name: str) -> bool:
    """A temp file of `tmp_path_for` (its name ends in ``.tmp-<pid>-<ns>``), not a published file."""
    return _TMP.search(name) is not None

Writer = Callable[[Path], None]  # writes the whole file at the path it is given (pyarrow, tarfile, torch.save)


def fsync_dir(directory: Path) -> None:
    """Make a rename inside `directory` durable."""
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def tmp_path_for(final: Path) -> Path:
    """A temp name beside `final`, unique per process and call, recognisable by `TMP_MARK`."""
    return final.with_name(f"{final.name}{TMP_MARK}{os.getpid()}-{time.monotonic_ns()}")


def atomic_write(final: Path, content: bytes | str | Writer,
                 name_for: Callable[[Path], Path] | None = None) -> Path:
    """Replace `final` atomically and durably: temp file + fsync + os.replace + fsync of the directory.

    `content` is the bytes (or text, UTF-8) to write, or a function that writes the whole file at the temp
    path it is given. On any failure, a full disk or a SIGTERM included, no temp file is left behind.
    `name_for(tmp)`, when given, names the file from what was written (a content-addressed name beside
    `final`). Returns the path written.
    """
    final = Path(final)
    tmp = tmp_path_for(final)
    try:
        if callable(content):
            content(tmp)
            if not tmp.is_symlink():  # a link has no data of its own: the directory fsync below makes it durable
                with open(tmp, "rb+") as f:
                    os.fsync(f.fileno())
        else:
            data = content.encode() if isinstance(content, str) else content
            with open(tmp, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
        if name_for is not None:
            final = name_for(tmp)
        os.replace(tmp, final)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(final.parent)
    return final


def atomic_symlink(final: Path, target: str) -> None:
    """Point the symlink `final` at `target` atomically: readers see the old target or the new one, never none.

    Why: a directory of files (a deploy bundle) cannot be replaced in one step, but a link to it can; `target`
    is best relative to `final`'s directory so the pair can be moved together.
    """
    atomic_write(Path(final), lambda tmp: os.symlink(target, tmp))


def remove_stale_tmp(directory: Path) -> int:
    """Delete temp files a killed writer left in `directory` (only its owner may: it holds the lock)."""
    n = 0
    for p in Path(directory).glob(f"*{TMP_MARK}*"):
        if is_tmp(p.name):
            p.unlink(missing_ok=True)
            n += 1
    return n


def sha256_stream(f: BinaryIO, chunk: int = 1 << 20) -> str:
    """SHA-256 of everything left in a binary stream."""
    h = hashlib.sha256()
    while block := f.read(chunk):
        h.update(block)
    return h.hexdigest()


def file_sha256(path: Path) -> str:
    """SHA-256 of a local file (checkpoints, bundles, cache files)."""
    with open(path, "rb") as f:
        return sha256_stream(f)


# (resolved path, expected checksum) -> (size, mtime, ctime, inode) when its checksum last matched in this process
_VERIFIED: dict[tuple[str, str], tuple[int, int, int, int]] = {}


def _stat_identity(path: Path) -> tuple[int, int, int, int]:
    st = path.stat()
    return (st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino)


def is_verified(path: Path, sha256: str) -> bool:
    """This process already saw `path` hash to `sha256`, and its size/mtime/ctime/inode have not moved since."""
    return _VERIFIED.get((str(Path(path).resolve()), sha256)) == _stat_identity(Path(path))


def checksum_matches(path: Path, sha256: str) -> bool:
    """The file's SHA-256 is `sha256`; hashed once per process while its size/mtime/ctime/inode stay the same."""
    if is_verified(path, sha256):
        return True
    if file_sha256(Path(path)) != sha256:
        return False
    remember_verified(path, sha256)
    return True


def remember_verified(path: Path, sha256: str) -> None:
    """The caller has just written `path` from bytes whose SHA-256 it checked: no need to hash the file again."""
    _VERIFIED[(str(Path(path).resolve()), sha256)] = _stat_identity(Path(path))
