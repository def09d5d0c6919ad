"""Read the cache: only manifest-listed files with a matching checksum, rows in shard order.

Verification costs one checksum per file per process (remembered by the file's size, mtime, ctime and inode);
every open also checks the recorded size and the Parquet footer and, where the manifest records the file's own
identity (this build), that it did not move since it was published or else that its checksum still matches: so
`verify=False` (the training loader) still refuses a same-size altered file.
A directory may be a held version of a local cache (core/storage/versions.py): its manifest is the one the job
planned with and its files are read, by their content-addressed names, from the cache directory (`data_dir`).
The manifest is the snapshot plus its journal (see teacher_cache/manifest.py); `CacheReader.shared` reads it
once per process while it stays unchanged (two stats to tell), however many shards a loader opens.

    reader = CacheReader(cache_root / fingerprint)
    for stem in reader.shards:
        arrays = reader.arrays(stem)           # numpy columns, for batching
        for s in reader.iter_shard(stem): ...  # or one CachedSample per row
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from distill.core.atomic_io import checksum_matches
from distill.core.errors import DistillError
from distill.core.storage import open_store
from distill.core.storage.names import under
from distill.core.storage.versions import data_dir
from distill.images.views import ViewParams
from distill.teacher_cache.manifest import MANIFEST_NAME, Manifest, cache_file_altered, cache_file_problem
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
    SchemaError,
)


class CacheError(DistillError, RuntimeError):
    """The cache is missing, incomplete, or does not match what the caller expects; names the file."""

    user_input = True


ERRORS_DIR = "errors"  # errors/<shard>.jsonl: the samples a cache file deliberately lacks, and why
FIX_DAMAGED = "delete it and re-run `distill cache` (it relabels that shard)"


_SHARED: dict[tuple[str, bool], CacheReader] = {}


@dataclass
class CachedSample:
    key: str
    label: int | None
    image_hw: tuple[int, int]
    views: list[ViewParams]
    topk_ids: np.ndarray  # (V, k)
    topk_logits: np.ndarray  # (V, k) float16, shifted log-probabilities
    tail_lse: np.ndarray  # (V,) float32


@dataclass
class ShardArrays:
    """A whole shard's cache as numpy arrays (row i = sample i of the shard, in tar order)."""

    keys: list[str]
    labels: np.ndarray  # (N,) int64, -1 where unlabelled
    image_hw: np.ndarray  # (N, 2)
    crops: np.ndarray  # (N, V, 4) top, left, height, width
    flips: np.ndarray  # (N, V) bool
    topk_ids: np.ndarray  # (N, V, k)
    topk_logits: np.ndarray  # (N, V, k) float16
    tail_lse: np.ndarray  # (N, V) float32
    features: np.ndarray | None = None  # (N, V, d) float16 teacher embeddings (schema v2 with features)

    def view(self, i: int, v: int) -> ViewParams:
        t, left, h, w = (int(x) for x in self.crops[i, v])
        return ViewParams(t, left, h, w, bool(self.flips[i, v]))


def _fixed(col: pa.ChunkedArray, *shape: int) -> np.ndarray:
    arr = col.combine_chunks()
    while isinstance(arr.type, pa.FixedSizeListType):
        arr = arr.flatten()
    return arr.to_numpy(zero_copy_only=False).copy().reshape(-1, *shape)


class CacheReader:
    """One fingerprint directory of the cache."""

    def __init__(self, directory: Path, verify: bool = True, expect_fingerprint: str | None = None) -> None:
        self.directory = Path(directory)
        self._journal = open_store(self.directory).journal(MANIFEST_NAME)
        manifest = Manifest.read(self._journal, str(self.directory / MANIFEST_NAME))
        if manifest is None:
            raise CacheError(f"{self.directory}: no cache here (no manifest.json); run `distill cache` first")
        if expect_fingerprint is not None and manifest.fingerprint != expect_fingerprint:
            raise CacheError(f"{self.directory}: cache was written by teacher fingerprint {manifest.fingerprint}, "
                             f"but the config names {expect_fingerprint}; re-run `distill cache` with this teacher")
        self.manifest = manifest
        self.data_dir = data_dir(self.directory)  # where the files are: the directory, or a version's cache dir
        self.verify = verify
        self._meta: dict[str, CacheMeta] = {}
        self._sorted: list[str] | None = None

    @classmethod
    def shared(cls, directory: Path, verify: bool = False) -> CacheReader:
        """This process's reader of `directory`, read again only when its manifest changed: a loader opening
        shard after shard pays for the manifest once, not once per shard (20,000 shards: 20,000 x 10 MB)."""
        key = (str(Path(directory).resolve()), verify)
        reader = _SHARED.get(key)
        if reader is None or reader._journal.loaded_stamp is None or \
                reader._journal.stamp() != reader._journal.loaded_stamp:
            reader = _SHARED[key] = cls(directory, verify=verify)
        return reader

    @property
    def fingerprint(self) -> str:
        return self.manifest.fingerprint

    @property
    def shards(self) -> list[str]:
        """The listed shards, sorted once per reader (its manifest never changes): callers index it in loops, and
        sorting 20,000 names per call made `cache inspect` quadratic (5.8 s at 20,000 shards, 0.38 s after)."""
        if self._sorted is None:
            self._sorted = sorted(self.manifest.shards)
        return self._sorted

    def path(self, stem: str) -> Path:
        entry = self.manifest.shards.get(stem)
        if entry is None:
            raise CacheError(f"{self.directory}: shard '{stem}' has no complete cache file (not in the manifest); "
                             "run `distill cache` over it")
        return under(self.data_dir, entry.file, str(self.directory / MANIFEST_NAME))

    def check(self, stem: str) -> Path:
        """Refuse a listed file that is missing, truncated or altered; the checksum only once per process."""
        path, entry = self.path(stem), self.manifest.shards[stem]
        if not path.exists():
            raise CacheError(f"{path}: listed in the manifest but missing; re-run `distill cache`")
        if (problem := cache_file_problem(path, entry.file_bytes)) is not None:
            raise CacheError(f"{path}: {problem}; {FIX_DAMAGED}")
        if cache_file_altered(path, entry):
            raise CacheError(f"{path}: changed since it was written and its checksum does not match the manifest "
                             f"(partial or altered file); {FIX_DAMAGED}")
        if self.verify and not checksum_matches(path, entry.file_sha256):
            raise CacheError(f"{path}: checksum does not match the manifest (partial or altered file); {FIX_DAMAGED}")
        return path

    def table(self, stem: str, columns: list[str] | None = None) -> pa.Table:
        """The shard's table after checking checksum, row count, schema version and fingerprint."""
        path, entry = self.check(stem), self.manifest.shards[stem]
        try:
            table = pq.read_table(path, columns=columns)
        except (pa.ArrowException, OSError) as exc:
            raise CacheError(f"{path}: unreadable Parquet ({exc}); {FIX_DAMAGED}") from exc
        try:
            meta = CacheMeta.from_kv(table.schema.metadata, str(path))
        except SchemaError as exc:
            raise CacheError(str(exc)) from exc
        if meta.fingerprint != self.fingerprint:
            raise CacheError(f"{path}: file fingerprint {meta.fingerprint} != directory {self.fingerprint}")
        if table.num_rows != entry.rows:
            raise CacheError(f"{path}: {table.num_rows} rows but the manifest says {entry.rows}")
        self._meta[stem] = meta
        return table

    def meta(self, stem: str | None = None) -> CacheMeta:
        stem = stem or self.shards[0]
        if stem not in self._meta:
            path = self.check(stem)
            try:
                self._meta[stem] = CacheMeta.from_kv(pq.read_schema(path).metadata, str(path))
            except SchemaError as exc:
                raise CacheError(str(exc)) from exc
            except (pa.ArrowException, OSError) as exc:
                raise CacheError(f"{path}: unreadable Parquet ({exc}); {FIX_DAMAGED}") from exc
        return self._meta[stem]

    def arrays(self, stem: str) -> ShardArrays:
        t = self.table(stem)
        m = self._meta[stem]
        labels = t.column(COL_LABEL).fill_null(-1).to_numpy().astype(np.int64)
        return ShardArrays(
            keys=t.column(COL_KEY).to_pylist(), labels=labels,
            image_hw=_fixed(t.column(COL_IMAGE_HW), 2),
            crops=_fixed(t.column(COL_CROP), m.num_views, 4),
            flips=_fixed(t.column(COL_FLIP), m.num_views).astype(bool),
            topk_ids=_fixed(t.column(COL_TOPK_IDS), m.num_views, m.k),
            topk_logits=_fixed(t.column(COL_TOPK_LOGITS), m.num_views, m.k),
            tail_lse=_fixed(t.column(COL_TAIL_LSE), m.num_views),
            features=self._features(stem, t, m))

    def _features(self, stem: str, t: pa.Table, m: CacheMeta) -> np.ndarray | None:
        """(N, V, d) float16 teacher features of a v2 file that stores them, else None."""
        if m.feature_dim is None:
            return None
        if COL_FEATURES not in t.column_names:
            raise CacheError(f"{self.path(stem)}: metadata declares {m.feature_dim}-dim features but the file has "
                             f"no '{COL_FEATURES}' column (damaged file); re-run `distill cache`")
        return _fixed(t.column(COL_FEATURES), m.num_views, m.feature_dim)

    def errors(self, stem: str) -> list[dict]:
        """The per-sample errors recorded for one shard (what its cache file deliberately lacks), from the error
        file its entry names, checked against its checksum (an older build's unnamed file: unchecked)."""
        entry = self.manifest.shards.get(stem)
        if entry is None or not entry.errors:
            return []
        if entry.errors_file is None:
            return read_shard_errors(self.data_dir, stem)
        path = under(self.data_dir, entry.errors_file, str(self.directory / MANIFEST_NAME))
        if not path.exists() or (entry.errors_sha256 and not checksum_matches(path, entry.errors_sha256)):
            raise CacheError(f"{path}: missing, or not the error file the manifest lists (checksum); re-run "
                             "`distill cache` over that shard")
        return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]

    def all_errors(self) -> list[dict]:
        """Every recorded per-sample error (shard, key, reason), shard by shard."""
        return [e for stem in self.shards for e in self.errors(stem)]

    def iter_shard(self, stem: str) -> Iterator[CachedSample]:
        a = self.arrays(stem)
        for i, key in enumerate(a.keys):
            yield CachedSample(key=key, label=None if a.labels[i] < 0 else int(a.labels[i]),
                               image_hw=(int(a.image_hw[i, 0]), int(a.image_hw[i, 1])),
                               views=[a.view(i, v) for v in range(a.crops.shape[1])],
                               topk_ids=a.topk_ids[i], topk_logits=a.topk_logits[i], tail_lse=a.tail_lse[i])


def read_shard_errors(cache_dir: Path, stem: str) -> list[dict]:
    """The errors of one shard in the unnamed file older builds wrote (``errors/<stem>.jsonl``); for a cache
    directory as a whole use `CacheReader.errors`, which reads the file the manifest names and checks it."""
    path = under(Path(cache_dir), f"{ERRORS_DIR}/{stem}.jsonl")
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []


def read_errors(cache_dir: Path) -> list[dict]:
    """Every recorded per-sample error (shard, key, reason) of a cache directory, as its manifest lists them."""
    return CacheReader(cache_dir, verify=False).all_errors()
