"""The cache contract: the single source of truth for what a soft-label Parquet file holds.

One Parquet file per input shard, one row per sample. Per-view columns are fixed-size lists of length V
(number of views); per-view-per-class columns are fixed-size lists of fixed-size lists (V x k).

Logits are stored shifted by the row's full log-sum-exp (so they are log-probabilities at T=1). Softmax at
any temperature is invariant to a constant shift, so nothing is lost, and values near 0 keep more fp16
precision than raw logits of magnitude ~20 would.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

import pyarrow as pa

from distill.core.errors import InputError

SCHEMA_VERSION = 2
SUPPORTED_SCHEMA_VERSIONS = (1, 2)

# Parquet key-value metadata keys (all values are UTF-8 strings; JSON for structured ones).
META_SCHEMA_VERSION = b"distill.schema_version"
META_FINGERPRINT = b"distill.fingerprint"
META_TOPK = b"distill.topk"
META_NUM_VIEWS = b"distill.num_views"
META_NUM_CLASSES = b"distill.num_classes"
META_PREPROCESSING = b"distill.preprocessing"
META_TEACHER = b"distill.teacher"
META_SHARD = b"distill.shard"
META_VIEW_POLICY = b"distill.view_policy"
META_FEATURES = b"distill.features"  # v2, only with the features column: {dim, source_dim, projection, seed, ...}
META_PRECISION = b"distill.precision"  # optional (absent in older files): forward precision, fp32|bf16|fp16
META_HEAD_PRECISION = b"distill.head_precision"  # optional: the classifier head's (fp32 under autocast if hookable)
META_DECODE_BACKEND = b"distill.decode_backend"  # optional: cpu (Pillow) | gpu (nvjpeg, Pillow fallback)

COL_KEY = "key"
COL_LABEL = "label"
COL_IMAGE_HW = "image_hw"  # [2] int32: decoded source image (height, width); replay checks it
COL_CROP = "crop"  # [V][4] int32: (top, left, height, width) in source-image pixels
COL_FLIP = "flip"  # [V] bool: horizontal flip after the crop
COL_TOPK_IDS = "topk_ids"  # [V][k] int16 (int32 when num_classes > 32767)
COL_TOPK_LOGITS = "topk_logits"  # [V][k] float16, shifted by the full log-sum-exp
COL_TAIL_LSE = "tail_lse"  # [V] float32: log sum exp of the logits outside the top-k (same shift); -inf if k == C
COL_FEATURES = "features"  # v2, optional: [V][d] float16 teacher penultimate embedding (projected to d dims)


def fingerprint_schema_version(has_features: bool) -> int:
    """The schema version the fingerprint hashes: the version whose content the cache holds.

    A v2 file without features holds exactly the v1 columns and values, so hashing 1 for it keeps every
    existing cache valid (no full re-label after an upgrade); a cache with features is a different cache.
    """
    return 2 if has_features else 1


def views_to_use(requested: int | None, cached: int) -> int:
    """How many cached views a student trains on: the ones it asks for (empty = all), at most those cached.

    The one place this rule lives: the group planner and the epoch loop must agree on it."""
    return min(requested or cached, cached)


def id_type(num_classes: int) -> pa.DataType:
    """Class ids fit int16 for any realistic vision head; fall back to int32 beyond it."""
    return pa.int16() if num_classes <= 32767 else pa.int32()


def arrow_schema(num_views: int, k: int, num_classes: int, feature_dim: int | None = None) -> pa.Schema:
    """The Arrow schema of a cache file for V views, top-k, C classes and (v2) d-dim teacher features."""
    v, ids = num_views, id_type(num_classes)
    extra = [] if feature_dim is None else [
        pa.field(COL_FEATURES, pa.list_(pa.list_(pa.float16(), feature_dim), v), nullable=False)]
    return pa.schema(
        [
            pa.field(COL_KEY, pa.string(), nullable=False),
            pa.field(COL_LABEL, pa.int32(), nullable=True),
            pa.field(COL_IMAGE_HW, pa.list_(pa.int32(), 2), nullable=False),
            pa.field(COL_CROP, pa.list_(pa.list_(pa.int32(), 4), v), nullable=False),
            pa.field(COL_FLIP, pa.list_(pa.bool_(), v), nullable=False),
            pa.field(COL_TOPK_IDS, pa.list_(pa.list_(ids, k), v), nullable=False),
            pa.field(COL_TOPK_LOGITS, pa.list_(pa.list_(pa.float16(), k), v), nullable=False),
            pa.field(COL_TAIL_LSE, pa.list_(pa.float32(), v), nullable=False),
            *extra,
        ]
    )


@dataclass(frozen=True)
class CacheMeta:
    """What every cache file declares about itself (stored as Parquet key-value metadata)."""

    schema_version: int
    fingerprint: str
    k: int
    num_views: int
    num_classes: int
    preprocessing: dict[str, Any]
    teacher: dict[str, Any]
    shard: str
    view_policy: dict[str, Any]
    features: dict[str, Any] | None = None  # v2: {dim, source_dim, projection, seed, layer}; None = no column
    precision: str | None = None  # how the labels were computed; None in files written before it was recorded
    head_precision: str | None = None
    decode_backend: str | None = None

    @property
    def feature_dim(self) -> int | None:
        return int(self.features["dim"]) if self.features else None

    def to_kv(self) -> dict[bytes, bytes]:
        kv = {
            META_SCHEMA_VERSION: str(self.schema_version).encode(),
            META_FINGERPRINT: self.fingerprint.encode(),
            META_TOPK: str(self.k).encode(),
            META_NUM_VIEWS: str(self.num_views).encode(),
            META_NUM_CLASSES: str(self.num_classes).encode(),
            META_PREPROCESSING: json.dumps(self.preprocessing, sort_keys=True).encode(),
            META_TEACHER: json.dumps(self.teacher, sort_keys=True).encode(),
            META_SHARD: self.shard.encode(),
            META_VIEW_POLICY: json.dumps(self.view_policy, sort_keys=True).encode(),
        }
        if self.features is not None:
            kv[META_FEATURES] = json.dumps(self.features, sort_keys=True).encode()
        for key, value in ((META_PRECISION, self.precision), (META_HEAD_PRECISION, self.head_precision),
                           (META_DECODE_BACKEND, self.decode_backend)):
            if value is not None:
                kv[key] = value.encode()
        return kv

    @classmethod
    def from_kv(cls, kv: dict[bytes, bytes] | None, where: str) -> CacheMeta:
        """Parse file metadata; raise a SchemaError naming the file when it is not a cache file we can read."""
        kv = kv or {}
        if META_SCHEMA_VERSION not in kv:
            raise SchemaError(f"{where}: not a distill cache file (no {META_SCHEMA_VERSION.decode()} metadata)")
        version = int(kv[META_SCHEMA_VERSION])
        if version not in SUPPORTED_SCHEMA_VERSIONS:
            raise SchemaError(
                f"{where}: cache schema version {version} is not supported by this build "
                f"(supports {list(SUPPORTED_SCHEMA_VERSIONS)}); re-create the cache with `distill cache` "
                "or upgrade distill"
            )
        try:
            return cls(
                schema_version=version,
                fingerprint=kv[META_FINGERPRINT].decode(),
                k=int(kv[META_TOPK]),
                num_views=int(kv[META_NUM_VIEWS]),
                num_classes=int(kv[META_NUM_CLASSES]),
                preprocessing=json.loads(kv[META_PREPROCESSING]),
                teacher=json.loads(kv[META_TEACHER]),
                shard=kv[META_SHARD].decode(),
                view_policy=json.loads(kv[META_VIEW_POLICY]),
                features=json.loads(kv[META_FEATURES]) if version >= 2 and META_FEATURES in kv else None,
                precision=kv[META_PRECISION].decode() if META_PRECISION in kv else None,
                head_precision=kv[META_HEAD_PRECISION].decode() if META_HEAD_PRECISION in kv else None,
                decode_backend=kv[META_DECODE_BACKEND].decode() if META_DECODE_BACKEND in kv else None,
            )
        except (KeyError, ValueError) as exc:
            raise SchemaError(f"{where}: damaged cache metadata ({exc}); delete the file and re-run") from exc


class SchemaError(InputError):
    """A cache file does not follow the contract this build understands."""
