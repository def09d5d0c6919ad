import pyarrow as pa
import pytest

from distill.teacher_cache.schema import CacheMeta, SchemaError, arrow_schema


def _meta(**kw):
    d = dict(schema_version=1, fingerprint="fp", k=5, num_views=2, num_classes=10, preprocessing={"a": 1},
             teacher={"arch": "x"}, shard="s", view_policy={"seed": 0})
    d.update(kw)
    return CacheMeta(**d)


def test_meta_roundtrip_and_version_check():
    m = _meta()
    assert CacheMeta.from_kv(m.to_kv(), "f") == m
    kv = m.to_kv()
    kv[b"distill.schema_version"] = b"99"
    with pytest.raises(SchemaError, match="f: cache schema version 99 is not supported"):
        CacheMeta.from_kv(kv, "f")
    with pytest.raises(SchemaError, match="not a distill cache file"):
        CacheMeta.from_kv({}, "f")


def test_id_width_follows_class_count():
    assert arrow_schema(2, 5, 1000).field("topk_ids").type.value_type.value_type == pa.int16()
    assert arrow_schema(2, 5, 40000).field("topk_ids").type.value_type.value_type == pa.int32()
