"""Object storage (`s3://` URLs) through fsspec's s3fs: the requests themselves, one per call where S3 allows it.

Credentials, region and endpoint come from the usual AWS chain (``AWS_ACCESS_KEY_ID``/``AWS_SECRET_ACCESS_KEY``,
``AWS_PROFILE``, instance roles; ``AWS_ENDPOINT_URL`` for S3-compatible stores such as MinIO), never from a
config file. Ray actors on other nodes read them from their own environment.

Stage code does not call this module: `core.storage` puts a local directory and an object-store prefix behind one
interface (content-addressed names instead of rename, a lease lock instead of flock). Reads are single GETs
(s3fs's own `open`/`cat_file` add a HEAD per object), so labelling a shard costs one request to read it.
"""

from __future__ import annotations

import contextlib
import fnmatch
import io
import os
import posixpath
from dataclasses import dataclass
from typing import Any, BinaryIO, cast

import braceexpand

from distill.core.errors import DistillError

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


def endpoint() -> str:
    """Which store this process talks to (for messages and per-store memos)."""
    return os.environ.get("AWS_ENDPOINT_URL") or "AWS S3"


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


def walk(url: str, prefix: str = "") -> dict[str, ObjectInfo]:
    """Every object under a prefix, at any depth (one paginated LIST without a delimiter); with `prefix`, only
    the keys that start with ``<url>/<prefix>`` (the store filters them: one LIST however large the directory)."""
    try:
        found = filesystem().find(url.rstrip("/"), detail=True, prefix=prefix)
    except FileNotFoundError:
        return {}
    return {i.url: i for e in found.values() if e.get("type", "file") == "file" for i in [_info(e)]}


def glob(pattern: str) -> dict[str, ObjectInfo]:
    """Objects matching a glob (``root/*/manifest.json``): LIST requests only."""
    return {i.url: i for e in filesystem().glob(pattern, detail=True).values() if e.get("type") == "file"
            for i in [_info(e)]}


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
                hits = glob(expanded)
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


def _bucket_key(url: str) -> tuple[str, str]:
    bucket, _, key = url.removeprefix("s3://").partition("/")
    return bucket, key


def _sync(coro_fn: Any, *args: Any) -> Any:
    from fsspec.asyn import sync

    return sync(filesystem().loop, coro_fn, *args)


class _ObjectStream(io.RawIOBase):
    """The body of one GET, read as it arrives (one request per object, however it is read)."""

    def __init__(self, url: str, etag: str | None) -> None:
        super().__init__()
        self.url, self._etag = url, etag
        self._body: Any = None  # aiobotocore's streaming body once opened

    def readable(self) -> bool:
        return True

    def _open(self) -> Any:
        bucket, key = _bucket_key(self.url)
        kw = {"IfMatch": f'"{self._etag}"'} if self._etag else {}
        try:
            out = filesystem().call_s3("get_object", Bucket=bucket, Key=key, **kw)
        except FileNotFoundError:
            raise FileNotFoundError(f"{self.url}: no such object (check the bucket, the key and "
                                    "AWS_ENDPOINT_URL)") from None
        except OSError as exc:
            if _precondition_failed(exc):
                raise OSError(f"{self.url}: replaced since it was listed (ETag {self._etag}); re-run") from None
            raise
        return out["Body"]

    def readinto(self, buffer: Any) -> int:
        if self._body is None:
            self._body = self._open()
        body = self._body
        try:
            data = _sync(body.read, len(buffer))
        except Exception as exc:  # noqa: BLE001 - aiohttp's payload errors are not OSError; the shard fails alone
            raise OSError(f"{self.url}: read failed mid-object ({exc.__class__.__name__}: {exc})") from exc
        buffer[:len(data)] = data
        return len(data)

    def close(self) -> None:
        if self._body is not None:
            with contextlib.suppress(Exception):
                self._body.close()
            self._body = None
        super().close()


def open_read(url: str, etag: str | None = None) -> BinaryIO:
    """A sequential reader over one GET (with ``If-Match`` when the listing's ETag is known: a shard replaced
    between listing and reading fails instead of pairing the new bytes with the old identity)."""
    return cast(BinaryIO, io.BufferedReader(_ObjectStream(url, etag), buffer_size=8 << 20))


def get_bytes(url: str) -> bytes | None:
    """The object's bytes (one GET), or None when it does not exist."""
    got = get_with_etag(url)
    return None if got is None else got[0]


def get_with_etag(url: str) -> tuple[bytes, str] | None:
    """The object's bytes and the ETag of exactly those bytes (one GET), or None when it does not exist."""
    fs = filesystem()
    bucket, key = _bucket_key(url)

    async def get() -> tuple[bytes, str] | None:
        try:
            out = await fs._call_s3("get_object", Bucket=bucket, Key=key)
        except FileNotFoundError:
            return None
        try:
            return await out["Body"].read(), str(out["ETag"]).strip('"')
        finally:
            out["Body"].close()

    return _sync(get)


def head_etag(url: str) -> str | None:
    """The object's ETag (one HEAD), or None when it does not exist."""
    bucket, key = _bucket_key(url)
    try:
        out = filesystem().call_s3("head_object", Bucket=bucket, Key=key)
    except FileNotFoundError:
        return None
    return str(out["ETag"]).strip('"')


def put_bytes(url: str, data: bytes) -> str:
    """One PUT: readers see the old object or the new one, never a mix. Returns the new ETag."""
    bucket, key = _bucket_key(url)
    return str(filesystem().call_s3("put_object", Bucket=bucket, Key=key, Body=data)["ETag"]).strip('"')


def put_file(local: str | os.PathLike, url: str) -> None:
    """One PUT for a small file (s3fs switches to a multipart upload above 5 GiB by itself)."""
    filesystem().put_file(str(local), url)


SINGLE_PUT_MAX = 1 << 30  # files up to this size go up in one PutObject, which answers with the ETag


def upload(local: str | os.PathLike, url: str) -> str:
    """Upload a file; returns the object's ETag (what a listing reports: its identity in the store)."""
    if os.path.getsize(local) > SINGLE_PUT_MAX:
        put_file(local, url)
        return stat(url).etag  # a multipart upload's ETag: one HEAD
    bucket, key = _bucket_key(url)
    with open(local, "rb") as f:
        return str(filesystem().call_s3("put_object", Bucket=bucket, Key=key, Body=f.read())["ETag"]).strip('"')


def delete(url: str) -> None:
    bucket, key = _bucket_key(url)
    with contextlib.suppress(FileNotFoundError):
        filesystem().call_s3("delete_object", Bucket=bucket, Key=key)


def delete_many(urls: list[str]) -> None:
    """DeleteObjects: one request per 1,000 keys of one bucket (missing keys are fine)."""
    by_bucket: dict[str, list[str]] = {}
    for url in urls:
        bucket, key = _bucket_key(url)
        by_bucket.setdefault(bucket, []).append(key)
    for bucket, keys in by_bucket.items():
        for i in range(0, len(keys), 1000):
            objects = [{"Key": k} for k in keys[i:i + 1000]]
            filesystem().call_s3("delete_objects", Bucket=bucket, Delete={"Objects": objects, "Quiet": True})


def _precondition_failed(exc: BaseException) -> bool:
    """The store refused a conditional request (HTTP 412), as opposed to any other error.

    s3fs maps several error codes to the same OSError; the botocore error it was made from says which one.
    """
    if isinstance(exc, FileExistsError):  # s3fs's own mapping of a failed If-None-Match
        return True
    response = getattr(exc.__cause__, "response", None) or getattr(exc, "response", None) or {}
    code = str(response.get("Error", {}).get("Code", ""))
    status = response.get("ResponseMetadata", {}).get("HTTPStatusCode")
    return code in ("PreconditionFailed", "412", "ConditionalRequestConflict") or status in (409, 412)


class PreconditionFailedError(DistillError, OSError):
    """The store refused a conditional write (HTTP 412): the object is not the one the writer last saw."""


def put_conditional(url: str, data: bytes, etag: str | None) -> str:
    """One PUT that lands only on the object the writer knows: ``If-Match`` its ETag, or ``If-None-Match: *``
    when it knows there is none. Returns the new ETag; raises PreconditionFailedError when the store refuses."""
    bucket, key = _bucket_key(url)
    condition = {"IfMatch": f'"{etag}"'} if etag else {"IfNoneMatch": "*"}
    try:
        out = filesystem().call_s3("put_object", Bucket=bucket, Key=key, Body=data, **condition)
    except OSError as exc:  # If-Match on a deleted object: 404 (FileNotFoundError) on AWS S3
        if isinstance(exc, FileNotFoundError) or _precondition_failed(exc):
            raise PreconditionFailedError(f"{url}: {'not ETag ' + etag if etag else 'exists'} any more") from None
        raise
    return str(out["ETag"]).strip('"')


def delete_conditional(items: list[tuple[str, str]], concurrency: int = 32) -> list[str]:
    """DELETE each (url, ETag) with ``If-Match`` (DeleteObjects takes no condition that every store honours), up
    to `concurrency` at a time. Missing objects are fine; returns the URLs whose object had another ETag."""
    import asyncio

    fs = filesystem()

    async def one(url: str, etag: str, gate: asyncio.Semaphore) -> str | None:
        bucket, key = _bucket_key(url)
        async with gate:
            try:
                await fs._call_s3("delete_object", Bucket=bucket, Key=key, IfMatch=f'"{etag}"')
            except FileNotFoundError:
                return None
            except OSError as exc:
                if _precondition_failed(exc):
                    return url
                raise
        return None

    async def every() -> list[str]:
        gate = asyncio.Semaphore(concurrency)
        return [u for u in await asyncio.gather(*(one(u, e, gate) for u, e in items)) if u is not None]

    return _sync(every) if items else []


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
