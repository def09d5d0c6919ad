"""Incremental refresh decisions, atomic manifest, and the single-writer lock."""

import json
import os
import time

import pytest

from core.atomic_io import remove_stale_tmp, tmp_path_for
from teacher_cache.manifest import (
    CacheLockedError,
    DirectoryLock,
    Manifest,
    ShardEntry,
    plan_refresh,
)
from teacher_cache.shards import file_sha256


def _entry(path, cache_dir, stem):
    st = path.stat()
    (cache_dir / f"{stem}.parquet").write_bytes(b"PAR1\0\0\0\0PAR1")  # the smallest thing with a Parquet footer
    return ShardEntry(source=str(path), size=st.st_size, mtime_ns=st.st_mtime_ns,
                      content_sha256=file_sha256(path), file=f"{stem}.parquet", file_bytes=12,
                      file_sha256=file_sha256(cache_dir / f"{stem}.parquet"), rows=1, errors=0,
                      ctime_ns=st.st_ctime_ns, inode=st.st_ino)


def test_plan_new_unchanged_touched_changed_vanished(tmp_path):
    cache = tmp_path / "cache"
    cache.mkdir()
    shards = {s: tmp_path / f"{s}.tar" for s in ("a", "b", "c", "d")}
    for s, p in shards.items():
        p.write_bytes(s.encode() * 100)
    m = Manifest(fingerprint="fp", teacher={})
    for s in ("a", "b", "c"):
        m.shards[s] = _entry(shards[s], cache, s)
    m.shards["gone"] = _entry(shards["a"], cache, "gone")
    later = time.time() + 10
    os.utime(shards["b"], (later, later))  # touched: same bytes, new mtime
    shards["c"].write_bytes(b"C" * 100)  # changed: same size, new content
    plan = plan_refresh(m, {k: v for k, v in shards.items()}, cache)
    assert [(s, r) for s, _, r in plan.todo] == [("c", "changed"), ("d", "new")]
    assert sorted(plan.unchanged) == ["a", "b"]
    assert list(plan.touched) == ["b"]
    assert plan.vanished == ["gone"]


def _one_cached_shard(tmp_path):
    cache = tmp_path / "cache"
    cache.mkdir()
    p = tmp_path / "a.tar"
    p.write_bytes(b"abc")
    m = Manifest(fingerprint="fp", teacher={})
    m.shards["a"] = _entry(p, cache, "a")
    return cache, p, m


def test_missing_cache_file_is_relabelled(tmp_path):
    cache, p, m = _one_cached_shard(tmp_path)
    (cache / "a.parquet").unlink()
    assert [r for _, _, r in plan_refresh(m, {"a": p}, cache).todo] == ["cache file missing or damaged"]


def test_unchanged_plan_reads_no_shard_bytes(tmp_path, monkeypatch):
    cache, p, m = _one_cached_shard(tmp_path)
    import teacher_cache.manifest as mod

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
    """`cp -p`, `rsync -t`, unpacked archives: same size, mtime restored; ctime/inode still move."""
    cache, p, m = _one_cached_shard(tmp_path)
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
    plan = plan_refresh(old, {"a": p}, cache)
    assert plan.unchanged == ["a"] and "a" in plan.touched  # hashed once, same content
    ident = plan.touched["a"]
    old.shards["a"].update_identity(ident, str(p))
    import teacher_cache.manifest as mod

    monkeypatch.setattr(mod, "file_sha256", lambda *_: pytest.fail("hashed again after the identity was stored"))
    assert plan_refresh(old, {"a": p}, cache).touched == {}


def test_truncated_cache_file_is_relabelled_without_a_checksum(tmp_path):
    cache, p, m = _one_cached_shard(tmp_path)
    (cache / "a.parquet").write_bytes(b"PAR1" + b"\0" * 10 + b"PAR1")  # right magic, wrong size for the entry
    assert [r for _, _, r in plan_refresh(m, {"a": p}, cache).todo] == ["cache file missing or damaged"]
