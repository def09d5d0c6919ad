"""The manifest's journal on a local directory: O(1) per shard, torn records ignored, compaction, old caches.

The same journal in object storage (one object per batch of records): tests/integration/test_object_lock.py.
"""

from __future__ import annotations

import json

import pytest

from distill.core.storage import open_store
from distill.core.storage.journal import decode_records, encode_record, should_compact
from distill.teacher_cache.manifest import FILE_FIELDS, MANIFEST_NAME, Manifest, ManifestWriter, ShardEntry
from distill.teacher_cache.reader import CacheReader


def _entry(i: int, stem: str | None = None) -> ShardEntry:
    """An entry of shard `stem` (s<i> by default): its file is named as the writer names it."""
    return ShardEntry(source=f"/in/s{i}.tar", size=i, mtime_ns=i, content_sha256="c" * 64,
                      file=f"{stem or f's{i}'}.parquet",
                      file_bytes=12, file_sha256="f" * 64, rows=3, errors=0, labelled=2, top1_correct=1,
                      topk_mass=2.5, written_at=1.0)


def _journals(d) -> list:
    return sorted(d.glob("manifest.*.journal"))


def test_a_finished_shard_appends_one_record_and_leaves_the_snapshot_alone(tmp_path):
    writer = ManifestWriter(open_store(tmp_path))
    assert writer.open("fp") is None
    writer.start(Manifest(fingerprint="fp", teacher={"arch": "t"}))
    snapshot = (tmp_path / MANIFEST_NAME).read_bytes()
    sizes = []
    for i in range(5):
        writer.put(f"s{i}", _entry(i))
        sizes.append(_journals(tmp_path)[0].stat().st_size)
        assert (tmp_path / MANIFEST_NAME).read_bytes() == snapshot  # not rewritten per shard
        assert sorted(Manifest.load(tmp_path).shards) == [f"s{j}" for j in range(i + 1)]  # readers see it at once
    assert len({b - a for a, b in zip(sizes, sizes[1:], strict=False)}) == 1  # each shard: one record, same size
    writer.finish()
    assert _journals(tmp_path) == []  # compacted into the snapshot at the end of the run
    raw = json.loads((tmp_path / MANIFEST_NAME).read_text())
    assert sorted(raw["shards"]) == [f"s{i}" for i in range(5)]
    assert Manifest.load(tmp_path).shards["s3"] == _entry(3)


def test_snapshot_rewrites_cost_o1_per_shard(tmp_path):
    writer = ManifestWriter(open_store(tmp_path))
    writer.start(Manifest(fingerprint="fp", teacher={}))
    written = 0
    real = writer.journal.compact

    def counting(snapshot: dict) -> None:
        nonlocal written
        written += len(snapshot["shards"])
        real(snapshot)

    writer.journal.compact = counting
    n = 5000
    for i in range(n):
        writer.put(f"s{i:05d}", _entry(i, f"s{i:05d}"))
        assert writer.journal.pending <= max(1000, writer.snapshot_entries)  # readers replay at most that
    assert written <= 3 * n  # entries written into snapshots over the run: a constant per shard, not n per shard
    assert written >= n  # and the snapshot did follow (compactions at 1000, 2000, 4000 shards)
    assert should_compact(1000, 10) and not should_compact(999, 10) and not should_compact(1500, 2000)


def _journal_with(tmp_path, n: int):
    writer = ManifestWriter(open_store(tmp_path))
    writer.start(Manifest(fingerprint="fp", teacher={}))
    for i in range(n):
        writer.put(f"s{i}", _entry(i))
    writer.journal.close()  # killed: no compaction
    return _journals(tmp_path)[0]


def test_a_torn_last_record_is_never_read_as_a_shard_wherever_it_was_cut(tmp_path):
    journal = _journal_with(tmp_path, 3)
    data = journal.read_bytes()
    last = data.rstrip(b"\n").rfind(b"\n") + 1
    for cut in range(last, len(data)):  # every byte the last record could have been cut at
        journal.write_bytes(data[:cut])
        assert sorted(Manifest.load(tmp_path).shards) == ["s0", "s1"], cut
        assert CacheReader(tmp_path).shards == ["s0", "s1"], cut
    journal.write_bytes(data[:last] + b'{"entry":{},"shard":"s9"}\t00000000\n')  # complete line, wrong checksum
    assert sorted(Manifest.load(tmp_path).shards) == ["s0", "s1"]
    garbled = bytearray(data)
    garbled[last + 5] ^= 0x20  # one flipped bit inside the last record
    journal.write_bytes(bytes(garbled))
    assert sorted(Manifest.load(tmp_path).shards) == ["s0", "s1"]


def test_the_next_writer_cuts_a_torn_tail_before_appending(tmp_path):
    journal = _journal_with(tmp_path, 2)
    data = journal.read_bytes()
    journal.write_bytes(data + encode_record({"shard": "s7", "entry": {}})[:10])  # a crash mid-append
    writer = ManifestWriter(open_store(tmp_path))
    m = writer.open("fp")  # folds the intact records into the snapshot
    assert sorted(m.shards) == ["s0", "s1"] and _journals(tmp_path) == []
    writer.put("s2", _entry(2))
    writer.journal.close()
    assert sorted(Manifest.load(tmp_path).shards) == ["s0", "s1", "s2"]


def test_a_crash_between_snapshot_and_journal_removal_applies_nothing_twice(tmp_path):
    journal = _journal_with(tmp_path, 2)
    stale = journal.read_bytes()
    writer = ManifestWriter(open_store(tmp_path))
    writer.open("fp")
    m = Manifest.load(tmp_path)
    m.shards["s0"] = _entry(9, "s0")  # changed after the compaction
    m.save(tmp_path)
    journal.write_bytes(stale)  # the old generation's journal, as if its removal never reached the disk
    assert Manifest.load(tmp_path).shards["s0"] == _entry(9, "s0")  # a journal of another generation is ignored


def test_a_manifest_written_before_journals_loads_and_old_readers_read_the_snapshot(tmp_path):
    old = {"schema_version": 1, "fingerprint": "fp", "teacher": {"arch": "t"},
           "shards": {"a": {k: v for k, v in _entry(1, "a").__dict__.items()
                            if k not in ("labelled", "top1_correct", "topk_mass", "seen_ns", *FILE_FIELDS)}}}
    (tmp_path / MANIFEST_NAME).write_text(json.dumps(old))
    m = Manifest.load(tmp_path)
    assert m.shards["a"].rows == 3 and m.shards["a"].labelled is None  # not counted by the old build
    m.shards["b"] = _entry(2, "b")
    m.save(tmp_path)
    raw = json.loads((tmp_path / MANIFEST_NAME).read_text())
    fields = set(old["shards"]["a"])
    assert all(set(e) == fields for e in raw["shards"].values())  # what an old build's ShardEntry(**v) takes
    assert raw["shard_stats"]["b"] == {"labelled": 2, "top1_correct": 1, "topk_mass": 2.5}
    assert Manifest.load(tmp_path).shards["b"] == _entry(2, "b")


def test_record_framing_round_trips_and_stops_at_the_first_bad_line():
    lines = b"".join(encode_record({"i": i}) for i in range(3))
    assert decode_records(lines) == ([{"i": 0}, {"i": 1}, {"i": 2}], len(lines))
    assert decode_records(lines[:-1])[0] == [{"i": 0}, {"i": 1}]
    assert decode_records(b"not a record\n" + lines)[0] == []


def test_a_damaged_snapshot_names_the_file(tmp_path):
    (tmp_path / MANIFEST_NAME).write_text("{half")
    with pytest.raises(ValueError, match=r"manifest.json: damaged manifest .* delete the directory"):
        Manifest.load(tmp_path)
