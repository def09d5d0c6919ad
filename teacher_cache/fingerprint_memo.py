"""Remember a teacher's fingerprint by cheap identity, so a no-op nightly refresh never loads the teacher.

Key = hash of the fingerprint-relevant config (teacher block, top-k, views, schema version) plus the size,
mtime, ctime and inode of the teacher's files (size+mtime alone is fooled by a retrained teacher copied with
`cp -p` / `rsync -t`: ctime cannot be set from user space, and a replaced file gets a new inode).
A teacher without a local file (hub `pretrained`) is never memoised, nor one whose identity is racy: taken within
a clock tick of the file's last change (or with its timestamps in the future), when a same-size rewrite in that
tick would keep size, mtime, ctime and inode (images.shards.RACY_WINDOW_NS, as for shards). The memo lives in the
cache root itself (a local directory or an object-store prefix), beside the fingerprint directories it points to;
runs of different teachers update it concurrently, through `Store.update` (no entry is lost).
"""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path

from distill.core.storage import Store, open_store
from distill.images.shards import RACY_WINDOW_NS
from distill.teacher_cache.config import CacheConfig
from distill.teacher_cache.schema import SCHEMA_VERSION

MEMO_NAME = ".fingerprints.json"


def _memo_key(cfg: CacheConfig, for_writing: bool = False) -> str | None:
    """The memo's key for this config, or None when it must not be memoised (`for_writing`: nor remembered,
    because an identity seen so soon after the file's last change proves nothing)."""
    files = [p for p in (cfg.teacher.checkpoint, cfg.teacher.scripted) if p is not None]
    if not files or cfg.teacher.pretrained:
        return None
    idents = []
    for p in files:
        try:
            st = Path(p).stat()
        except OSError:
            return None
        if for_writing and time.time_ns() - max(st.st_mtime_ns, st.st_ctime_ns) < RACY_WINDOW_NS:
            return None
        idents.append([str(Path(p).resolve()), st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino])
    payload = {"schema": SCHEMA_VERSION, "teacher": cfg.teacher.model_dump(mode="json"), "topk": cfg.topk,
               "views": cfg.views.model_dump(mode="json"), "files": idents}
    from distill.teacher_cache.fingerprint import resolve_precision

    if (precision := resolve_precision(cfg)) != "fp32":  # part of the fingerprint (fp32 keys stay as they were)
        payload["precision"] = precision
        payload["head_fp32"] = True  # heads run in fp32 since this build: older bf16 fingerprints are not recalled
    if cfg.features.enabled:  # toggling features must not recall the other cache's fingerprint
        payload["features"] = cfg.features.model_dump(mode="json")
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()


def _root(cfg: CacheConfig) -> Store:
    return open_store(cfg.cache_root, cfg.staging_dir)


def _parse(data: bytes | None) -> dict[str, str]:
    try:
        memo = json.loads(data or b"{}")
    except ValueError:
        return {}
    return memo if isinstance(memo, dict) else {}


def _load(root: Store) -> dict[str, str]:
    return _parse(root.read(MEMO_NAME))


def recall_fingerprint(cfg: CacheConfig) -> str | None:
    key = _memo_key(cfg)
    if key is None:
        return None
    root = _root(cfg)
    fp = _load(root).get(key)
    if fp is not None and not root.child(fp).exists("manifest.json"):
        return None
    return fp


def remember_fingerprint(cfg: CacheConfig, fp: str) -> None:
    key = _memo_key(cfg, for_writing=True)
    if key is None:
        return

    def add(data: bytes | None) -> bytes | None:
        memo = _parse(data)
        if memo.get(key) == fp:
            return None
        return json.dumps({**memo, key: fp}, indent=1).encode()

    _root(cfg).update(MEMO_NAME, add)
