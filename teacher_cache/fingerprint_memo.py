"""Remember a teacher's fingerprint by cheap identity, so a no-op nightly refresh never loads the teacher.

Key = hash of the fingerprint-relevant config (teacher block, top-k, views, schema version) plus the size,
mtime, ctime and inode of the teacher's files (size+mtime alone is fooled by a retrained teacher copied with
`cp -p` / `rsync -t`: ctime cannot be set from user space, and a replaced file gets a new inode).
A teacher without a local file (hub `pretrained`) is never memoised. The memo lives in the cache root itself
(a local directory or an object-store prefix), beside the fingerprint directories it points to.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from distill.core.storage import Store, open_store
from distill.teacher_cache.config import CacheConfig
from distill.teacher_cache.schema import SCHEMA_VERSION

MEMO_NAME = ".fingerprints.json"


def _memo_key(cfg: CacheConfig) -> str | None:
    files = [p for p in (cfg.teacher.checkpoint, cfg.teacher.scripted) if p is not None]
    if not files or cfg.teacher.pretrained:
        return None
    idents = []
    for p in files:
        try:
            st = Path(p).stat()
        except OSError:
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


def _load(root: Store) -> dict[str, str]:
    try:
        memo = json.loads(root.read(MEMO_NAME) or b"{}")
    except ValueError:
        return {}
    return memo if isinstance(memo, dict) else {}


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
    key = _memo_key(cfg)
    if key is None:
        return
    root = _root(cfg)
    memo = _load(root)
    if memo.get(key) != fp:
        memo[key] = fp
        root.write(MEMO_NAME, json.dumps(memo, indent=1).encode())
