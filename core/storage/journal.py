"""Journal records on disk: one line per record, framed so that a torn record is recognised and ignored.

A line is ``<json>\\t<crc32 of the json, 8 hex digits>\\n``. JSON text never contains a raw tab (json.dumps
escapes control characters), so the last tab splits a line unambiguously. A record counts only if its line is
complete (ends with a newline) and its checksum matches; the first record that does not is where the journal
ends, and nothing after it is read (a crash can only tear the end: records are appended one after another).
"""

from __future__ import annotations

import json
import zlib
from typing import Any

GENERATION_KEY = "journal_generation"


def encode_record(record: dict[str, Any]) -> bytes:
    text = json.dumps(record, separators=(",", ":"), sort_keys=True)
    return f"{text}\t{zlib.crc32(text.encode()):08x}\n".encode()


def decode_records(data: bytes) -> tuple[list[dict[str, Any]], int]:
    """(the complete, intact records from the start, bytes they span); a torn tail is left out."""
    out: list[dict[str, Any]] = []
    pos = 0
    while pos < len(data):
        end = data.find(b"\n", pos)
        if end < 0:
            break  # the last line was cut before its newline
        line = data[pos:end]
        text, tab, crc = line.rpartition(b"\t")
        if not tab or len(crc) != 8:
            break
        try:
            if int(crc, 16) != zlib.crc32(text):
                break
            record = json.loads(text)
        except ValueError:
            break
        if not isinstance(record, dict):
            break
        out.append(record)
        pos = end + 1
    return out, pos


def split_generation(snapshot: dict[str, Any] | None) -> tuple[dict[str, Any] | None, int]:
    """The snapshot without the layer's key, and its journal generation (0 for files written before journals)."""
    if snapshot is None:
        return None, 0
    snapshot = dict(snapshot)
    generation = snapshot.pop(GENERATION_KEY, 0)
    return snapshot, int(generation) if isinstance(generation, int) else 0


def with_generation(snapshot: dict[str, Any], generation: int) -> bytes:
    """The snapshot's bytes as written (readable by readers that know nothing of journals)."""
    return json.dumps({**snapshot, GENERATION_KEY: generation}, indent=1).encode()


def should_compact(pending: int, snapshot_entries: int, floor: int = 1000) -> bool:
    """Compact when the journal holds as many records as the snapshot has entries (and at least `floor`):
    each compaction then costs at most ~2 entry writes per record appended since the last one, so the
    manifest costs O(1) per shard however many shards there are, and the journal a reader replays stays
    no longer than the snapshot."""
    return pending >= max(floor, snapshot_entries)
