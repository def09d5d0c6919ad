"""`distill shards` from an image-folder tree: classes from folder names, original bytes kept, split and sizes."""

import json

import pytest
from helpers import encode, mnist

from teacher_cache.shard_writer import ShardsConfig, run
from teacher_cache.shards import ShardReader


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
