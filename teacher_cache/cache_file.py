"""Write one cache file crash-safely: Parquet to a temp name, fsync, checksum, rename into place."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from core.atomic_io import atomic_write, file_sha256
from teacher_cache.schema import (
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
