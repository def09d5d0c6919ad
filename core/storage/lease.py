"""The lock of an object-store prefix: a lease object held by conditional PUTs, and fenced on our own clock.

- **Take**: ``<prefix>/.lock`` is created with ``If-None-Match: *``: of two jobs exactly one gets it.
- **Hold**: the holder rewrites it every third of the lease with ``If-Match`` its last ETag. A failed renewal
  (any error: the store unreachable raises botocore's EndpointConnectionError, which is no OSError) is logged
  and retried sooner; the thread never dies of it.
- **Fence**: before every write the holder checks, on its clock, that its last successful renewal is younger
  than the lease minus a margin (a quarter of it); otherwise it writes nothing more (`LockLostError`). The clock
  is CLOCK_BOOTTIME on Linux: `time.monotonic` stops while a host is suspended, so a holder that wakes up would
  think no time had passed. This check cannot stop a request that passed it and lands late (network, retries, a
  paused process): the store's conditional writes do (core/storage/objects.py).
- **Floor**: the lease is at least `MIN_LEASE_S`. A renewal is sent every third of the lease, and the age the
  fence sees may reach a third of it plus two renewals' round trips, which under load (a busy driver, botocore
  retries) take seconds: a 5 s lease fenced a healthy writer.
- **Break**: a job that finds the lock times its expiry on *its own* monotonic clock from when it first sees an
  ETag, and breaks it (``DELETE If-Match``) only when that ETag stayed unchanged for the holder's whole lease.
  Wall clocks of different hosts are never compared to break a lock (they may be hours apart); the holder's
  wall-clock expiry is only used to refuse early while it is plainly in the future.
  The holder fenced itself a margin before that, so it no longer writes when the breaker starts.
- **Release**: stop renewing, then delete the lock only while its body still names us (a renewal still in flight
  may land before our DELETE: we look again, and a renewal landing after it cannot recreate a deleted object).
- **Capabilities**: at start-up the store must refuse a PUT with ``If-None-Match: *`` on an existing key, a PUT
  and a DELETE with a wrong ``If-Match``; a store that ignores any of them is refused with a clear message.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import threading
import time
import uuid
from collections.abc import Callable

from distill.core import object_store
from distill.core.storage.base import CacheLockedError, Lock, LockLostError, UnsupportedStoreError

log = logging.getLogger(__name__)
MIN_LEASE_S = 30.0  # the renewals' round trips may take ~6 s before a healthy holder fences itself (see Floor)
BOTOCORE_FLOOR = "1.35.69"  # PutObject If-Match (1.35.69), DeleteObject If-Match (1.35.67), If-None-Match (1.35.2)
_PROBED: set[tuple[str, str]] = set()


def boottime() -> float:
    """Seconds on a clock that keeps counting while the host is suspended (CLOCK_BOOTTIME), where there is one."""
    if hasattr(time, "CLOCK_BOOTTIME"):
        return time.clock_gettime(time.CLOCK_BOOTTIME)
    return time.monotonic()  # pragma: no cover - not Linux


def missing_conditional_parameters(put_members: set[str], delete_members: set[str]) -> list[str]:
    """Which request parameters the lock needs that botocore's S3 model lacks (empty: all there)."""
    need = [("PutObject", "IfNoneMatch", put_members), ("PutObject", "IfMatch", put_members),
            ("DeleteObject", "IfMatch", delete_members)]
    return [f"{op}.{param}" for op, param, members in need if param not in members]


def check_client() -> None:
    """The installed botocore must send the conditions (older ones refuse the parameters client-side)."""
    import botocore
    import botocore.session

    model = botocore.session.get_session().get_service_model("s3")
    missing = missing_conditional_parameters(set(model.operation_model("PutObject").input_shape.members),
                                             set(model.operation_model("DeleteObject").input_shape.members))
    if missing:
        raise UnsupportedStoreError(
            f"botocore {botocore.__version__} cannot send {', '.join(missing)} (conditional writes), which the "
            f"object-store lock needs; install botocore>={BOTOCORE_FLOOR} (pip install -U 'botocore>="
            f"{BOTOCORE_FLOOR}' s3fs)")


def probe_conditional_writes(prefix: str) -> None:
    """Check once per process and bucket that the store honours the three conditions the lock relies on."""
    key = (object_store.endpoint(), prefix.removeprefix("s3://").split("/", 1)[0])
    if key in _PROBED:
        return
    check_client()
    url = object_store.join(prefix, f".lock-probe-{uuid.uuid4().hex[:12]}")
    fix = ("the lock needs conditional writes (AWS S3 since 2024, MinIO, moto do them); upgrade the store, or "
           "point cache_root at one that does")
    try:
        if object_store.put_if_absent(url, b"first") is None:
            raise UnsupportedStoreError(f"{object_store.endpoint()}: could not create {url}; {fix}")
        if object_store.put_if_absent(url, b"second") is not None:
            raise UnsupportedStoreError(f"{object_store.endpoint()} ignores If-None-Match on PUT; {fix}")
        if object_store.put_if_match(url, b"third", "0" * 32) is not None:
            raise UnsupportedStoreError(f"{object_store.endpoint()} ignores If-Match on PUT; {fix}")
        object_store.delete_if_match(url, "0" * 32)
        if object_store.head_etag(url) is None:
            raise UnsupportedStoreError(f"{object_store.endpoint()} ignores If-Match on DELETE (it deleted an "
                                        f"object whose ETag did not match); {fix}")
    finally:
        object_store.delete(url)
    _PROBED.add(key)


class LeaseLock(Lock):
    """Exclusive lock on an object-store prefix (see the module docstring for the protocol)."""

    def __init__(self, url: str, lease_s: float = 120.0, wait: bool = False, *,
                 clock: Callable[[], float] | None = None, sleep: Callable[[float], None] = time.sleep,
                 on_change: Callable[[LeaseLock | None], None] | None = None) -> None:
        self.url, self.lease_s, self.wait = url, float(lease_s), wait
        self.margin = self.lease_s / 4
        self.owner = f"pid {os.getpid()} on {socket.gethostname()} ({uuid.uuid4().hex[:12]})"
        self.clock = clock or (lambda: boottime())  # (looked up per call: a test may drive the module's clock)
        self.sleep, self.on_change = sleep, on_change
        self.etag: str | None = None
        self.lost = False
        self.renewal_failures = 0
        self._last_ok = 0.0  # clock() when the last successful renewal (or the creation) was sent
        self._n = 0
        self._released = threading.Event()
        self._mutex = threading.Lock()
        self._thread: threading.Thread | None = None

    def _body(self) -> bytes:
        self._n += 1  # every body differs, so every renewal changes the ETag that breakers watch
        return json.dumps({"owner": self.owner, "lease_s": self.lease_s, "renewal": self._n,
                           "expires": time.time() + self.lease_s,
                           "since": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}).encode()

    def __enter__(self) -> LeaseLock:
        probe_conditional_writes(self.url.rsplit("/", 1)[0])
        seen: str | None = None  # the holder's ETag we are timing, and since when (our clock)
        first_seen = 0.0
        while True:
            sent = self.clock()
            etag = object_store.put_if_absent(self.url, self._body())
            if etag is not None:
                self.etag, self._last_ok = etag, sent
                break
            held = object_store.get_with_etag(self.url)
            if held is None:
                continue  # released between our PUT and our GET: try again
            owner, holder_lease, expires = _parse(held[0], self.lease_s)
            if held[1] != seen:
                moved, seen, first_seen = seen is not None, held[1], self.clock()
                looks_live = 0 < expires - time.time() <= 2 * holder_lease  # the holder's wall clock: refuse only
                if not self.wait and (moved or looks_live):
                    raise CacheLockedError(_locked_message(self.url, owner, expires, moved))
            elif self.clock() - first_seen >= holder_lease:
                log.warning("breaking the lock %s of %s: unchanged for its whole lease (%g s) on our clock",
                            self.url, owner, holder_lease)
                object_store.delete_if_match(self.url, held[1])
                seen = None
                continue
            self.sleep(min(2.0, holder_lease / 10))
        if self.on_change is not None:
            self.on_change(self)
        self._thread = threading.Thread(target=self._renew_loop, name="object-lock-renew", daemon=True)
        self._thread.start()
        return self

    def _renew_loop(self) -> None:
        ok = True
        while not self._released.wait(self.lease_s / 3 if ok else self.lease_s / 12):
            ok = self.renew()
            if self.lost:
                return

    def renew(self) -> bool:
        """One renewal; any error is logged and counted (the fence, not this thread, stops the writer)."""
        with self._mutex:
            if self._released.is_set() or self.lost or self.etag is None:
                return False
            etag, sent = self.etag, self.clock()
        try:
            new = object_store.put_if_match(self.url, self._body(), etag)
            if new is None:  # 412: taken by another job, or our own earlier renewal landed after a timeout
                new = self._still_ours()
        except Exception as exc:  # noqa: BLE001 - EndpointConnectionError, timeouts, 5xx: retried, fenced
            self.renewal_failures += 1
            log.warning("could not renew the lock %s (%s: %s); retrying, and writing nothing once the last "
                        "renewal is %g s old", self.url, exc.__class__.__name__, exc, self.lease_s - self.margin)
            return False
        with self._mutex:
            if new is None:
                self.lost = True
                log.error("lost the lock %s: another job holds it now", self.url)
                return False
            self.etag, self._last_ok = new, max(self._last_ok, sent)
        return True

    def _still_ours(self) -> str | None:
        held = object_store.get_with_etag(self.url)
        if held is None or _parse(held[0], self.lease_s)[0] != self.owner:
            return None
        return object_store.put_if_match(self.url, self._body(), held[1])

    def fence(self) -> None:
        """Raise unless we may still write: held, not lost, and renewed within the lease minus the margin."""
        if self.lost or self.etag is None or self._released.is_set():
            raise LockLostError(f"{self.url}: this job no longer holds the lock (released, or taken by another "
                                "job); it writes nothing more; re-run to continue")
        age = self.clock() - self._last_ok
        if age > self.lease_s - self.margin:
            why = (f"{self.renewal_failures} renewal(s) failed: is the store reachable?" if self.renewal_failures
                   else "no renewal failed: the renewals were late, e.g. on a loaded host, or this process was paused "
                   "or its host suspended")
            raise LockLostError(
                f"{self.url}: the lock was last renewed {age:.0f} s ago (lease {self.lease_s:g} s): another job "
                f"may break it, so this job writes nothing more ({why}); re-run to continue, or raise "
                "cache.lock_lease_s")

    def __exit__(self, *exc: object) -> None:
        self._released.set()  # no renewal starts after this; one may be in flight
        if self.on_change is not None:
            self.on_change(None)
        if self.etag is not None and not self.lost:
            try:
                self._delete_if_ours()
            except Exception as err:  # noqa: BLE001 - the lease expires by itself; say so, do not mask `exc`
                log.warning("could not release the lock %s (%s); it expires after its lease", self.url, err)
        if self._thread is not None:
            self._thread.join(timeout=1.0)
        self.etag = None

    def _delete_if_ours(self) -> None:
        for _ in range(5):
            held = object_store.get_with_etag(self.url)
            if held is None or _parse(held[0], self.lease_s)[0] != self.owner:
                return
            if object_store.delete_if_match(self.url, held[1]):
                return  # an in-flight renewal landing now fails its If-Match: a deleted lock stays deleted


def _parse(data: bytes, default_lease: float) -> tuple[str, float, float]:
    """(owner, lease seconds, wall-clock expiry) of a lock object; an unreadable one has no owner."""
    try:
        info = json.loads(data)
        return str(info.get("owner", "unknown")), float(info.get("lease_s", default_lease)), float(info["expires"])
    except (ValueError, KeyError, TypeError, AttributeError):
        return "unreadable lock object", default_lease, 0.0


def _locked_message(url: str, owner: str, expires: float, renewing: bool) -> str:
    state = ("it renewed its lease while we watched" if renewing
             else f"lease until {time.strftime('%H:%M:%S', time.localtime(expires))} by its clock")
    return (f"{url.rsplit('/', 1)[0]} is being written by another job ({owner}, {state}); wait for it to finish "
            "or stop it (a killed job's lock is broken once it stays unchanged for its whole lease: "
            "cache.lock_lease_s)")
