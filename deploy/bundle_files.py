"""A bundle on disk: written into a fresh version directory, swapped in with one atomic link, verified on load.

Why versions and a link: rewriting `runs/demo/bundle/` file by file means a server starting (or a replica
restarting) half-way through a deploy loads a new int8 model with the old classes, or a truncated file. Each
deploy writes `<bundle>.versions/<id>/` completely (every file fsynced, `bundle.json` with their SHA-256 last),
then moves the link `<bundle>` to it in one rename: readers see the old bundle or the new one. `<bundle>` stays
the path users pass to `distill serve --bundle`. Serve checks every file against `bundle.json` before it loads
anything, so a damaged or hand-edited bundle is refused with the file's name instead of served. A server pins the
version it serves (`pin`: a shared flock on the version's `.in-use` for as long as it lives, as cache readers hold
theirs: core/storage/versions.py), and a deploy never removes a version a server holds, whatever `keep` says; it
goes with the first deploy after the last server on it stopped.

This module imports nothing heavy: the Serve replicas use it.
"""

from __future__ import annotations

import json
import logging
import math
import shutil
import time
from pathlib import Path
from typing import Any

from distill.core.atomic_io import atomic_symlink, atomic_write, file_sha256
from distill.core.errors import InputError
from distill.core.storage.versions import hold, remove_unless_held

log = logging.getLogger(__name__)
MANIFEST = "bundle.json"


class BundleError(InputError):
    """A bundle that must not be served: a file missing, damaged, or not listed in bundle.json."""


def versions_dir(bundle: Path) -> Path:
    return bundle.parent / f"{bundle.name}.versions"


def new_version(bundle: Path) -> Path:
    """An empty, uniquely named directory for the next version of `bundle` (same filesystem as the link)."""
    root = versions_dir(bundle)
    root.mkdir(parents=True, exist_ok=True)
    now = time.time_ns()
    stamp = time.strftime("%Y%m%dT%H%M%S", time.gmtime(now / 1e9)) + f".{now // 1000 % 1_000_000:06d}"
    n = 0
    while True:  # names sort in creation order; mkdir is the claim, so two deploys never share one
        path = root / f"{stamp}-{n:02d}"
        try:
            path.mkdir()
            return path
        except FileExistsError:
            n += 1


def write_file(path: Path, content: bytes | str | Path) -> None:
    """Durably write one bundle file: bytes/text, or a copy of the file at `content` (a Path)."""
    if isinstance(content, Path):
        source = content

        def copy(tmp: Path) -> None:
            shutil.copyfile(source, tmp)

        atomic_write(path, copy)
    else:
        atomic_write(path, content)


def strict_json(value: Any) -> Any:
    """`value` with every non-finite float (NaN, inf: "not measured") as None, so the text is strict JSON that
    any parser reads (json.dumps writes NaN otherwise, which JSON does not have)."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: strict_json(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [strict_json(v) for v in value]
    return value


def agreement_text(value: float | None) -> str:
    """An int8-vs-fp32 agreement for the model card: None (or an older bundle's NaN) when there is no int8 model."""
    return "n/a (no int8 model)" if value is None or not math.isfinite(value) else f"{value:.4f}"


def seal(version: Path, meta: dict) -> dict:
    """Write bundle.json last: `meta` plus the SHA-256 of every other file in the version directory. Strict JSON
    (null where a value was not measured); readers still accept the NaN that bundles before this wrote."""
    files = {f.name: file_sha256(f) for f in sorted(version.iterdir()) if f.is_file() and f.name != MANIFEST}
    manifest = strict_json({**meta, "files": files})
    atomic_write(version / MANIFEST, json.dumps(manifest, indent=1, allow_nan=False))
    return manifest


def publish(bundle: Path, version: Path, keep: int = 3) -> None:
    """Point the link `bundle` at `version` atomically; of the versions older than it, keep the `keep` - 1 newest
    sealed ones and remove the rest (unsealed ones were left by a killed deploy). Newer ones are never touched:
    they may be another deploy's, still being written.

    A pre-versioning bundle (a real directory at `bundle`) is removed first: that one switch is not atomic.
    """
    bundle = Path(bundle)
    if bundle.is_dir() and not bundle.is_symlink():
        log.warning("%s is a bundle directory from before versioned bundles; replacing it with a link to %s",
                    bundle, version)
        shutil.rmtree(bundle)
    atomic_symlink(bundle, str(version.relative_to(bundle.parent)))
    older = sorted((p for p in versions_dir(bundle).iterdir() if p.is_dir() and p.name < version.name),
                   reverse=True)
    sealed = [p for p in older if (p / MANIFEST).exists()]
    for stale in sealed[max(keep - 1, 0):] + [p for p in older if p not in sealed]:
        if not remove_unless_held(stale):
            log.info("kept bundle version %s beyond deploy.keep_versions: a server still serves it", stale)


def pin(bundle: Path) -> tuple[Path, dict]:
    """Verify `bundle` (see `verify`) and hold its version for this process's lifetime, so no deploy removes it
    while this process serves it. A version directory this process may not write is served unpinned."""
    root, manifest = verify(bundle)
    try:
        hold(root)
    except OSError as exc:
        log.warning("%s: cannot pin this bundle version (%s); a later deploy may remove it while it is served",
                    root, exc.strerror or exc)
    return root, manifest


def verify(bundle: Path) -> tuple[Path, dict]:
    """Resolve `bundle` to its version directory and check every listed file's SHA-256; returns (dir, manifest).

    Raises BundleError naming the file when one is missing or its checksum differs, and when bundle.json itself
    is missing or unreadable.
    """
    root = Path(bundle).resolve()
    how = "re-run `distill deploy` to write a complete bundle"
    manifest_path = root / MANIFEST
    if not manifest_path.exists():
        raise BundleError(f"{manifest_path} missing: not a bundle written by `distill deploy` (or an incomplete "
                          f"one); {how}")
    try:
        manifest = json.loads(manifest_path.read_text())
        files = dict(manifest["files"])
    except (ValueError, KeyError, TypeError) as exc:
        raise BundleError(f"{manifest_path} is not a valid bundle manifest ({exc}); {how}") from exc
    for name, digest in files.items():
        path = root / name
        if not path.is_file():
            raise BundleError(f"{path} is listed in {MANIFEST} but missing; {how}")
        got = file_sha256(path)
        if got != digest:
            raise BundleError(f"{path}: SHA-256 {got[:16]}... does not match {MANIFEST} ({digest[:16]}...): the file "
                              f"is damaged or was changed after deploy; {how}")
    return root, manifest
