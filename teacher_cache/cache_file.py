"""Write one cache file crash-safely (Parquet to a temp name, fsync, checksum, then renamed into place or uploaded
under a content-addressed name: `core.storage` decides), and the per-shard numbers the manifest keeps."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from distill.core.atomic_io import atomic_write, file_sha256
from distill.core.storage import Published, Store
from distill.teacher_cache.schema import (
    COL_CROP,
    COL_FEATURES,
    COL_FLIP,
    COL_IMAGE_HW,
    COL_KEY,
    COL_LABEL,
    COL_TAIL_LSE,
    COL_TOPK_IDS,
    COL_TOPK_LOGITS,
    CacheMeta,
    arrow_schema,
    id_type,
)


def _nested(flat: np.ndarray, inner: int, outer: int, typ: pa.DataType) -> pa.Array:
    arr = pa.array(flat.reshape(-1), type=typ)
    return pa.FixedSizeListArray.from_arrays(pa.FixedSizeListArray.from_arrays(arr, inner), outer)


def rows_to_table(cols: dict, meta: CacheMeta) -> pa.Table:
    """Column lists from the labeller -> an Arrow table that follows the schema exactly."""
    n, v, k = len(cols["key"]), meta.num_views, meta.k
    ids_np = np.asarray(cols["ids"]).reshape(n, v, k) if n else np.zeros((0, v, k))
    logits_np = np.asarray(cols["logits"]).reshape(n, v, k) if n else np.zeros((0, v, k))
    tail_np = np.asarray(cols["tail"], dtype=np.float32).reshape(n, v) if n else np.zeros((0, v), np.float32)
    crops = np.array([[vp.box() for vp in views] for views in cols["views"]], dtype=np.int32).reshape(n, v, 4)
    flips = np.array([[vp.flip for vp in views] for views in cols["views"]], dtype=bool).reshape(n, v)
    hw = np.asarray(cols["hw"], dtype=np.int32).reshape(n, 2)
    ids_dtype = np.int16 if id_type(meta.num_classes) == pa.int16() else np.int32
    schema = arrow_schema(v, k, meta.num_classes, meta.feature_dim).with_metadata(meta.to_kv())
    arrays = [
        pa.array(cols["key"], type=pa.string()),
        pa.array(cols["label"], type=pa.int32()),
        pa.FixedSizeListArray.from_arrays(pa.array(hw.reshape(-1), type=pa.int32()), 2),
        _nested(crops, 4, v, pa.int32()),
        pa.FixedSizeListArray.from_arrays(pa.array(flips.reshape(-1), type=pa.bool_()), v),
        _nested(ids_np.astype(ids_dtype), k, v, id_type(meta.num_classes)),
        _nested(logits_np.astype(np.float16), k, v, pa.float16()),
        pa.FixedSizeListArray.from_arrays(pa.array(tail_np.reshape(-1), type=pa.float32()), v),
    ]
    names = [COL_KEY, COL_LABEL, COL_IMAGE_HW, COL_CROP, COL_FLIP, COL_TOPK_IDS, COL_TOPK_LOGITS, COL_TAIL_LSE]
    if meta.feature_dim is not None:  # schema v2: teacher features, (N, V, d) float16
        d = meta.feature_dim
        feats = np.asarray(cols["feat"], dtype=np.float32).reshape(n, v, d) if n else np.zeros((0, v, d))
        arrays.append(_nested(feats.astype(np.float16), d, v, pa.float16()))
        names.append(COL_FEATURES)
    return pa.Table.from_arrays(arrays, names=names).cast(schema)


def write_cache_file(final: Path, cols: dict, meta: CacheMeta) -> tuple[int, str]:
    """Write, fsync, hash, then atomically rename; returns (bytes, sha256). Never leaves a partial `final`."""
    table = rows_to_table(cols, meta)
    final.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(final, lambda tmp: pq.write_table(table, tmp, compression="zstd", row_group_size=4096))
    return final.stat().st_size, file_sha256(final)


def publish_cache_file(store: Store, stem: str, cols: dict, meta: CacheMeta) -> Published:
    """Write the shard's cache file into the store: the name the manifest will list, bytes, sha256, identity."""
    table = rows_to_table(cols, meta)
    return store.publish(f"{stem}.parquet",
                         lambda tmp: pq.write_table(table, tmp, compression="zstd", row_group_size=4096))


def shard_stats(cols: dict) -> dict[str, float | int]:
    """What `distill cache inspect` and training plans need from a shard, kept in the manifest so that neither
    reads 20,000 files: labelled rows, teacher view-0 top-1 hits on them, and the top-k probability mass
    (summed over rows and views; stored logits are log-probabilities at T=1)."""
    n = len(cols["key"])
    if n == 0:
        return {"labelled": 0, "top1_correct": 0, "topk_mass": 0.0}
    labels = np.array([-1 if x is None else int(x) for x in cols["label"]])
    top1 = np.array([ids[0][0] for ids in cols["ids"]])
    mass = float(np.exp(np.asarray(cols["logits"], dtype=np.float16).astype(np.float32)).sum())
    has = labels >= 0
    return {"labelled": int(has.sum()), "top1_correct": int((top1[has] == labels[has]).sum()), "topk_mass": mass}
