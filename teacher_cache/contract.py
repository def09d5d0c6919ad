"""The cache contract: all that another stage may use of the cache, declared in one place.

Training reads the cache through these names only (and compress through training); `tests/unit/test_layout.py`
checks that no module outside the cache imports anything else from it. The format itself is `schema` (columns,
metadata, versions); the rest is how to find a cache (`find_cache`, `cache_dir_here`), read only files the
manifest lists with a matching checksum (`CacheReader`), and rebuild the teacher's distribution at any temperature
from the cached top-k and tail (`rebuild_log_probs`).
"""

from distill.teacher_cache.locate import cache_dir_here, find_cache, find_cache_dir, teachers_newest_first
from distill.teacher_cache.reader import CacheError, CacheReader, ShardArrays, read_shard_errors
from distill.teacher_cache.schema import COL_LABEL, SCHEMA_VERSION, CacheMeta, SchemaError, views_to_use
from distill.teacher_cache.topk import rebuild_log_probs

__all__ = [
    "COL_LABEL", "SCHEMA_VERSION", "CacheError", "CacheMeta", "CacheReader", "SchemaError", "ShardArrays",
    "cache_dir_here", "find_cache", "find_cache_dir", "read_shard_errors", "rebuild_log_probs",
    "teachers_newest_first", "views_to_use",
]
