"""Shard patterns and the strict tar reader (real tar files in tmp_path)."""

import pytest
from helpers import write_tar

from distill.images.shards import ShardError, ShardReader, expand_shard_patterns, shard_stem, split_member_name


def test_brace_glob_and_missing(tmp_path):
    for i in range(3):
        (tmp_path / f"train-{i:06d}.tar").write_bytes(b"")
    got = expand_shard_patterns([str(tmp_path / "train-{000000..000002}.tar")])
    assert [p.name for p in got] == ["train-000000.tar", "train-000001.tar", "train-000002.tar"]
    assert len(expand_shard_patterns([str(tmp_path / "*.tar"), str(tmp_path / "train-000001.tar")])) == 3
    with pytest.raises(FileNotFoundError, match=r"train-000003.tar.*\(\+2 more\)"):
        expand_shard_patterns([str(tmp_path / "train-{000000..000009}.tar")])
    with pytest.raises(FileNotFoundError, match="nothing"):
        expand_shard_patterns([str(tmp_path / "nothing*.tar")])


def test_member_names_follow_webdataset():
    assert split_member_name("a/b/n0123_x.seg.png") == ("a/b/n0123_x", "seg.png")
    assert split_member_name("key.JPG") == ("key", "jpg")
    assert shard_stem(__import__("pathlib").Path("/x/train-000001.tar")) == "train-000001"


def test_reader_groups_files_and_hashes(tmp_path):
    p = write_tar(tmp_path / "s.tar", [("k1", {"png": b"1", "cls": b"3"}), ("k2", {"jpg": b"2"})])
    r = ShardReader(p)
    samples = list(r)
    assert [s.key for s in samples] == ["k1", "k2"]
    assert samples[0].files == {"png": b"1", "cls": b"3"}
    from distill.images.shards import file_sha256

    assert r.sha256 == file_sha256(p)


def test_duplicate_key_is_an_error_naming_the_key(tmp_path):
    p = write_tar(tmp_path / "d.tar", [("k1", {"png": b"1"}), ("k2", {"png": b"2"}), ("k1", {"cls": b"1"})])
    with pytest.raises(ShardError, match="duplicate key 'k1'"):
        list(ShardReader(p))


def test_truncated_tar_names_the_shard(tmp_path):
    p = write_tar(tmp_path / "t.tar", [(f"k{i}", {"png": b"x" * 5000}) for i in range(5)])
    p.write_bytes(p.read_bytes()[:7000])
    with pytest.raises(ShardError, match="t.tar: corrupt or truncated"):
        list(ShardReader(p))


@pytest.mark.parametrize("name,compress", [("g.tar.gz", "gzip"), ("g.tgz", "gzip"), ("b.tar.bz2", "bz2"),
                                           ("x.tar.xz", "lzma")])
def test_compressed_shards_read_and_truncation_checked_on_the_uncompressed_stream(tmp_path, name, compress):
    import importlib

    from distill.images.shards import file_sha256

    plain = write_tar(tmp_path / "plain.tar", [(f"k{i}", {"png": bytes(range(256)) * 20, "cls": b"3"})
                                               for i in range(4)])
    p = tmp_path / name
    p.write_bytes(importlib.import_module(compress).compress(plain.read_bytes()))
    r = ShardReader(p)
    assert [s.key for s in r] == ["k0", "k1", "k2", "k3"] and r.sha256 == file_sha256(p)
    assert shard_stem(p) == name.split(".")[0]
    p.write_bytes(p.read_bytes()[: p.stat().st_size // 2])
    with pytest.raises(ShardError, match=f"{name}: corrupt or truncated"):
        list(ShardReader(p))
    # a complete compressed stream around a tar cut short (no end-of-archive marker) is truncated too
    import tarfile

    with tarfile.open(plain) as tar:
        last = tar.getmembers()[-1]
    end = last.offset_data + -(-last.size // 512) * 512  # right after the last member: no end-of-archive blocks
    p.write_bytes(importlib.import_module(compress).compress(plain.read_bytes()[:end]))
    with pytest.raises(ShardError, match=f"{name}: corrupt or truncated"):
        list(ShardReader(p))
