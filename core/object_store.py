"""Object storage (`s3://` URLs) for input shards and the cache, through fsspec's s3fs.

Credentials, region and endpoint come from the usual AWS chain (``AWS_ACCESS_KEY_ID``/``AWS_SECRET_ACCESS_KEY``,
``AWS_PROFILE``, instance roles; ``AWS_ENDPOINT_URL`` for S3-compatible stores such as MinIO), never from a
config file. Ray actors on other nodes read them from their own environment.

What object stores lack and how the cache copes (see teacher_cache/remote_cache.py):

- no rename: cache files are written under their final, content-addressed name; the manifest object (one PUT,
  atomic per object) is replaced last, and readers trust only what it lists;
- no flock: `ObjectLock` creates a lock object with a conditional PUT (``If-None-Match: *``), holding an owner
  and a lease that the holder renews (``If-Match``); an expired lease is broken with a conditional DELETE.
"""

from __future__ import annotations

import contextlib
import fnmatch
import json
import logging
import os
import posixpath
import socket
import threading
import time
import uuid
from dataclasses import dataclass
from typing import Any, BinaryIO

import braceexpand

log = logging.getLogger(__name__)
SCHEMES = ("s3://",)
MAGIC = "*?["


def is_url(p: object) -> bool:
    """An object-store location (``s3://bucket/key``), as opposed to a local path."""
    return str(p).startswith(SCHEMES)


def join(url: str, *parts: str) -> str:
    return posixpath.join(url.rstrip("/"), *parts)


_FS: dict[int, Any] = {}


def filesystem() -> Any:
    """One s3fs filesystem per process (s3fs is not fork-safe: a forked loader worker makes its own), without
    listing caches (a refresh must see the store as it is now)."""
    pid = os.getpid()
    if pid not in _FS:
        try:
            import s3fs
        except ImportError as exc:  # pragma: no cover - a dependency of the package
            raise RuntimeError("s3:// paths need the s3fs package: pip install s3fs") from exc
        _FS.clear()  # an inherited parent's instance must not be touched here
        _FS[pid] = s3fs.S3FileSystem(use_listings_cache=False, skip_instance_cache=True)
    return _FS[pid]


def reset_filesystem() -> None:
    """Forget the filesystem (e.g. after AWS_ENDPOINT_URL or the credentials changed in this process)."""
    _FS.clear()


@dataclass(frozen=True)
class ObjectInfo:
    """What the store reports for one object in a listing: no read of the object itself."""

    url: str
    size: int
    mtime_ns: int
    etag: str


def _info(entry: dict) -> ObjectInfo:
    lm = entry.get("LastModified")
    mtime_ns = int(lm.timestamp()) * 10**9 + lm.microsecond * 1000 if lm is not None else 0
    etag = str(entry.get("ETag") or entry.get("etag") or "").strip('"')
    return ObjectInfo("s3://" + entry["name"].removeprefix("s3://"), int(entry["size"]), mtime_ns, etag)


def stat(url: str) -> ObjectInfo:
    """One HEAD request (only used when a listing did not already report the object)."""
    try:
        return _info(filesystem().info(url))
    except FileNotFoundError:
        raise FileNotFoundError(f"{url}: no such object (check the bucket, the key and AWS_ENDPOINT_URL)") from None


def list_dir(url: str) -> dict[str, ObjectInfo]:
    """Objects directly under a prefix (LIST requests only, 1,000 objects per request)."""
    try:
        entries = filesystem().ls(url.rstrip("/"), detail=True)
    except FileNotFoundError:
        return {}
    return {i.url: i for e in entries if e.get("type") == "file" for i in [_info(e)]}


def expand(patterns: list[str]) -> tuple[dict[str, ObjectInfo], list[str]]:
    """Brace patterns and globs over object URLs -> ({url: info}, patterns that matched nothing).

    Each directory is listed once however many names or globs point into it, so expanding
    ``train-{000000..000999}.tar`` costs one LIST request per 1,000 objects, not a HEAD per name.
    """
    listings: dict[str, dict[str, ObjectInfo]] = {}  # directory -> {basename: info}
    found: dict[str, ObjectInfo] = {}
    missing: list[str] = []
    for pattern in patterns:
        matched = False
        for expanded in braceexpand.braceexpand(pattern):
            directory, name = posixpath.split(expanded)
            if any(c in directory for c in MAGIC):
                hits = {i.url: i for e in filesystem().glob(expanded, detail=True).values()
                        if e.get("type") == "file" for i in [_info(e)]}
            else:
                if directory not in listings:
                    listings[directory] = {posixpath.basename(u): i for u, i in list_dir(directory).items()}
                listed = listings[directory]
                if any(c in name for c in MAGIC):
                    hits = {i.url: i for n, i in listed.items() if fnmatch.fnmatchcase(n, name)}
                else:  # a plain name (what brace patterns expand to): a lookup, not a scan of the listing
                    hits = {listed[name].url: listed[name]} if name in listed else {}
            found.update(hits)
            matched = matched or bool(hits)
            if not hits and not any(c in expanded for c in MAGIC):
                missing.append(expanded)
        if not matched and pattern not in missing:
            missing.append(pattern)
    return found, missing


def open_read(url: str) -> BinaryIO:
    """A sequential reader (read-ahead blocks): shards are streamed once, front to back."""
    return filesystem().open(url, "rb", block_size=8 << 20, cache_type="readahead")


def get_bytes(url: str) -> bytes | None:
    """The object's bytes, or None when it does not exist."""
    try:
        return filesystem().cat_file(url)
    except FileNotFoundError:
        return None


def put_bytes(url: str, data: bytes) -> None:
    """One PUT: readers see the old object or the new one, never a mix."""
    filesystem().pipe_file(url, data)


def put_file(local: str | os.PathLike, url: str) -> None:
    filesystem().put_file(str(local), url)


def delete(url: str) -> None:
    with contextlib.suppress(FileNotFoundError):
        filesystem().rm_file(url)


def _bucket_key(url: str) -> tuple[str, str]:
    bucket, _, key = url.removeprefix("s3://").partition("/")
    return bucket, key


def _precondition_failed(exc: OSError) -> bool:
    """The store refused a conditional request (HTTP 412), as opposed to any other error.

    s3fs maps several error codes to the same OSError; the botocore error it was made from says which one.
    """
    if isinstance(exc, FileExistsError):  # s3fs's own mapping of a failed If-None-Match
        return True
    response = getattr(exc.__cause__, "response", None) or {}
    code = str(response.get("Error", {}).get("Code", ""))
    status = response.get("ResponseMetadata", {}).get("HTTPStatusCode")
    return code in ("PreconditionFailed", "412") or status == 412


def put_if_absent(url: str, data: bytes) -> str | None:
    """Create the object only if no object has that key (``If-None-Match: *``): its ETag, or None if it exists."""
    bucket, key = _bucket_key(url)
    try:
        out = filesystem().call_s3("put_object", Bucket=bucket, Key=key, Body=data, IfNoneMatch="*")
    except OSError as exc:
        if _precondition_failed(exc):
            return None
        raise
    return str(out["ETag"]).strip('"')


def put_if_match(url: str, data: bytes, etag: str) -> str | None:
    """Replace the object only if it is still the one we wrote (``If-Match``): the new ETag, or None."""
    bucket, key = _bucket_key(url)
    try:
        out = filesystem().call_s3("put_object", Bucket=bucket, Key=key, Body=data, IfMatch=f'"{etag}"')
    except OSError as exc:
        if isinstance(exc, FileNotFoundError) or _precondition_failed(exc):
            return None
        raise
    return str(out["ETag"]).strip('"')


def delete_if_match(url: str, etag: str) -> bool:
    """Delete the object only if it is the one we saw (``If-Match``), so two breakers of a stale lock cannot
    both delete a lock that a third job has just taken."""
    bucket, key = _bucket_key(url)
    try:
        filesystem().call_s3("delete_object", Bucket=bucket, Key=key, IfMatch=f'"{etag}"')
    except OSError as exc:
        if isinstance(exc, FileNotFoundError) or _precondition_failed(exc):
            return False
        raise
    return True


def get_with_etag(url: str) -> tuple[bytes, str] | None:
    """The object's bytes and the ETag of exactly those bytes (one GET), or None when it does not exist."""
    from fsspec.asyn import sync

    fs = filesystem()
    bucket, key = _bucket_key(url)

    async def get() -> tuple[bytes, str] | None:
        try:
            out = await fs._call_s3("get_object", Bucket=bucket, Key=key)
        except FileNotFoundError:
            return None
        return await out["Body"].read(), str(out["ETag"]).strip('"')

    return sync(fs.loop, get)


class CacheLockedError(RuntimeError):
    """Another job is writing this cache (a local directory's flock, or an object-store prefix's lock object)."""


class ObjectLock:
    """Exclusive lock on an object-store prefix: ``<prefix>/.lock`` created with a conditional PUT.

    The object holds the owner (host, pid, a random id) and a lease expiry. The holder renews the lease every
    third of it; a job that dies without releasing leaves a lease that expires, and the next job breaks it with
    a conditional DELETE (If-Match the ETag it read), so a lock taken in the meantime is never deleted. Stores
    without conditional writes cannot give this guarantee: run refreshes of one cache from one scheduler there.
    """

    def __init__(self, prefix: str, lease_s: float = 120.0, wait: bool = False) -> None:
        self.url = join(prefix, ".lock")
        self.lease_s = lease_s
        self.wait = wait
        self.owner = f"pid {os.getpid()} on {socket.gethostname()} ({uuid.uuid4().hex[:8]})"
        self.etag: str | None = None
        self.lost = False
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _body(self) -> bytes:
        return json.dumps({"owner": self.owner, "expires": time.time() + self.lease_s,
                           "since": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}).encode()

    def __enter__(self) -> ObjectLock:
        while True:
            etag = put_if_absent(self.url, self._body())
            if etag is not None:
                self.etag = etag
                break
            held = get_with_etag(self.url)
            if held is None:
                continue  # released between our PUT and our GET: try again
            data, held_etag = held
            try:
                info = json.loads(data)
                expires, owner = float(info["expires"]), str(info.get("owner", "unknown"))
            except (ValueError, KeyError, TypeError):
                expires, owner = 0.0, "unreadable lock object"
            if time.time() > expires:
                log.warning("breaking the expired lock of %s (held by %s)", self.url, owner)
                delete_if_match(self.url, held_etag)
                continue
            if not self.wait:
                raise CacheLockedError(
                    f"{self.url.rsplit('/', 1)[0]} is being written by another job ({owner}, lease until "
                    f"{time.strftime('%H:%M:%S', time.localtime(expires))}); wait for it to finish or stop it "
                    "(a killed job's lock expires with its lease: cache.lock_lease_s)")
            time.sleep(min(2.0, self.lease_s / 4))
        self._thread = threading.Thread(target=self._renew, name="object-lock-renew", daemon=True)
        self._thread.start()
        return self

    def _renew(self) -> None:
        while not self._stop.wait(self.lease_s / 3):
            assert self.etag is not None
            try:
                etag = put_if_match(self.url, self._body(), self.etag)
            except OSError as exc:  # a transient store error: try again at the next tick, the lease still runs
                log.warning("could not renew the lock %s: %s", self.url, exc)
                continue
            if etag is None:
                self.lost = True
                log.error("lost the lock %s (its lease expired and another job took it)", self.url)
                return
            self.etag = etag

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)
        if self.etag is not None and not self.lost:
            delete_if_match(self.url, self.etag)
        self.etag = None
