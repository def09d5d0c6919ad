"""Issue 30 on a local (or shared-filesystem) cache: versions that a running job keeps (item 3), names that cannot
escape the cache directory and checksummed error files (item 2), and the smaller defects of item 4 that live in
the local store (short journal writes, `.tmp-` in a shard's name, a same-size altered cache file). Real shards,
a real teacher, real Parquet; the refresh runs while the job's reader is open (no timing involved)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from helpers import cache_cfg_dict, mnist_shard, save_teacher, write_tar

from distill.core.storage import open_store
from distill.core.storage.names import UnsafeNameError
from distill.core.storage.versions import VERSIONS, release
from distill.images.preprocessing import Preprocessing
from distill.images.shards import ShardReader, shard_stem
from distill.student_train.data import JoinedStream, ShardPair, StreamSpec
from distill.teacher_cache.config import CacheConfig
from distill.teacher_cache.locate import find_cache
from distill.teacher_cache.manifest import MANIFEST_NAME, Manifest
from distill.teacher_cache.reader import CacheError, CacheReader
from distill.teacher_cache.run import run

pytestmark = pytest.mark.integration


def _cache(tmp_path, n: int = 2, per_shard: int = 24, names: list[str] | None = None, **over):
    names = names or [f"train-{i:06d}" for i in range(n)]
    shards = [mnist_shard(tmp_path / "in" / f"{name}.tar", per_shard, offset=per_shard * i)
              for i, name in enumerate(names)]
    cfg = CacheConfig.model_validate(cache_cfg_dict([str(tmp_path / "in" / "*.tar")], tmp_path / "cache",
                                                    save_teacher(tmp_path / "t.pt"), **over))
    return shards, cfg


def _relabel(path) -> None:
    """The same images under the same keys, every label moved by one (a nightly fix of the annotations)."""
    samples = [(s.key, {**s.files, "cls": str((int(s.files["cls"]) + 1) % 10).encode()}) for s in ShardReader(path)]
    write_tar(path, samples)


def _spec(cache_dir, shards) -> StreamSpec:
    reader = CacheReader(cache_dir)
    pairs = [ShardPair(shard_stem(p), p, reader.manifest.shards[shard_stem(p)].rows) for p in shards]
    return StreamSpec(cache_dir=cache_dir, pairs=pairs, student=Preprocessing(16, 1.0, (0.5,), (0.5,), "bilinear", 1),
                      teacher=None, num_classes=10, views=1, train=False, batch_size=8, shuffle_buffer=1, seed=0,
                      epoch=0, rank=0, world=1, loader_workers=0)


def _labels(stream: JoinedStream) -> dict[str, list[int]]:
    return {p.stem: [s["label"] for s in stream._samples(p)] for p in stream.spec.pairs}


def test_item3_a_refresh_while_a_job_reads_changes_nothing_the_job_planned_with(tmp_path):
    shards, cfg = _cache(tmp_path)
    fp = run(cfg).fingerprint
    job_dir, _ = find_cache(cfg.cache_root)  # what a training plan holds: a version of the cache
    assert job_dir.parent.name == VERSIONS and job_dir.parent.parent.name == fp
    stream = JoinedStream(_spec(job_dir, shards))
    planned = _labels(stream)
    reading = stream._samples(stream.spec.pairs[1])
    seen = [next(reading)["label"]]  # the job is inside shard 1 when the nightly refresh relabels it
    old_file = Manifest.load(tmp_path / "cache" / fp).shards["train-000001"].file

    _relabel(shards[1])
    assert run(cfg).changed == ["train-000001"]

    seen += [s["label"] for s in reading]
    assert seen == planned["train-000001"]
    assert _labels(JoinedStream(_spec(job_dir, shards))) == planned  # and its next epoch reads them again
    assert (tmp_path / "cache" / fp / old_file).exists()  # kept: the job's version lists it
    new_dir, _ = find_cache(cfg.cache_root)  # a job planned now reads the new labels
    assert new_dir != job_dir
    assert _labels(JoinedStream(_spec(new_dir, shards)))["train-000001"] == \
        [(y + 1) % 10 for y in planned["train-000001"]]

    release(job_dir)  # the job ended: the next run collects its version and the file only it listed
    release(new_dir)
    assert run(cfg).labelled == []
    assert not job_dir.exists() and not (tmp_path / "cache" / fp / old_file).exists()
    assert sorted(p.name for p in (tmp_path / "cache" / fp).glob("*.parquet")) == sorted(
        e.file for e in Manifest.load(tmp_path / "cache" / fp).shards.values())


def test_item3_a_cache_of_an_older_build_reads_and_its_plain_names_are_replaced_by_a_refresh(tmp_path):
    """Older builds named local cache files `<stem>.parquet`; their manifests still read, and a refresh that
    relabels a shard writes a content-addressed name beside it and collects the plain one once nobody holds it."""
    shards, cfg = _cache(tmp_path)
    fp = run(cfg).fingerprint
    d = tmp_path / "cache" / fp
    raw = json.loads((d / MANIFEST_NAME).read_text())
    for stem, entry in raw["shards"].items():  # as an older build wrote it
        (d / entry["file"]).rename(d / f"{stem}.parquet")
        entry["file"] = f"{stem}.parquet"
    raw.pop("shard_files", None)
    (d / MANIFEST_NAME).write_text(json.dumps(raw))
    assert CacheReader(find_cache(cfg.cache_root)[0], verify=True).arrays("train-000000").keys
    _relabel(shards[0])
    assert run(cfg).changed == ["train-000000"]
    m = Manifest.load(d)
    assert m.shards["train-000000"].file != "train-000000.parquet" and m.shards["train-000001"].file == \
        "train-000001.parquet"


@pytest.mark.parametrize("field, value", [("file", "../../outside.parquet"), ("file", "/etc/outside.parquet"),
                                          ("file", "train-000000.parquet/../../x.parquet"),
                                          ("errors_file", "errors/../../../x.jsonl")])
def test_item2_a_manifest_naming_a_file_outside_the_cache_is_refused(tmp_path, field, value):
    _, cfg = _cache(tmp_path)
    fp = run(cfg).fingerprint
    d = tmp_path / "cache" / fp
    outside = tmp_path / "outside.parquet"
    outside.write_bytes((d / Manifest.load(d).shards["train-000000"].file).read_bytes())  # readable, if followed
    raw = json.loads((d / MANIFEST_NAME).read_text())
    if field == "file":
        raw["shards"]["train-000000"]["file"] = value
    else:
        raw.setdefault("shard_files", {}).setdefault("train-000000", {})["errors_file"] = value
    (d / MANIFEST_NAME).write_text(json.dumps(raw))
    with pytest.raises(UnsafeNameError, match="train-000000"):
        CacheReader(d).arrays("train-000000")
    with pytest.raises(UnsafeNameError):
        run(cfg)  # the writer refuses it too (it would sweep or relabel by that name)


def test_item2_a_journal_record_naming_a_shard_outside_the_cache_is_refused(tmp_path):
    from distill.core.storage.journal import encode_record

    _, cfg = _cache(tmp_path)
    fp = run(cfg).fingerprint
    d = tmp_path / "cache" / fp
    entry = json.loads(json.dumps(Manifest.load(d).shards["train-000000"].__dict__))
    generation = json.loads((d / MANIFEST_NAME).read_text())["journal_generation"]
    with open(d / f"manifest.{generation}.journal", "ab") as f:
        f.write(encode_record({"shard": "../../../pwned", "entry": {**entry, "file": "../../../pwned.parquet"}}))
    with pytest.raises(UnsafeNameError, match=r"pwned"):
        Manifest.load(d)


def test_item2_error_files_are_checksummed_in_the_manifest_and_never_rewritten_in_place(tmp_path):
    shards, cfg = _cache(tmp_path, n=1)
    samples = [(s.key, s.files) for s in ShardReader(shards[0])]
    write_tar(shards[0], [*samples, ("broken", {"png": b"not an image", "cls": b"1"})])
    fp = run(cfg).fingerprint
    d = tmp_path / "cache" / fp
    entry = Manifest.load(d).shards["train-000000"]
    assert entry.errors == 1 and entry.errors_file.startswith("errors/train-000000-") and entry.errors_sha256
    first = (d / entry.errors_file).read_bytes()
    job_dir, _ = find_cache(cfg.cache_root)
    assert [e["key"] for e in CacheReader(job_dir).errors("train-000000")] == ["broken"]

    write_tar(shards[0], [*samples, ("broken2", {"png": b"not an image either", "cls": b"1"})])
    run(cfg)  # relabelled: a new error file beside the old one, which the job's version still reads
    now = Manifest.load(d).shards["train-000000"]
    assert now.errors_file != entry.errors_file and (d / entry.errors_file).read_bytes() == first
    assert [e["key"] for e in CacheReader(job_dir).errors("train-000000")] == ["broken"]
    assert [e["key"] for e in CacheReader(d).errors("train-000000")] == ["broken2"]
    (d / now.errors_file).write_text('{"shard": "train-000000", "key": "other", "reason": "x"}\n')
    with pytest.raises(CacheError, match="not the error file the manifest lists"):
        CacheReader(d).errors("train-000000")
    (d / now.errors_file).unlink()  # (an older build's sweep does not know the new names and removes them)
    assert run(cfg).changed == ["train-000000"]
    assert [e["key"] for e in CacheReader(d).errors("train-000000")] == ["broken2"]
    release(job_dir)


def test_item4_a_shard_whose_name_contains_tmp_keeps_its_cache_file(tmp_path):
    _, cfg = _cache(tmp_path, names=["night.tmp-1-2", "plain"])
    assert sorted(run(cfg).labelled) == ["night.tmp-1-2", "plain"]
    again = run(cfg)  # before: the start-up sweep deleted its file as a killed writer's temp file
    assert again.labelled == [] and sorted(again.unchanged) == ["night.tmp-1-2", "plain"]


def test_item4_a_same_size_altered_cache_file_is_relabelled_and_refused_by_the_loader(tmp_path):
    shards, cfg = _cache(tmp_path)
    fp = run(cfg).fingerprint
    d = tmp_path / "cache" / fp
    path = d / Manifest.load(d).shards["train-000001"].file
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF  # same size, same footer
    path.write_bytes(bytes(data))
    with pytest.raises(CacheError, match="partial or altered file"):  # the loader's reader (no checksum asked)
        CacheReader(d, verify=False).arrays("train-000001")
    again = run(cfg)  # before: "unchanged", and the file stayed refused until someone deleted it
    assert again.changed == ["train-000001"]
    assert CacheReader(d, verify=False).arrays("train-000001").keys == [s.key for s in ShardReader(shards[1])]


SHORT_WRITE = r"""
import resource, signal, sys
from pathlib import Path
from distill.core.storage.local import LocalStore

signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails (EFBIG) instead of killing us
d = Path(sys.argv[1])
journal = LocalStore(d).journal("m.json")
journal.compact({"x": 1})
journal.append({"n": 1, "pad": "a" * 200})
size = (d / "m.1.journal").stat().st_size
soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
resource.setrlimit(resource.RLIMIT_FSIZE, (size + 100, hard))  # the next record fits only in part (a full disk)
try:
    journal.append({"n": 2, "pad": "b" * 200})
    print("no error")
except OSError as exc:
    print("error", exc.errno)
resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))  # space again
journal.append({"n": 3})
print([r["n"] for r in LocalStore(d).journal("m.json").load()[1]])
"""


def test_item4_a_short_journal_write_raises_and_later_records_stay_visible(tmp_path):
    """A real short write (the file size limit stands in for a full disk): the record must fail, not tear the
    journal; before, the torn bytes stayed and every later record was invisible to readers."""
    out = subprocess.run([sys.executable, "-c", SHORT_WRITE, str(tmp_path)], capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    lines = out.stdout.split("\n")
    assert lines[0].startswith("error"), out.stdout
    assert lines[1] == "[1, 3]", out.stdout


def test_item2_a_mirror_never_writes_outside_its_version_directory(tmp_path, s3):
    """The object-store reader's copy checks every destination, whatever the view names (a manifest is parsed
    with its names checked; this is the second line)."""
    from distill.core import object_store
    from distill.core.storage import View
    from distill.core.storage.mirror import materialize

    object_store.put_bytes("s3://cache/evil/x.jsonl", b"chosen bytes")
    view = View(version="v1", files={}, optional=["../../../../escaped.jsonl"], last={"manifest.json": b"{}"})
    with pytest.raises(UnsafeNameError, match="escaped"):
        materialize("s3://cache/evil/fp", lambda: view)
    assert not list(tmp_path.rglob("escaped.jsonl"))
    object_store.put_bytes("s3://cache/evil/fp/errors//x.jsonl", b"")
    with pytest.raises(UnsafeNameError):
        open_store("s3://cache/evil/fp").walk()  # a listing's names are checked too


def test_item4_a_teacher_seen_within_a_clock_tick_of_its_last_change_is_not_memoised(tmp_path):
    """Its identity proves nothing (a same-size rewrite in that tick keeps size, mtime, ctime and inode): the
    next run must fingerprint the teacher again rather than trust the memo. Timestamps in the future (a skewed
    file server's) are as racy, and make this independent of the machine's speed."""
    import os
    import time

    from distill.teacher_cache.fingerprint_memo import recall_fingerprint, remember_fingerprint

    _, cfg = _cache(tmp_path, n=1)
    fp = run(cfg).fingerprint  # (recall needs the cache directory to exist)
    future = time.time_ns() + 3600 * 10**9
    os.utime(cfg.teacher.checkpoint, ns=(future, future))
    remember_fingerprint(cfg, fp)
    assert recall_fingerprint(cfg) is None


def test_item4_the_cache_stage_warns_when_the_teacher_is_no_better_than_chance_and_inspect_says_why(tmp_path,
                                                                                                    caplog):
    """Before, the teacher's weakness was reported only after every student had trained, and `cache inspect` said
    "teacher acc 0.0000" with no hint when the shards' labels were not the teacher's classes."""
    import logging

    from distill.teacher_cache.inspect_cache import format_inspect, inspect_cache

    shards, cfg = _cache(tmp_path, n=1, per_shard=40)
    fp = run(cfg).fingerprint
    top1 = CacheReader(tmp_path / "cache" / fp).arrays("train-000000").topk_ids[:, 0, 0]

    def label_with(labels) -> None:
        rows = [(s.key, {**s.files, "cls": str(int(y)).encode()}) for s, y in zip(ShardReader(shards[0]), labels,
                                                                                   strict=True)]
        write_tar(shards[0], rows)

    label_with(top1)  # labels the teacher agrees with: nothing to say
    caplog.set_level(logging.WARNING, logger="distill.teacher_cache.run")
    caplog.clear()
    good = run(cfg)
    assert good.teacher_top1 == 1.0 and good.labelled_rows == 40 and "chance" not in caplog.text
    label_with((top1 + 1) % 10)  # another class order: the teacher is "wrong" on every row
    bad = run(cfg)
    assert bad.teacher_top1 == 0.0 and "no better than chance" in caplog.text
    assert "not the teacher's classes" in caplog.text
    text = format_inspect(inspect_cache(tmp_path / "cache"))
    assert "teacher acc  0.0000" in text and "hint:" in text and "another class order" in text
