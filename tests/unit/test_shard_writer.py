"""`distill shards` from an image-folder tree: classes from folder names, original bytes kept, split and sizes."""

import functools
import json

import pytest
from helpers import encode, mnist

from distill.images.shard_writer import ShardsConfig, run
from distill.images.shards import ShardReader


def test_image_folder_to_shards(tmp_path):
    x, _ = mnist(12)
    for i in range(12):
        cls = ["cat", "dog", "eel"][i % 3]
        fmt = ["png", "jpg", "webp"][i % 3]
        d = tmp_path / "imgs" / cls
        d.mkdir(parents=True, exist_ok=True)
        (d / f"img.{i}.{fmt}").write_bytes(encode(x[i], fmt, mode="RGB" if i % 2 else None))
    (tmp_path / "imgs" / "dog" / "notes.txt").write_text("not an image")
    res = run(ShardsConfig(source=str(tmp_path / "imgs"), out_dir=tmp_path / "out", samples_per_shard=4,
                           val_fraction=0.25))
    assert res.classes == ["cat", "dog", "eel"] and res.samples == 12
    assert len(res.val) == 1 and len(res.train) == 3
    assert res.train_pattern.endswith("train-{000000..000002}.tar")
    seen = {}
    for shard in res.train + res.val:
        for s in ShardReader(shard):
            ext = next(e for e in ("png", "jpg", "webp") if e in s.files)
            seen[s.key] = (ext, int(s.files["cls"]), json.loads(s.files["json"])["origin"])
    assert len(seen) == 12 and all("." not in k for k in seen)  # dots in file names never split a key
    for ext, label, origin in seen.values():
        assert origin.split("/")[0] == ["cat", "dog", "eel"][label] and origin.endswith(ext)
    assert json.loads((tmp_path / "out" / "classes.json").read_text()) == ["cat", "dog", "eel"]


def test_bad_sources_are_clear(tmp_path):
    with pytest.raises(FileNotFoundError, match="neither a built-in data set"):
        run(ShardsConfig(source=str(tmp_path / "missing"), out_dir=tmp_path / "o"))
    (tmp_path / "flat").mkdir()
    (tmp_path / "flat" / "a.png").write_bytes(b"x")
    with pytest.raises(ValueError, match="no class sub-folders"):
        run(ShardsConfig(source=str(tmp_path / "flat"), out_dir=tmp_path / "o"))


@functools.cache
def _digits():
    return mnist(6)[0]


def _png(i=0, mode=None):
    return encode(_digits()[i], "png", mode=mode)


def test_bad_images_are_skipped_and_listed_and_keys_stay_unique(tmp_path):
    d = tmp_path / "imgs" / "cat"
    d.mkdir(parents=True)
    (d / "x.png").write_bytes(_png(0))
    (d / "x.jpg").write_bytes(encode(_digits()[1], "jpg"))  # same stem as x.png: both kept, distinct keys
    (d / "empty.png").write_bytes(b"")
    (d / "text.jpg").write_bytes(b"this is not a jpeg")
    (d / "cut.png").write_bytes(_png(0)[:60])  # a truncated PNG
    (d / "renamed.webp").write_bytes(_png(0))  # a PNG named .webp is kept, stored under its real format
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "train-000000.tar.tmp-123-456").write_bytes(b"left by a killed run")
    res = run(ShardsConfig(source=str(tmp_path / "imgs"), out_dir=tmp_path / "out", val_fraction=0.0))
    assert res.samples == 3
    skipped = dict(res.skipped)
    assert set(skipped) == {"cat/empty.png", "cat/text.jpg", "cat/cut.png"}
    assert "empty" in skipped["cat/empty.png"] and "cannot decode" in skipped["cat/text.jpg"]
    samples = [s for shard in res.train for s in ShardReader(shard)]
    assert len({s.key for s in samples}) == 3
    by_origin = {json.loads(s.files["json"])["origin"]: s for s in samples}
    assert set(by_origin) == {"cat/x.png", "cat/x.jpg", "cat/renamed.webp"}
    assert "png" in by_origin["cat/renamed.webp"].files
    assert not list((tmp_path / "out").glob("*.tmp-*"))
    assert [json.loads(ln)["file"] for ln in (tmp_path / "out" / "skipped.jsonl").read_text().splitlines()] == [
        "cat/cut.png", "cat/empty.png", "cat/text.jpg"]


def test_keys_that_sanitise_to_the_same_name_are_refused_naming_both(tmp_path):
    d = tmp_path / "imgs" / "cat"
    d.mkdir(parents=True)
    (d / "a b.png").write_bytes(_png(0))
    (d / "a_b.png").write_bytes(_png(0))
    with pytest.raises(ValueError, match=r"cat/a b\.png.*cat/a_b\.png|cat/a_b\.png.*cat/a b\.png"):
        run(ShardsConfig(source=str(tmp_path / "imgs"), out_dir=tmp_path / "out"))
    assert not (tmp_path / "out").exists() or not list((tmp_path / "out").glob("*.tar"))


def test_folder_images_are_read_one_at_a_time(tmp_path, monkeypatch):
    """Stream: a file's bytes are read only when it is written, never the whole tree up front."""
    from pathlib import Path

    import distill.images.shard_writer as sw

    d = tmp_path / "imgs" / "cat"
    d.mkdir(parents=True)
    for i in range(5):
        (d / f"{i}.png").write_bytes(_png(i))
    events = []
    real_read, real_write = Path.read_bytes, sw._write_one
    monkeypatch.setattr(Path, "read_bytes", lambda self: events.append("read") or real_read(self))
    monkeypatch.setattr(sw, "_write_one", lambda *a: events.append("write") or real_write(*a))
    res = run(ShardsConfig(source=str(tmp_path / "imgs"), out_dir=tmp_path / "out", val_fraction=0.0))
    assert res.samples == 5 and events == ["read", "write"] * 5


def test_each_shard_tar_is_fsynced_before_its_rename(tmp_path, monkeypatch):
    import os

    d = tmp_path / "imgs" / "cat"
    d.mkdir(parents=True)
    for i in range(3):
        (d / f"{i}.png").write_bytes(_png(i))
    events = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd):
        events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}")))
        return real_fsync(fd)

    def replace(src, dst):
        events.append(("replace", str(src)))
        return real_replace(src, dst)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    res = run(ShardsConfig(source=str(tmp_path / "imgs"), out_dir=tmp_path / "out", val_fraction=0.0,
                           samples_per_shard=2))
    assert len(res.train) == 2
    renames = [i for i, (what, _) in enumerate(events) if what == "replace" and ".tar.tmp-" in events[i][1]]
    assert len(renames) == 2
    for i in renames:
        assert ("fsync", events[i][1]) in events[:i]


def _keys(paths):
    return [s.key for p in paths for s in ShardReader(p)]


def test_a_test_split_is_held_out_and_leaves_val_as_it_was(tmp_path):
    # sklearn's real 8x8 digits; val is cut first, then test, then train: adding a test split moves no val sample
    before = run(ShardsConfig(source="digits", out_dir=tmp_path / "a", limit=200, samples_per_shard=50,
                              val_fraction=0.1))
    res = run(ShardsConfig(source="digits", out_dir=tmp_path / "b", limit=200, samples_per_shard=50,
                           val_fraction=0.1, test_fraction=0.15))
    val, test, train = _keys(res.val), _keys(res.test), _keys(res.train)
    assert (len(val), len(test), len(train)) == (20, 30, 150)
    assert not (set(val) & set(test) or set(val) & set(train) or set(test) & set(train))
    assert val == _keys(before.val)  # the same val digits, in the same order
    assert set(train) | set(test) == set(_keys(before.train))  # test comes out of the old train samples only
    assert [p.name for p in res.test] == ["test-000000.tar"] and res.test_pattern.endswith("test-000000.tar")
    # a re-run without a test split removes the old test shards (none left to be read as current)
    run(ShardsConfig(source="digits", out_dir=tmp_path / "b", limit=200, samples_per_shard=50, val_fraction=0.1))
    assert not list((tmp_path / "b").glob("test-*.tar"))


def test_splits_that_leave_nothing_to_train_on_are_refused(tmp_path):
    with pytest.raises(ValueError, match="val_fraction 0.5 \\+ test_fraction 0.5 leave no train samples"):
        run(ShardsConfig(source="digits", out_dir=tmp_path / "o", limit=20, val_fraction=0.5, test_fraction=0.5))
    assert not (tmp_path / "o").exists() or not list((tmp_path / "o").glob("*.tar"))
