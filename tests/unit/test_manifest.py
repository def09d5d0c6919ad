"""Incremental refresh decisions, atomic manifest, and the single-writer lock."""

import json
import os
import time
from dataclasses import replace

import pytest

from distill.core.atomic_io import remove_stale_tmp, tmp_path_for
from distill.images.shards import RACY_WINDOW_NS, file_sha256
from distill.teacher_cache.manifest import (
    CacheLockedError,
    DirectoryLock,
    Manifest,
    ShardEntry,
    plan_refresh,
)


def _entry(path, cache_dir, stem, seen_now=False):
    """The entry a labeller records. By default its identity was taken well after the shard's last write (a nightly
    shard is labelled minutes after it lands); `seen_now`: taken now, maybe within a clock tick of the write."""
    st = path.stat()
    seen = time.time_ns() if seen_now else max(st.st_mtime_ns, st.st_ctime_ns) + 10 * RACY_WINDOW_NS
    (cache_dir / f"{stem}.parquet").write_bytes(b"PAR1\0\0\0\0PAR1")  # the smallest thing with a Parquet footer
    return ShardEntry(source=str(path), size=st.st_size, mtime_ns=st.st_mtime_ns,
                      content_sha256=file_sha256(path), file=f"{stem}.parquet", file_bytes=12,
                      file_sha256=file_sha256(cache_dir / f"{stem}.parquet"), rows=1, errors=0,
                      ctime_ns=st.st_ctime_ns, inode=st.st_ino, seen_ns=seen)


def _past_the_racy_window(path):
    """Wait until the wall clock is a racy window past the file's last write (a condition, not a guess at speed)."""
    st = path.stat()
    while time.time_ns() <= max(st.st_mtime_ns, st.st_ctime_ns) + RACY_WINDOW_NS:
        time.sleep(RACY_WINDOW_NS / 4e9)


def test_plan_new_unchanged_touched_changed_vanished(tmp_path):
    cache = tmp_path / "cache"
    cache.mkdir()
    shards = {s: tmp_path / f"{s}.tar" for s in ("a", "b", "c", "d")}
    for s, p in shards.items():
        p.write_bytes(s.encode() * 100)
    m = Manifest(fingerprint="fp", teacher={})
    for s in ("a", "b", "c"):
        m.shards[s] = _entry(shards[s], cache, s, seen_now=s == "c")  # c: rewritten at once, maybe in the same tick
    m.shards["gone"] = _entry(shards["a"], cache, "gone")
    later = time.time() + 10
    os.utime(shards["b"], (later, later))  # touched: same bytes, new mtime
    shards["c"].write_bytes(b"C" * 100)  # changed: same size, new content
    plan = plan_refresh(m, {k: v for k, v in shards.items()}, cache)
    assert [(s, r) for s, _, r in plan.todo] == [("c", "changed"), ("d", "new")]
    assert sorted(plan.unchanged) == ["a", "b"]
    assert list(plan.touched) == ["b"]
    assert plan.vanished == ["gone"]


def _one_cached_shard(tmp_path, seen_now=False):
    cache = tmp_path / "cache"
    cache.mkdir()
    p = tmp_path / "a.tar"
    p.write_bytes(b"abc")
    m = Manifest(fingerprint="fp", teacher={})
    m.shards["a"] = _entry(p, cache, "a", seen_now)
    return cache, p, m


def test_missing_cache_file_is_relabelled(tmp_path):
    cache, p, m = _one_cached_shard(tmp_path)
    (cache / "a.parquet").unlink()
    assert [r for _, _, r in plan_refresh(m, {"a": p}, cache).todo] == ["cache file missing or damaged"]


def test_unchanged_plan_reads_no_shard_bytes(tmp_path, monkeypatch):
    cache, p, m = _one_cached_shard(tmp_path)
    import distill.teacher_cache.manifest as mod

    monkeypatch.setattr(mod, "file_sha256", lambda *_: pytest.fail("hashed a shard on a no-op refresh"))
    assert plan_refresh(m, {"a": p}, cache).unchanged == ["a"]


def test_manifest_roundtrip_and_fingerprint_check(tmp_path):
    m = Manifest(fingerprint="abc", teacher={"arch": "x"})
    m.save(tmp_path)
    assert Manifest.load(tmp_path).fingerprint == "abc"
    with pytest.raises(ValueError, match="expected zzz"):
        Manifest.load(tmp_path, "zzz")
    (tmp_path / "manifest.json").write_text("{not json")
    with pytest.raises(ValueError, match="damaged manifest"):
        Manifest.load(tmp_path)


def test_lock_is_exclusive_and_stale_tmp_removed(tmp_path):
    with DirectoryLock(tmp_path), pytest.raises(CacheLockedError, match="being written by another job"):
        DirectoryLock(tmp_path).__enter__()
    with DirectoryLock(tmp_path):
        pass  # released after exit
    tmp_path_for(tmp_path / "x.parquet").write_bytes(b"partial")
    assert remove_stale_tmp(tmp_path) == 1
    assert not list(tmp_path.glob("*.tmp-*"))


def test_rewrite_keeping_size_and_mtime_is_changed(tmp_path):
    """`cp -p`, `rsync -t`, unpacked archives: same size, mtime restored; ctime/inode still move (or, within the
    clock tick of the recorded write, the recorded identity is racy and the shard is hashed)."""
    cache, p, m = _one_cached_shard(tmp_path, seen_now=True)
    st = p.stat()
    p.write_bytes(b"xyz")
    os.utime(p, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert (p.stat().st_size, p.stat().st_mtime_ns) == (st.st_size, st.st_mtime_ns)
    assert [r for _, _, r in plan_refresh(m, {"a": p}, cache).todo] == ["changed"]
    # a copy with the mtime kept (new inode) but the same bytes is only touched
    p.write_bytes(b"abc")
    q = tmp_path / "copy.tar"
    q.write_bytes(b"abc")
    os.utime(q, ns=(st.st_atime_ns, st.st_mtime_ns))
    os.replace(q, p)
    plan = plan_refresh(m, {"a": p}, cache)
    assert plan.unchanged == ["a"] and plan.touched["a"].inode == p.stat().st_ino


def test_old_manifest_without_ctime_inode_hashes_once(tmp_path, monkeypatch):
    cache, p, m = _one_cached_shard(tmp_path)
    m.save(cache)
    raw = json.loads((cache / "manifest.json").read_text())
    for e in raw["shards"].values():
        del e["ctime_ns"], e["inode"]
    (cache / "manifest.json").write_text(json.dumps(raw))
    old = Manifest.load(cache)
    assert old.shards["a"].ctime_ns is None
    _past_the_racy_window(p)  # the identity stored now is trusted (a stat within a tick of the write would not be)
    plan = plan_refresh(old, {"a": p}, cache)
    assert plan.unchanged == ["a"] and "a" in plan.touched  # hashed once, same content
    ident = plan.touched["a"]
    old.shards["a"].update_identity(ident, str(p))
    import distill.teacher_cache.manifest as mod

    monkeypatch.setattr(mod, "file_sha256", lambda *_: pytest.fail("hashed again after the identity was stored"))
    assert plan_refresh(old, {"a": p}, cache).touched == {}


def test_truncated_cache_file_is_relabelled_without_a_checksum(tmp_path):
    cache, p, m = _one_cached_shard(tmp_path)
    (cache / "a.parquet").write_bytes(b"PAR1" + b"\0" * 10 + b"PAR1")  # right magic, wrong size for the entry
    assert [r for _, _, r in plan_refresh(m, {"a": p}, cache).todo] == ["cache file missing or damaged"]


def test_a_rewrite_in_the_clock_tick_of_the_recorded_write_is_found_by_hashing(tmp_path, monkeypatch):
    """Before Linux 6.13 a file's timestamps move once per coarse clock tick (up to 10 ms), so a same-size rewrite in
    place within that tick keeps size, mtime, ctime and inode. Simulated exactly: the entry records the file as it
    is now (all four fields) with the content it had before the rewrite."""
    cache, p, m = _one_cached_shard(tmp_path)
    p.write_bytes(b"xyz")  # same size, new content
    st = p.stat()
    e = m.shards["a"]
    e.size, e.mtime_ns, e.ctime_ns, e.inode = st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino
    last_write = max(st.st_mtime_ns, st.st_ctime_ns)
    e.seen_ns = last_write + RACY_WINDOW_NS // 4  # the identity was taken within the tick: it proves nothing
    assert [r for _, _, r in plan_refresh(m, {"a": p}, cache).todo] == ["changed"]
    # same bytes after all: hashed once, and the identity taken now (well after the write) is trusted from then on
    p.write_bytes(b"abc")
    st = p.stat()
    e.mtime_ns, e.ctime_ns, e.seen_ns = st.st_mtime_ns, st.st_ctime_ns, max(st.st_mtime_ns, st.st_ctime_ns) + 1000
    plan = plan_refresh(m, {"a": p}, cache)
    assert plan.unchanged == ["a"] and "a" in plan.touched
    e.update_identity(replace(plan.touched["a"], seen_ns=e.seen_ns + 10 * RACY_WINDOW_NS), str(p))
    import distill.teacher_cache.manifest as mod

    monkeypatch.setattr(mod, "file_sha256", lambda *_: pytest.fail("a racy identity hashed for ever"))
    assert plan_refresh(m, {"a": p}, cache).unchanged == ["a"]


def test_seen_ns_round_trips_beside_the_entries_an_older_build_reads(tmp_path):
    cache, p, m = _one_cached_shard(tmp_path)
    m.save(cache)
    raw = json.loads((cache / "manifest.json").read_text())
    assert "seen_ns" not in raw["shards"]["a"] and raw["shard_seen_ns"]["a"] == m.shards["a"].seen_ns
    assert Manifest.load(cache).shards["a"] == m.shards["a"]
