"""WebDataset shards: expand user patterns, cheap identity, and a strict streaming sample reader.

We read tars with ``tarfile`` in streaming mode instead of webdataset's iterators because the cache needs
strictness that the library does not give: duplicate keys are an error (webdataset silently yields a second
sample when a key's files are not adjacent), truncation must fail the shard with its name, and the bytes are
hashed while they stream so an incremental refresh never reads a shard twice.
"""

from __future__ import annotations

import bz2
import gzip
import hashlib
import lzma
import os
import tarfile
import time
import zlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO, cast

from distill.core import storage
from distill.core.atomic_io import sha256_stream
from distill.core.errors import DistillError
from distill.core.storage import ObjectLocation

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")
# a file timestamp tick is at most 10 ms (Linux, HZ=100, coarse clock); twice that, so a stat within one tick of a
# write is always caught (filesystems with whole-second timestamps, such as FAT, are not covered)
RACY_WINDOW_NS = 20_000_000


class ShardError(DistillError, RuntimeError):
    """A whole shard cannot be read (truncated, not a tar, duplicate key); names the shard."""


ObjectShard = ObjectLocation  # a shard in object storage, with the identity its listing reported
ShardPath = Path | ObjectShard


def expand_shard_patterns(patterns: list[str]) -> list[ShardPath]:
    """Brace patterns (``train-{000000..000009}.tar``) and globs -> sorted unique existing shards.

    Local paths and ``s3://`` URLs (listed once per directory, identity from the listing) may be mixed.
    Raises FileNotFoundError listing every pattern that matched nothing.
    """
    return storage.expand(patterns)


SHARD_SUFFIXES = (".tar.gz", ".tgz", ".tar.bz2", ".tar.xz", ".tar")


def shard_stem(path: ShardPath) -> str:
    """Cache file name for a shard: its file name without the .tar/.tar.gz/.tgz/.tar.bz2/.tar.xz suffix."""
    name = path.name
    for suffix in SHARD_SUFFIXES:
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return Path(name).stem


@dataclass(frozen=True)
class ShardIdentity:
    """Cheap identity (size, mtime, ctime, inode) plus an optional content hash computed only when needed.

    Size + mtime alone is fooled by copies that keep the mtime (`cp -p`, `rsync -t`, unpacked archives); ctime
    cannot be set by user space and a replaced file gets a new inode, so together they catch those rewrites.
    ``ctime_ns``/``inode`` are None when unknown (old manifests): unknown counts as moved, so we hash once.
    For an object, the cheap identity is what its listing reports: size, last-modified and ETag.

    A file's timestamps only move when the filesystem's clock ticks (one coarse tick, up to 10 ms, on Linux before
    6.13), so a file rewritten in place, with the same size, in the same tick as the write that was recorded keeps
    all four fields. ``seen_ns`` (the wall clock just after the stat) tells those "racy" identities apart, as git
    does for its index: one seen less than `RACY_WINDOW_NS` after the file's last timestamp proves nothing, and
    the next refresh hashes the shard instead of trusting it. Unknown (older manifests) counts as not racy.
    """

    size: int
    mtime_ns: int
    sha256: str | None = None
    ctime_ns: int | None = None
    inode: int | None = None
    etag: str | None = None  # objects only
    seen_ns: int | None = None  # wall clock just after the stat (local files); not part of the cheap identity

    @classmethod
    def stat(cls, path: ShardPath) -> ShardIdentity:
        """A local file's stat; an object's listed identity (or one HEAD request if it was not listed)."""
        i = storage.stat(path)
        seen = time.time_ns() if i.etag is None else None  # an object's ETag moves with every write: never racy
        return cls(size=i.size, mtime_ns=i.mtime_ns, ctime_ns=i.ctime_ns, inode=i.inode, etag=i.etag, seen_ns=seen)

    def racy(self) -> bool:
        """Seen so soon after its last write that a same-size rewrite in the same clock tick would look the same."""
        if self.seen_ns is None or self.etag is not None:
            return False
        return self.seen_ns - max(self.mtime_ns, self.ctime_ns or 0) < RACY_WINDOW_NS

    def cheap(self) -> tuple[int, int, int | str | None, int | None]:
        if self.etag is not None:
            return (self.size, self.mtime_ns, self.etag, -1)
        return (self.size, self.mtime_ns, self.ctime_ns, self.inode)

    def same_cheap(self, other: ShardIdentity) -> bool:
        """True only if every cheap field is known on both sides and equal (unknown = moved)."""
        return None not in self.cheap() and self.cheap() == other.cheap()


def open_shard(path: ShardPath, seekable: bool = False) -> BinaryIO:
    """A binary reader for a local shard or a shard object (one streamed GET; `seekable` for tar headers only)."""
    return storage.open_read(path, seekable=seekable)


def file_sha256(path: ShardPath) -> str:
    """Content hash of a shard, local or in object storage (streamed once)."""
    with open_shard(path) as f:
        return sha256_stream(f)


class _HashingReader:
    """File wrapper that hashes every byte tarfile reads, so labelling a shard also yields its content hash."""

    def __init__(self, raw: BinaryIO) -> None:
        self._raw = raw
        self.hash = hashlib.sha256()
        self.bytes_read = 0

    def read(self, size: int = -1) -> bytes:
        data = self._raw.read(size)
        self.hash.update(data)
        self.bytes_read += len(data)
        return data


class _CountingReader:
    """Counts the bytes read from a (decompressed) stream: the truncation check needs tar offsets, which are
    positions in the uncompressed tar, not in the compressed file."""

    def __init__(self, raw: BinaryIO) -> None:
        self._raw = raw
        self.bytes_read = 0

    def read(self, size: int = -1) -> bytes:
        data = self._raw.read(size)
        self.bytes_read += len(data)
        return data


def _decompressed(hasher: _HashingReader, head: bytes) -> BinaryIO:
    """The tar byte stream: gzip/bz2/xz detected by magic bytes (not by name), else the file itself."""
    raw = cast(BinaryIO, hasher)  # a minimal readable file object: read() and readable()
    if head.startswith(b"\x1f\x8b"):
        return cast(BinaryIO, gzip.GzipFile(fileobj=raw, mode="rb"))
    if head.startswith(b"BZh"):
        return cast(BinaryIO, bz2.BZ2File(raw, mode="rb"))
    if head.startswith(b"\xfd7zXZ\x00"):
        return cast(BinaryIO, lzma.LZMAFile(raw, mode="rb"))
    return raw


class _Prefixed:
    """Give back the magic bytes we peeked at before the rest of the file (the hash must see every byte once)."""

    def __init__(self, head: bytes, rest: BinaryIO) -> None:
        self._head, self._rest = head, rest

    def read(self, size: int = -1) -> bytes:
        if self._head:
            if size < 0 or size >= len(self._head):
                out, self._head = self._head, b""
                return out + self._rest.read(-1 if size < 0 else size - len(out))
            out, self._head = self._head[:size], self._head[size:]
            return out
        return self._rest.read(size)


@dataclass
class RawSample:
    """One WebDataset sample: its key and the raw bytes of each file extension."""

    key: str
    files: dict[str, bytes] = field(default_factory=dict)


def split_member_name(name: str) -> tuple[str, str]:
    """WebDataset convention: key = path up to the first dot of the basename, ext = the rest (lower-case)."""
    directory, base = os.path.split(name)
    if "." not in base:
        return name, ""
    stem, ext = base.split(".", 1)
    return (os.path.join(directory, stem) if directory else stem), ext.lower()


class ShardReader:
    """Iterate the samples of one tar shard in order; ``sha256`` is valid after full iteration."""

    def __init__(self, path: ShardPath) -> None:
        self.path = path
        self._hasher: _HashingReader | None = None

    @property
    def sha256(self) -> str:
        if self._hasher is None:
            raise RuntimeError("iterate the shard before asking for its hash")
        return self._hasher.hash.hexdigest()

    def __iter__(self) -> Iterator[RawSample]:
        seen: set[str] = set()
        current: RawSample | None = None
        with open_shard(self.path) as raw:
            head = raw.read(6)
            self._hasher = _HashingReader(_Prefixed(head, raw))  # type: ignore[arg-type]
            try:
                stream = _CountingReader(_decompressed(self._hasher, head))
                with tarfile.open(fileobj=stream, mode="r|") as tar:  # type: ignore[call-overload]
                    for member in tar:
                        if not member.isfile():
                            continue
                        key, ext = split_member_name(member.name)
                        if key.startswith("__") or not ext:
                            continue  # e.g. __index__ files some writers add
                        if current is None or key != current.key:
                            if current is not None:
                                yield current
                            if key in seen:
                                raise ShardError(
                                    f"{self.path}: duplicate key '{key}' (its files are not adjacent or the "
                                    "key repeats); fix the shard so that every __key__ appears once")
                            seen.add(key)
                            current = RawSample(key)
                        if ext in current.files:
                            raise ShardError(f"{self.path}: duplicate key '{key}' (file '.{ext}' appears twice)")
                        data = tar.extractfile(member)
                        payload = data.read() if data is not None else b""
                        if len(payload) != member.size:
                            raise ShardError(f"{self.path}: corrupt or truncated tar ('{member.name}' has "
                                             f"{len(payload)} of {member.size} bytes); re-create this shard")
                        current.files[ext] = payload
                    end_of_members = tar.offset
                    # drain the end-of-archive padding (uncompressed), then the raw file, so the hash covers it all
                    while stream.read(1 << 20):
                        pass
                    while self._hasher.read(1 << 20):
                        pass
                    if stream.bytes_read < end_of_members + 1024:
                        raise ShardError(f"{self.path}: corrupt or truncated tar (no end-of-archive marker after "
                                         f"{end_of_members} bytes); re-create this shard")
            except (tarfile.TarError, EOFError, OSError, zlib.error, lzma.LZMAError) as exc:
                raise ShardError(f"{self.path}: corrupt or truncated tar ({exc}); re-create this shard") from exc
        if current is not None:
            yield current

