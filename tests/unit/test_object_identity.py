"""Shards in object storage without a store: the refresh decision from listed identities (size, last-modified,
ETag) reads nothing, and the config keeps s3:// URLs intact.
The store itself: tests/integration/test_object_store.py."""

from __future__ import annotations

import pickle
from pathlib import Path

import pytest

from distill.images.shards import ObjectShard, ShardIdentity, shard_stem
from distill.teacher_cache.config import CacheConfig
from distill.teacher_cache.manifest import Manifest, ShardEntry, plan_refresh

URL = "s3://bucket/wds/train-000000.tar"


def _obj(size: int = 100, mtime: int = 5, etag: str = "abc") -> ObjectShard:
    return ObjectShard(URL, ShardIdentity(size, mtime, etag=etag))


def _manifest(etag: str = "abc") -> Manifest:
    m = Manifest(fingerprint="fp", teacher={})
    m.shards["train-000000"] = ShardEntry(source=URL, size=100, mtime_ns=5, content_sha256="c" * 64,
                                          file="train-000000-0123456789abcdef.parquet", file_bytes=12,
                                          file_sha256="f" * 64, rows=1, errors=0, etag=etag)
    return m


def _listing_says_present(entry: ShardEntry) -> str | None:
    return None


def test_an_unchanged_object_is_decided_from_its_listing_alone(tmp_path):
    # any read of the object would need a store: there is none here, so a read would raise
    plan = plan_refresh(_manifest(), {"train-000000": _obj()}, tmp_path, cache_file_check=_listing_says_present)
    assert plan.unchanged == ["train-000000"] and not plan.todo


@pytest.mark.parametrize("moved", [{"etag": "other"}, {"mtime": 6}])
def test_a_moved_etag_or_last_modified_with_another_size_is_relabelled_without_a_read(tmp_path, moved):
    plan = plan_refresh(_manifest(), {"train-000000": _obj(size=101, **moved)}, tmp_path,
                        cache_file_check=_listing_says_present)
    assert [(s, why) for s, _, why in plan.todo] == [("train-000000", "changed")]


def test_a_cache_file_missing_from_the_store_listing_is_relabelled(tmp_path):
    plan = plan_refresh(_manifest(), {"train-000000": _obj()}, tmp_path,
                        cache_file_check=lambda e: f"{e.file} is missing")
    assert [why for _, _, why in plan.todo] == ["cache file missing or damaged"]


def test_object_identity_never_equals_a_file_identity_and_round_trips_through_the_manifest():
    obj = ShardIdentity(100, 5, etag="abc")
    assert obj.same_cheap(_manifest().shards["train-000000"].identity())
    assert not obj.same_cheap(ShardIdentity(100, 5, ctime_ns=1, inode=2))
    assert not ShardIdentity(100, 5, etag="abc").same_cheap(ShardIdentity(100, 5, etag="abd"))


def test_object_shard_names_pickles_and_refuses_to_be_opened_as_a_local_file():
    shard = _obj()
    assert shard.name == "train-000000.tar" and shard_stem(shard) == "train-000000" and str(shard) == URL
    assert pickle.loads(pickle.dumps(shard)) == shard  # sent to Ray actors and loader workers
    with pytest.raises(TypeError, match="object URL"):
        open(shard, "rb")  # noqa: SIM115


def test_config_keeps_s3_urls_and_makes_paths_of_the_rest():
    base = {"shards": ["s3://b/x/*.tar"], "teacher": {"arch": "cnn_small", "checkpoint": "t.pt"}}
    assert CacheConfig.model_validate({**base, "cache_root": "s3://b/cache/"}).cache_root == "s3://b/cache"
    assert CacheConfig.model_validate({**base, "cache_root": "runs/c"}).cache_root == Path("runs/c")
