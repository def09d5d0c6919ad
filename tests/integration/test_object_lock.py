"""The object-storage lock, fencing, capability probe and per-version mirror (issue 21, items 1-5 and 8), against
moto's S3 server on 127.0.0.1. Nothing here races the machine's speed: the test stops the server, holds a request
or its response until it releases it, refuses renewals, or drives the breaker's clock itself.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import threading
import time

import pytest
import yaml
from helpers import S3_ROOT, S3_SHARDS, mnist_shard, s3_cache_cfg, save_teacher, upload_mnist_shards
from s3_server import Refuse

from distill.core import object_store
from distill.core.storage import CacheLockedError, LockLostError, UnsupportedStoreError, open_store
from distill.core.storage.lease import LeaseLock, missing_conditional_parameters
from distill.images.shards import ShardReader
from distill.teacher_cache.config import CacheConfig
from distill.teacher_cache.locate import cache_dir_here, find_cache
from distill.teacher_cache.manifest import Manifest, ManifestWriter, ShardEntry
from distill.teacher_cache.reader import CacheError, CacheReader
from distill.teacher_cache.run import run

pytestmark = pytest.mark.integration
DISTILL = [sys.executable, "-c", "from distill.cluster.cli import main; main()"]
SHARDS, ROOT = S3_SHARDS, S3_ROOT


def _upload(tmp_path, n: int, per_shard: int = 16, offset: int = 0) -> list:
    return upload_mnist_shards(tmp_path, n, per_shard, offset)


def _cfg(tmp_path, staging: str = "staging", **over) -> CacheConfig:
    return s3_cache_cfg(tmp_path, staging, **over)


def _renewals(caplog) -> int:
    return sum("could not renew" in r.getMessage() for r in caplog.records)


def test_item1_the_renewal_thread_outlives_an_unreachable_store_and_the_holder_fences_itself(s3, caplog):
    """An unreachable endpoint raises botocore's EndpointConnectionError (not an OSError): the renewal thread must
    log it and keep trying, and the holder must refuse to write once its last renewal is lease - margin old."""
    _, requests = s3
    caplog.set_level(logging.WARNING, logger="distill.core.storage.lease")
    now = [0.0]  # the holder's monotonic clock, driven by the test
    lock = LeaseLock("s3://cache/t1/.lock", lease_s=6.0, clock=lambda: now[0])
    with lock:
        lock.fence()
        requests.stop()  # the store is gone: every request meets a refused connection
        deadline = time.monotonic() + 300
        while _renewals(caplog) < 2:
            assert lock._thread is not None and lock._thread.is_alive(), "the renewal thread died: " + caplog.text
            assert time.monotonic() < deadline, "no renewal was attempted"
            time.sleep(0.1)
        assert "EndpointConnectionError" in caplog.text and lock._thread.is_alive()
        lock.fence()  # no time has passed on the holder's clock: still its lock
        now[0] = 6.0 * 3 / 4 + 0.01  # a quarter of the lease before a breaker could take it
        with pytest.raises(LockLostError, match=r"last renewed 5 s ago .* renewal\(s\) failed"):
            lock.fence()


def test_item2_a_writer_whose_renewals_fail_publishes_nothing_after_its_lease_and_the_next_run_finishes(
        tmp_path, s3):
    """`distill cache` whose lock renewals are refused while it reads a shard: once its lease has run out it must
    not add the shard to the manifest (a breaker may already own the prefix); the next run labels the rest."""
    _, requests = s3
    local = _upload(tmp_path, 3)
    cfg = _cfg(tmp_path, lock_lease_s=30.0)  # the floor (MIN_LEASE_S)
    path = tmp_path / "a.yaml"
    path.write_text(yaml.safe_dump(cfg.model_dump(mode="json")))
    gate_on, release, refused, journalled = threading.Event(), threading.Event(), [], threading.Event()

    def see_journal(method: str, key: str, environ: dict) -> None:
        if method == "PUT" and key.endswith(".jsonl"):
            journalled.set()  # shard 0's manifest record reached the store (its flusher runs apart from the run)

    def hold_second_shard(method: str, key: str, environ: dict) -> None:
        if method == "GET" and key == "shards/train/train-000001.tar" and not release.is_set():
            journalled.wait(300)  # (the record's flush fences on the lock: it lands before renewals are refused)
            gate_on.set()  # shard 0 is published; from now on the lock cannot be renewed

    body = requests.hold("shards/train/train-000001.tar")  # then its body trickles until released (no timeout)

    def refuse_renewals(method: str, key: str, environ: dict) -> None:
        if gate_on.is_set() and method == "PUT" and key.endswith("/.lock") and environ.get("HTTP_IF_MATCH"):
            refused.append(key)
            raise Refuse()

    requests.before += [see_journal, hold_second_shard, refuse_renewals]
    proc = subprocess.Popen([*DISTILL, "cache", "-c", str(path), "--no-ray"], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, env=dict(os.environ))
    try:
        assert gate_on.wait(300), "the run never asked for the second shard"
        t0 = time.monotonic()
        deadline = t0 + 300
        while not refused or time.monotonic() < t0 + 30.5:  # a refused renewal, and a whole lease since the last
            assert time.monotonic() < deadline and proc.poll() is None, proc.communicate()[0][-3000:]
            time.sleep(0.1)
    finally:
        release.set()
        body.release()
    out = proc.communicate(timeout=300)[0]
    assert proc.returncode == 6, out[-3000:]  # failed during the run: finished shards kept, re-run continues
    assert "writes nothing more" in out, out[-3000:]
    fp = object_store.glob(f"{ROOT}/*/manifest.json").popitem()[0].rsplit("/", 2)[-2]
    assert sorted(Manifest.load(open_store(f"{ROOT}/{fp}")).shards) == ["train-000000"]
    requests.before.clear()
    again = run(_cfg(tmp_path, staging="staging-b", lock_lease_s=30.0))
    assert again.status == "success" and sorted(again.labelled) == ["train-000001", "train-000002"]
    m = Manifest.load(open_store(f"{ROOT}/{fp}"))
    stored = set(open_store(f"{ROOT}/{fp}").listing(".parquet"))
    assert stored == {e.file for e in m.shards.values()}  # the fenced writer's upload was swept, nothing else
    reader = CacheReader(find_cache(ROOT)[0], verify=True)
    keys = [k for s in reader.shards for k in reader.arrays(s).keys]
    assert sorted(keys) == sorted(s.key for p in local for s in ShardReader(p)) and len(set(keys)) == len(keys)


def _lock_body(owner: str, expires: float, n: int = 0, lease_s: float = 6.0) -> bytes:
    return json.dumps({"owner": owner, "lease_s": lease_s, "expires": expires, "renewal": n}).encode()


def test_item3_a_live_holder_whose_clock_is_an_hour_behind_is_not_broken(s3):
    """The holder's lease looks expired by our wall clock, but it renews (each time we look, in this test):
    the breaker must see the ETag move on its own clock and refuse, not delete the lock."""
    endpoint, requests = s3
    url = "s3://cache/skew/.lock"
    owner = "pid 1 on a host whose clock is an hour behind"
    assert object_store.put_if_absent(url, _lock_body(owner, time.time() - 3600)) is not None
    import botocore.session

    client = botocore.session.get_session().create_client("s3", endpoint_url=endpoint, region_name="us-east-1")
    renewals = [0]

    def holder_renews(method: str, key: str, environ: dict) -> None:
        if method == "GET" and key == "cache/skew/.lock":
            renewals[0] += 1
            client.put_object(Bucket="cache", Key="skew/.lock",
                              Body=_lock_body(owner, time.time() - 3600 + 6, renewals[0]))

    requests.before.append(holder_renews)
    with pytest.raises(CacheLockedError, match="renewed its lease while we watched"):
        LeaseLock(url, lease_s=6.0).__enter__()
    assert json.loads(object_store.get_bytes(url))["owner"] == owner


def test_item3_a_dead_holder_whose_clock_is_an_hour_ahead_is_broken_after_one_lease_on_our_clock(s3):
    url = "s3://cache/ahead/.lock"
    assert object_store.put_if_absent(url, _lock_body("a killed job", time.time() + 3600)) is not None
    now = [100.0]

    def sleep(s: float) -> None:  # the breaker's clock, advanced by its own waits
        now[0] += s

    lock = LeaseLock(url, lease_s=6.0, clock=lambda: now[0], sleep=sleep)
    with lock:
        assert json.loads(object_store.get_bytes(url))["owner"] == lock.owner
        assert 106.0 <= now[0] < 110.0  # it watched the unchanged ETag for one lease, not until the holder's clock


def test_a_lock_that_plainly_looks_live_is_refused_at_once(s3):
    url = "s3://cache/live/.lock"
    # a lease long enough that it still runs when the lock is first read, however long the start-up probe takes
    object_store.put_if_absent(url, _lock_body("another job", time.time() + 300, lease_s=300.0))
    with pytest.raises(CacheLockedError, match="lease until"):
        LeaseLock(url, lease_s=6.0, sleep=lambda s: pytest.fail("waited for a lock whose lease runs")).__enter__()


def test_item4_a_renewal_in_flight_at_exit_leaves_no_lock_behind(s3):
    """The store applied a renewal, but its response is still on the way when the holder exits: the lock must
    still be deleted (before, exit waited 10 s for the renewal thread, then deleted with the old ETag: 412)."""
    _, requests = s3
    url = "s3://cache/t4/.lock"
    arrived, release = threading.Event(), threading.Event()

    def hold_response(method: str, key: str, environ: dict) -> None:
        if method == "PUT" and key == "cache/t4/.lock" and environ.get("HTTP_IF_MATCH") and not release.is_set():
            arrived.set()
            release.wait(300)

    requests.after.append(hold_response)
    lock = LeaseLock(url, lease_s=6.0)
    lock.__enter__()
    assert arrived.wait(300), "no renewal was sent"
    exiting = threading.Thread(target=lock.__exit__, args=(None, None, None))
    exiting.start()
    exiting.join(120)
    release.set()
    assert not exiting.is_alive()
    assert object_store.get_bytes(url) is None, "a fresh lock was left behind"


def test_item5_a_store_that_ignores_if_match_on_delete_is_refused_before_any_work(tmp_path, s3):
    _, requests = s3
    _upload(tmp_path, 1)

    def ignore_if_match_on_delete(method: str, key: str, environ: dict) -> None:
        if method == "DELETE":
            environ.pop("HTTP_IF_MATCH", None)

    requests.before.append(ignore_if_match_on_delete)
    with pytest.raises(UnsupportedStoreError, match="ignores If-Match on DELETE"):
        run(_cfg(tmp_path))
    assert not [u for u in object_store.glob(f"{ROOT}/**") if not u.endswith(".fingerprints.json")]


def test_item5_the_botocore_floor_is_checked():
    members = {"IfMatch", "IfNoneMatch", "Body"}
    assert missing_conditional_parameters(members, {"IfMatch"}) == []
    assert missing_conditional_parameters({"Body", "IfNoneMatch"}, set()) == ["PutObject.IfMatch",
                                                                             "DeleteObject.IfMatch"]
    from distill.core.storage.lease import check_client

    check_client()  # the installed botocore has them (pyproject pins the floor)


def test_item8_a_mirror_per_manifest_version_survives_a_refresh_and_workers_never_read_another(tmp_path, s3):
    _upload(tmp_path, 2)
    cfg = _cfg(tmp_path)
    run(cfg)
    job1, location = find_cache(ROOT)  # the directory a job planned with, and where its store is
    m1 = Manifest.load(job1)
    before = {e.file: (job1 / e.file).read_bytes() for e in m1.shards.values()}
    time.sleep(1.1)  # last-modified has 1 s resolution: the replaced object must differ anyway
    changed = mnist_shard(tmp_path / "local2" / "train-000001.tar", 16, offset=900)
    object_store.put_file(changed, f"{SHARDS}/train-000001.tar")
    assert run(cfg).labelled == ["train-000001"]
    job2, _ = find_cache(ROOT)
    assert job2 != job1 and job2.parent == job1.parent
    assert {f: (job1 / f).read_bytes() for f in before} == before  # the running job's files are untouched
    assert CacheReader(job1, verify=True).arrays("train-000001").keys == \
        [s.key for s in ShardReader(tmp_path / "local" / "train-000001.tar")]
    # a worker on a machine without the planner's mirror
    os.environ["DISTILL_MIRROR_DIR"] = str(tmp_path / "other-node")
    with pytest.raises(CacheError, match="refreshed since the job was planned"):
        cache_dir_here(tmp_path / "gone" / job1.parent.name / job1.name, location)  # the job planned v1
    here = cache_dir_here(tmp_path / "gone" / job2.parent.name / job2.name, location)
    assert here.is_relative_to(tmp_path / "other-node") and here.name == job2.name
    assert CacheReader(here, verify=True).arrays("train-000001").keys == [s.key for s in ShardReader(changed)]


# --- issue 30, item 1: the store enforces the fence ----------------------------------------------------------

def _entry(stem: str) -> ShardEntry:
    return ShardEntry(f"/shards/{stem}.tar", 1, 1, "0" * 64, f"{stem}-{'0' * 16}.parquet", 1, "0" * 64, 1, 0)


def _holder(store, lease_s: float, clock, sleep=time.sleep) -> LeaseLock:
    """The lock of `store` (one job's view of the prefix) on a clock the test drives."""
    return LeaseLock(store._url(".lock"), lease_s, wait=True, clock=clock, sleep=sleep,
                     on_change=lambda lock: setattr(store, "_lock", lock))


def _take_over(store) -> LeaseLock:
    """Another job breaks the stale holder's lock the way a breaker does (its clock runs a whole lease while the
    lock's ETag stays unchanged: here the test advances it at each of its waits) and takes it."""
    now = [0.0]
    lock = _holder(store, 600.0, lambda: now[0], sleep=lambda s: now.__setitem__(0, now[0] + 600.0))
    return lock.__enter__()


def test_item1_a_stale_journal_object_held_until_another_writer_committed_cannot_replace_its_record(s3):
    """The stale holder passed its clock check and sent a journal object; the store receives it only after another
    job took over and committed a record of its own. Before: the new holder appended to the same generation, so
    the late object had the same name and replaced its record (committed work lost), and the stale holder went on
    to overwrite the snapshot. Now the new holder claims a generation of its own, the late object lands where no
    reader looks, and the stale holder's next write is refused by the store (LockLostError)."""
    _, requests = s3
    url = f"{ROOT}/fp-journal"
    a, b = open_store(url), open_store(url)  # two jobs' views of one prefix
    lock_a = _holder(a, 600.0, lambda: 0.0).__enter__()  # its clock never moves: its fence always passes
    writer_a = ManifestWriter(a)
    writer_a.start(Manifest("fp-journal", {}))
    writer_a.compact()  # nothing pending: a new holder does not need to fold anything in
    arrived, release = threading.Event(), threading.Event()

    def hold_first_journal_put(method: str, key: str, environ: dict) -> None:
        if method == "PUT" and ".journal/" in key and not arrived.is_set():
            arrived.set()
            release.wait(300)

    requests.before.append(hold_first_journal_put)
    writer_a.put("a0", _entry("a0"))  # its flusher sends the object; the server holds it
    assert arrived.wait(300), "the stale holder's journal object never reached the store"
    lock_b = _take_over(b)
    writer_b = ManifestWriter(b)
    writer_b.open("fp-journal")
    writer_b.put("b0", _entry("b0"))
    writer_b.flush()  # committed: readers see it
    assert sorted(Manifest.load(open_store(url)).shards) == ["b0"]
    release.set()
    writer_a.journal.flush()  # returns once the late object has landed (one flush at a time)
    assert sorted(Manifest.load(open_store(url)).shards) == ["b0"]  # it replaced nothing a reader reads
    with pytest.raises(LockLostError, match="changed by another writer"):
        writer_a.finish()  # its snapshot PUT (If-Match what it last wrote) is refused by the store
    assert sorted(Manifest.load(open_store(url)).shards) == ["b0"]  # the committed record survived
    writer_b.finish()
    assert sorted(Manifest.load(open_store(url)).shards) == ["b0"]
    lock_b.__exit__(None, None, None)
    lock_a.__exit__(None, None, None)


def test_item1_a_stale_writers_snapshot_put_held_until_another_writer_committed_is_refused(tmp_path, s3, monkeypatch):
    """The issue's case, with two real `distill cache` runs: the first run's last snapshot PUT passed its clock
    check, and the server holds it until a second run has taken the lock over and committed a new shard. Before,
    the late PUT then replaced the snapshot and a reader saw 3 of 4 shards. Now the store refuses it (If-Match the
    snapshot the stale run wrote, which the new holder replaced), the committed state survives, and the stale run
    fails with exit 6."""
    from distill.core.storage import lease

    _, requests = s3
    _upload(tmp_path, 3)
    stale = "stale-writer"  # the first run's access key: the server tells its requests apart by it
    held, release, snapshot_puts = threading.Event(), threading.Event(), []

    def hold_the_stale_runs_last_snapshot(method: str, key: str, environ: dict) -> None:
        if stale not in environ.get("HTTP_AUTHORIZATION", ""):
            return
        if method == "PUT" and key.endswith("/manifest.json"):
            snapshot_puts.append(key)  # its first creates the manifest; the one at its end is held (retries too)
            if len(snapshot_puts) >= 2 and not release.is_set():
                held.set()
                release.wait(600)
        elif method == "PUT" and key.endswith("/.lock") and environ.get("HTTP_IF_MATCH") and held.is_set():
            raise Refuse()  # and its renewals fail from then on, as a cut-off or paused holder's do

    jump = [0.0]
    real = lease.boottime

    def breaker_clock_runs_a_lease_per_look(method: str, key: str, environ: dict) -> None:
        if method == "GET" and key.endswith("/.lock") and stale not in environ.get("HTTP_AUTHORIZATION", ""):
            jump[0] += 30.0  # between two looks at an unchanged lock, the second run's clock runs a whole lease

    requests.before += [hold_the_stale_runs_last_snapshot, breaker_clock_runs_a_lease_per_look]
    path = tmp_path / "stale.yaml"
    path.write_text(yaml.safe_dump(_cfg(tmp_path, lock_lease_s=30.0).model_dump(mode="json")))
    proc = subprocess.Popen([*DISTILL, "cache", "-c", str(path), "--no-ray"], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, env={**os.environ, "AWS_ACCESS_KEY_ID": stale})
    try:
        deadline = time.monotonic() + 600
        while not held.wait(0.1):
            assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()[0][-3000:]
        object_store.put_file(mnist_shard(tmp_path / "local" / "train-000003.tar", 16, offset=700),
                              f"{SHARDS}/train-000003.tar")
        monkeypatch.setattr(lease, "boottime", lambda: real() + jump[0])
        second = run(_cfg(tmp_path, staging="staging-b", lock_lease_s=30.0), wait_for_lock=True)
        assert second.status == "success" and second.labelled == ["train-000003"], second.summary()
    finally:
        release.set()
    out = proc.communicate(timeout=600)[0]
    assert proc.returncode == 6, out[-3000:]
    fp = second.fingerprint
    assert sorted(Manifest.load(open_store(f"{ROOT}/{fp}")).shards) == [f"train-{i:06d}" for i in range(4)]
    reader = CacheReader(find_cache(ROOT)[0], verify=True)
    assert reader.shards == [f"train-{i:06d}" for i in range(4)]


def test_item1_the_fence_runs_on_boottime_and_says_when_no_renewal_failed(monkeypatch):

    if not hasattr(time, "CLOCK_BOOTTIME"):
        pytest.skip("CLOCK_BOOTTIME is Linux's")
    real = time.clock_gettime
    monkeypatch.setattr(time, "clock_gettime", lambda clk: 1e9 if clk == time.CLOCK_BOOTTIME else real(clk))
    lock = LeaseLock("s3://cache/boot/.lock", lease_s=40.0)
    assert lock.clock() == 1e9  # a host's suspend counts: monotonic stops while it sleeps
    lock.etag, lock._last_ok = "e", 1e9 - 31.0
    with pytest.raises(LockLostError, match="no renewal failed"):
        lock.fence()


def test_item1_the_lease_floor_is_what_renewals_under_load_need():
    from distill.core.storage.lease import MIN_LEASE_S

    assert MIN_LEASE_S >= 30
    d = {"shards": ["x.tar"], "cache_root": "s3://cache/root", "teacher": {"arch": "resnet18", "pretrained": True}}
    with pytest.raises(ValueError, match="lock_lease_s"):
        CacheConfig.model_validate({**d, "lock_lease_s": 5.0})
    assert CacheConfig.model_validate({**d, "lock_lease_s": MIN_LEASE_S}).lock_lease_s == MIN_LEASE_S


def test_item4_two_runs_updating_the_fingerprint_memo_at_once_lose_neither_entry(tmp_path, s3):
    """Runs of two teachers (two fingerprint directories, two locks) share the cache root's memo. The first
    run's read of it is answered (the memo as it was) only after the second one added its entry; before, the
    first then wrote the memo it had read plus its own entry, and the second teacher's entry was lost."""
    from distill.teacher_cache.fingerprint_memo import MEMO_NAME, recall_fingerprint, remember_fingerprint

    _, requests = s3
    a = _cfg(tmp_path)
    save_teacher(tmp_path / "t2.pt", seed=1)
    b = a.model_copy(update={"teacher": a.teacher.model_copy(update={"checkpoint": tmp_path / "t2.pt"})})
    for fp in ("a" * 16, "b" * 16):
        object_store.put_bytes(f"{ROOT}/{fp}/manifest.json", b"{}")  # recall needs the directory to exist
    reached, release, gets = threading.Event(), threading.Event(), []

    def hold_first_answer(method: str, key: str, environ: dict) -> None:  # (read by the server, not yet sent)
        if method == "GET" and key == f"cache/root/{MEMO_NAME}":
            gets.append(key)
            if len(gets) == 1:
                reached.set()
                release.wait(120)

    requests.after.append(hold_first_answer)
    first = threading.Thread(target=remember_fingerprint, args=(a, "a" * 16))
    first.start()
    assert reached.wait(120)
    remember_fingerprint(b, "b" * 16)  # the second run, while the first one's read is on its way
    release.set()
    first.join(120)
    assert recall_fingerprint(a) == "a" * 16 and recall_fingerprint(b) == "b" * 16


def test_item4_journal_objects_of_every_older_generation_are_collected(s3):
    """Leftovers of crashes and of stale writers in generations before the snapshot's: a compaction removes them
    all (before, only the current and the previous generation were ever deleted)."""
    from distill.core.storage.journal import encode_record, with_generation

    url = f"{ROOT}/fp-gen"
    for g in range(3):
        object_store.put_bytes(f"{url}/manifest.{g}.journal/000000000000.jsonl", encode_record({"stale": g}))
    snapshot = {"schema_version": 2, "fingerprint": "fp-gen", "teacher": {}, "shards": {}}
    object_store.put_bytes(f"{url}/manifest.json", with_generation(snapshot, 3))
    store = open_store(url)
    lock = _holder(store, 600.0, lambda: 0.0).__enter__()
    writer = ManifestWriter(store)
    writer.open("fp-gen")
    writer.put("s0", _entry("s0"))
    writer.finish()
    lock.__exit__(None, None, None)
    assert [u for u in object_store.walk(url) if ".journal/" in u] == []
    assert sorted(Manifest.load(open_store(url)).shards) == ["s0"]


def test_item4_a_lock_lost_before_the_work_begins_exits_6_without_a_traceback(tmp_path, s3):
    """The refresh holds the lock and reads the manifest; the server holds that read while its renewals fail for
    longer than the fence allows. Its next write comes before any shard work (the claim, the sweep, the resolved
    config): it must stop with exit 6 and one line, as a lock lost later does (before: a traceback, exit 1)."""
    _, requests = s3
    _upload(tmp_path, 1)
    cfg = _cfg(tmp_path, lock_lease_s=30.0)
    fp = run(cfg).fingerprint
    gate = requests.hold(f"cache/root/{fp}/manifest.json")  # its body trickles until released (no timeout)

    def refuse_renewals(method: str, key: str, environ: dict) -> None:
        if gate.reached.is_set() and method == "PUT" and key.endswith("/.lock") and environ.get("HTTP_IF_MATCH"):
            raise Refuse()

    requests.before.append(refuse_renewals)
    path = tmp_path / "refresh.yaml"
    path.write_text(yaml.safe_dump(cfg.model_dump(mode="json")))
    proc = subprocess.Popen([*DISTILL, "cache", "refresh", "-c", str(path), "--no-ray"], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, env=dict(os.environ))
    try:
        deadline = time.monotonic() + 600
        while not gate.reached.wait(0.1):
            assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()[0][-3000:]
        t0 = time.monotonic()
        while time.monotonic() < t0 + 30.0 * 3 / 4 + 1:  # longer than the fence allows since its last renewal
            assert proc.poll() is None, proc.communicate()[0][-3000:]
            time.sleep(0.2)
    finally:
        gate.release()
    out = proc.communicate(timeout=300)[0]
    assert proc.returncode == 6, out[-3000:]
    assert "Traceback" not in out and "writes nothing more" in out, out[-3000:]
