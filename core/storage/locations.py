"""Input files (shards) wherever they are: local paths and `s3://` objects, expanded, identified, opened.

A local file is a `Path`; an object is an `ObjectLocation` that carries the identity its listing reported, so
deciding whether it changed costs no request. Both expose `name` and `str()`.
"""

from __future__ import annotations

import glob as _glob
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import braceexpand

from distill.core import object_store
from distill.core.storage.base import FileInfo


@dataclass(frozen=True)
class ObjectLocation:
    """An object (``s3://bucket/key``) with the identity its listing reported (no extra request).

    Quacks like the `Path` of a local file where the code needs it: ``name`` and ``str()``. `listed` is anything
    with size, mtime_ns and etag (ctime_ns/inode absent or None).
    """

    url: str
    listed: Any = None

    @property
    def name(self) -> str:
        return self.url.rsplit("/", 1)[-1]

    def __str__(self) -> str:
        return self.url

    def __fspath__(self) -> str:  # never a local file: fail loudly where code would open it as one
        raise TypeError(f"{self.url} is an object URL, not a local path")


Location = Path | ObjectLocation


def parse_location(value: object) -> object:
    """Config values: `s3://bucket/prefix` stays a URL string (a Path would fold its `//`); strings become Paths."""
    if isinstance(value, str) and object_store.is_url(value):
        return value.rstrip("/")
    return Path(value) if isinstance(value, str) else value


def expand(patterns: list[str]) -> list[Location]:
    """Brace patterns and globs (local and ``s3://``, mixed) -> sorted unique existing files.

    Raises FileNotFoundError listing every pattern that matched nothing.
    """
    found: dict[str, Location] = {}
    urls = [p for p in patterns if object_store.is_url(p)]
    missing: list[str] = []
    if urls:
        listed, missing = object_store.expand(urls)
        for url, info in listed.items():
            found[url] = ObjectLocation(url, FileInfo(info.size, info.mtime_ns, etag=info.etag))
    for pattern in (p for p in patterns if not object_store.is_url(p)):
        matched = False
        resolved_dirs: dict[str, Path] = {}
        for expanded in braceexpand.braceexpand(pattern):
            hits = sorted(_glob.glob(expanded)) if _glob.has_magic(expanded) else (
                [expanded] if os.path.exists(expanded) else [])
            for hit in hits:
                head, tail = os.path.split(hit)
                if head not in resolved_dirs:  # one resolve per directory, not per file (20,000 shards)
                    resolved_dirs[head] = Path(head or ".").resolve()
                path = resolved_dirs[head] / tail
                if path.is_symlink():
                    path = path.resolve()
                found[str(path)] = path
                matched = True
            if not hits and not _glob.has_magic(expanded):
                missing.append(expanded)
        if not matched and pattern not in missing:
            missing.append(pattern)
    if missing:
        shown = ", ".join(missing[:5]) + (f" (+{len(missing) - 5} more)" if len(missing) > 5 else "")
        raise FileNotFoundError(f"no shard file matches: {shown}; check the paths in `shards`")
    return [found[k] for k in sorted(found)]


def stat(location: Location) -> FileInfo:
    """A local file's stat; an object's listed identity (or one HEAD request if it was not listed)."""
    if isinstance(location, ObjectLocation):
        info = location.listed
        if info is None:
            o = object_store.stat(location.url)
            return FileInfo(o.size, o.mtime_ns, etag=o.etag)
        return FileInfo(info.size, info.mtime_ns, getattr(info, "ctime_ns", None), getattr(info, "inode", None),
                        info.etag)
    st = location.stat()
    return FileInfo(st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino)


def open_read(location: Location, seekable: bool = False) -> BinaryIO:
    """A binary reader: for an object one streamed GET (If-Match its listed ETag), or with `seekable` ranged
    reads (for skipping over data, e.g. counting tar members); `open` for a local file."""
    if isinstance(location, ObjectLocation):
        if seekable:
            return object_store.filesystem().open(location.url, "rb", block_size=1 << 20)
        etag = getattr(location.listed, "etag", None) if location.listed is not None else None
        return object_store.open_read(location.url, etag)
    return open(location, "rb")


def read_sibling(location: Location, name: str) -> bytes | None:
    """The bytes of the file `name` in the same directory (e.g. the classes.json beside a shard), or None."""
    if isinstance(location, ObjectLocation):
        return object_store.get_bytes(location.url.rsplit("/", 1)[0] + "/" + name)
    sibling = location.parent / name
    return sibling.read_bytes() if sibling.exists() else None
