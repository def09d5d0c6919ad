"""Which cache directory a reader opens: the named or newest fingerprint under a local root, or a verified local
mirror of an object-store root (see teacher_cache/remote_cache.py)."""

from __future__ import annotations

from pathlib import Path

from core.object_store import is_url
from teacher_cache.reader import CacheError
from teacher_cache.remote_cache import mirror


def find_cache_dir(cache_root: Path | str, fingerprint: str | None = None) -> Path:
    """The fingerprint directory to read: the named one, or the only / most recently written one.

    An ``s3://`` root is mirrored to a local directory first (only manifest-listed files, checksums verified).
    """
    if is_url(cache_root):
        try:
            return mirror(str(cache_root), fingerprint)
        except OSError as exc:
            raise CacheError(str(exc)) from exc
    root = Path(cache_root)
    if fingerprint:
        d = root / fingerprint
        if not (d / "manifest.json").exists():
            raise CacheError(f"{d}: no cache for fingerprint {fingerprint}; run `distill cache` with that teacher")
        return d
    if (root / "manifest.json").exists():
        return root
    dirs = sorted((p for p in root.glob("*/manifest.json")), key=lambda p: p.stat().st_mtime)
    if not dirs:
        raise CacheError(f"{root}: no cache found; run `distill cache` first")
    return dirs[-1].parent
