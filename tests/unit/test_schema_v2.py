"""Schema v2: the optional teacher-feature column; version-1 files stay readable by this build."""

import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from distill.images.shards import file_sha256
from distill.images.views import ViewParams
from distill.student_train.feature_kd import FeatureKDError, cache_feature_dim
from distill.teacher_cache.cache_file import write_cache_file
from distill.teacher_cache.inspect_cache import inspect_cache
from distill.teacher_cache.manifest import Manifest, ShardEntry
from distill.teacher_cache.reader import CacheError, CacheReader
from distill.teacher_cache.schema import SCHEMA_VERSION, SUPPORTED_SCHEMA_VERSIONS, CacheMeta, arrow_schema

N, V, K, C, D = 6, 2, 3, 10, 4

# The version-1 layout, frozen here on purpose: this test must keep describing what v1 builds wrote.
V1_FIELDS = [
    pa.field("key", pa.string(), nullable=False),
    pa.field("label", pa.int32(), nullable=True),
    pa.field("image_hw", pa.list_(pa.int32(), 2), nullable=False),
    pa.field("crop", pa.list_(pa.list_(pa.int32(), 4), V), nullable=False),
    pa.field("flip", pa.list_(pa.bool_(), V), nullable=False),
    pa.field("topk_ids", pa.list_(pa.list_(pa.int16(), K), V), nullable=False),
    pa.field("topk_logits", pa.list_(pa.list_(pa.float16(), K), V), nullable=False),
    pa.field("tail_lse", pa.list_(pa.float32(), V), nullable=False),
]
V1_META = {b"distill.schema_version": b"1", b"distill.fingerprint": b"fp1", b"distill.topk": str(K).encode(),
           b"distill.num_views": str(V).encode(), b"distill.num_classes": str(C).encode(),
           b"distill.preprocessing": b'{"input_size": 8}', b"distill.teacher": b'{"arch": "t"}',
           b"distill.shard": b"s0", b"distill.view_policy": b'{"seed": 0}'}


def _register(directory, stem, path, fingerprint):
    m = Manifest.load(directory) or Manifest(fingerprint=fingerprint, teacher={"arch": "t"})
    m.shards[stem] = ShardEntry(source=f"/x/{stem}.tar", size=1, mtime_ns=1, content_sha256="c", file=path.name,
                                file_bytes=path.stat().st_size, file_sha256=file_sha256(path), rows=N, errors=0)
    m.save(directory)


def _cols(rng, with_feat):
    cols = {"key": [f"k{i}" for i in range(N)], "label": [i % C if i else None for i in range(N)],
            "hw": [(28, 28)] * N, "views": [[ViewParams(0, 0, 28, 28, False)] * V for _ in range(N)],
            "ids": rng.integers(0, C, (N, V, K)), "logits": rng.normal(size=(N, V, K)),
            "tail": rng.normal(size=(N, V))}
    if with_feat:
        cols["feat"] = rng.normal(size=(N, V, D)).astype(np.float32)
    return cols


def write_v1_cache(directory):
    """A cache directory holding one file exactly as a version-1 build wrote it."""
    directory.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    flat = lambda a, t: pa.array(np.asarray(a).reshape(-1), type=t)  # noqa: E731
    nest = lambda a, inner, t: pa.FixedSizeListArray.from_arrays(  # noqa: E731
        pa.FixedSizeListArray.from_arrays(flat(a, t), inner), V)
    arrays = [pa.array([f"k{i}" for i in range(N)]), pa.array([1] * N, type=pa.int32()),
              pa.FixedSizeListArray.from_arrays(flat([28, 28] * N, pa.int32()), 2),
              nest(np.tile([0, 0, 28, 28], N * V), 4, pa.int32()),
              pa.FixedSizeListArray.from_arrays(flat([False] * N * V, pa.bool_()), V),
              nest(rng.integers(0, C, N * V * K), K, pa.int16()),
              nest(rng.normal(size=N * V * K), K, pa.float16()),
              pa.FixedSizeListArray.from_arrays(flat(rng.normal(size=N * V), pa.float32()), V)]
    schema = pa.schema(V1_FIELDS).with_metadata(V1_META)
    table = pa.Table.from_arrays(arrays, schema=schema)
    path = directory / "s0.parquet"
    pq.write_table(table, path)
    _register(directory, "s0", path, "fp1")
    return path


def test_v1_file_read_by_v2_build(tmp_path):
    assert SCHEMA_VERSION == 2 and SUPPORTED_SCHEMA_VERSIONS == (1, 2)
    write_v1_cache(tmp_path / "fp1")
    reader = CacheReader(tmp_path / "fp1")
    a = reader.arrays("s0")
    assert reader.meta("s0").schema_version == 1 and reader.meta("s0").features is None
    assert a.features is None and a.topk_ids.shape == (N, V, K) and a.tail_lse.shape == (N, V)
    assert [s.key for s in reader.iter_shard("s0")] == [f"k{i}" for i in range(N)]
    info = inspect_cache(tmp_path / "fp1")
    assert info["features"] is None and info["feature_bytes"] == 0 and info["file_schema_versions"] == [1]
    assert info["bytes_per_sample_view"] == info["bytes_per_sample_view_without_features"] > 0


def _meta(features):
    return CacheMeta(SCHEMA_VERSION, "fp2", K, V, C, {"input_size": 8}, {"arch": "t"}, "s0", {"seed": 0}, features)


def test_v2_features_roundtrip_and_inspect(tmp_path):
    d = tmp_path / "fp2"
    cols = _cols(np.random.default_rng(1), with_feat=True)
    feat_meta = {"dim": D, "source_dim": 16, "projection": "gaussian", "seed": 5, "layer": "fc"}
    write_cache_file(d / "s0.parquet", cols, _meta(feat_meta))
    _register(d, "s0", d / "s0.parquet", "fp2")
    schema = pq.read_schema(d / "s0.parquet")
    assert schema.field("features").type == arrow_schema(V, K, C, D).field("features").type
    assert json.loads(schema.metadata[b"distill.features"])["seed"] == 5
    reader = CacheReader(d)
    a = reader.arrays("s0")
    assert a.features.dtype == np.float16 and a.features.shape == (N, V, D)
    np.testing.assert_array_equal(a.features, cols["feat"].astype(np.float16))
    assert reader.meta("s0").feature_dim == D
    assert cache_feature_dim(reader, ["s0"], ["v"]) == D
    info = inspect_cache(d)
    assert info["features"]["dim"] == D and info["feature_bytes"] > 0
    assert info["bytes_per_sample_view_without_features"] < info["bytes_per_sample_view"]


def test_v2_without_features_has_v1_columns(tmp_path):
    d = tmp_path / "fp3"
    write_cache_file(d / "s0.parquet", _cols(np.random.default_rng(2), with_feat=False), _meta(None))
    schema = pq.read_schema(d / "s0.parquet")
    assert [f.name for f in schema] == [f.name for f in V1_FIELDS]
    assert b"distill.features" not in schema.metadata


def test_feature_kd_on_v1_cache_names_the_fix(tmp_path):
    path = write_v1_cache(tmp_path / "fp1")
    reader = CacheReader(tmp_path / "fp1")
    with pytest.raises(FeatureKDError) as exc:
        cache_feature_dim(reader, ["s0"], ["cnn-feat"])
    msg = str(exc.value)
    assert str(path) in msg and "schema v1" in msg and "cache.features.enabled: true" in msg
    assert "distill cache" in msg and "cnn-feat" in msg


def test_declared_features_without_column_is_an_error(tmp_path):
    d = tmp_path / "fp4"
    cols = _cols(np.random.default_rng(3), with_feat=False)
    write_cache_file(d / "s0.parquet", cols, _meta(None))
    table = pq.read_table(d / "s0.parquet")
    kv = dict(table.schema.metadata)
    kv[b"distill.features"] = json.dumps({"dim": D}).encode()
    pq.write_table(table.replace_schema_metadata(kv), d / "s0.parquet")
    _register(d, "s0", d / "s0.parquet", "fp2")
    with pytest.raises(CacheError, match="declares 4-dim features but the file has no 'features' column"):
        CacheReader(d).arrays("s0")
