"""Names inside a store are input: checked where a manifest, a journal record or a listing is read.

Anyone who can write a cache prefix (another team on the bucket, a compromised job) writes its manifest, so a name
in it must not reach outside the directory it names a file of: ``../../.bashrc`` in a manifest entry would be
written by every machine that mirrors the cache. A name is a relative POSIX path of plain parts (no absolute
path, no ``..`` or ``.``, no backslash, no empty part, no NUL); the cache's own names are checked against the
forms its writer makes (`cache_file_name`, `errors_file_name`), and every copy checks that its destination
resolves under its root (`under`), which also catches a symlinked directory on the way.
"""

from __future__ import annotations

import re
from pathlib import Path

from distill.core.errors import InputError

_HEX16 = re.compile("[0-9a-f]{16}")  # the content-addressed part of a published name: <stem>-<sha256[:16]><suffix>


class UnsafeNameError(InputError):
    """A name read from a store (manifest, journal record, listing) could escape its directory."""


def check_part(part: str, where: str) -> str:
    """One path component: not empty, not `.`/`..`, no `/`, backslash or NUL."""
    if not isinstance(part, str) or part in ("", ".", "..") or any(c in part for c in "/\\\0"):
        raise UnsafeNameError(f"{where}: unsafe name {part!r} (a name must be one plain path part: no '/', '\\', "
                              "'..' or empty name); the cache refuses it: delete the directory (or the "
                              "offending entry) and re-run `distill cache`")
    return part


def check_name(name: str, where: str) -> str:
    """A relative POSIX path made of plain parts (see `check_part`)."""
    if not isinstance(name, str) or name.startswith("/") or not name:
        raise UnsafeNameError(f"{where}: unsafe name {name!r} (absolute or empty); the cache refuses it: delete the "
                              "directory (or the offending entry) and re-run `distill cache`")
    for part in name.split("/"):
        check_part(part, f"{where} ({name!r})")
    return name


def _form(name: str, stem: str, prefix: str, suffix: str, where: str, what: str) -> str:
    check_name(name, where)
    head, ok = prefix + stem, name.endswith(suffix)
    middle = name[len(head):len(name) - len(suffix)] if ok and name.startswith(head) else None
    hashed = middle is not None and len(middle) == 17 and middle[0] == "-" and _HEX16.fullmatch(middle[1:])
    if middle != "" and not hashed:
        raise UnsafeNameError(f"{where}: {what} {name!r} of shard {stem!r} is not a name the cache writes "
                              f"({prefix}{stem}{suffix} or {prefix}{stem}-<sha256[:16]>{suffix}); the cache refuses "
                              "it: delete the directory (or the offending entry) and re-run `distill cache`")
    return name


def cache_file_name(name: str, stem: str, where: str) -> str:
    """A cache file as this build and older ones write it: ``<stem>.parquet`` or ``<stem>-<hash16>.parquet``."""
    return _form(name, stem, "", ".parquet", where, "cache file")


def errors_file_name(name: str, stem: str, where: str) -> str:
    """An error file: ``errors/<stem>-<hash16>.jsonl`` (or ``errors/<stem>.jsonl``, older builds)."""
    return _form(name, stem, "errors/", ".jsonl", where, "error file")


def under(root: Path, name: str, where: str | None = None) -> Path:
    """``root / name`` after checking that the name is safe and that the path resolves under `root` (a symlinked
    directory on the way, e.g. ``errors -> /etc``, is refused too)."""
    check_name(name, where or str(root))
    path = Path(root) / name
    top = Path(root).resolve()
    if not path.parent.resolve().is_relative_to(top):
        raise UnsafeNameError(f"{where or root}: {name!r} resolves outside {top} (a symlink on the way?); refused")
    return path
