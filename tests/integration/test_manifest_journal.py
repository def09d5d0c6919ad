"""`distill cache` killed mid-journal: a torn last record is never read as a shard, and the next run folds the
journal into the snapshot and labels exactly what is missing.

The run is held by its last shard, a FIFO that nobody writes to, so the kill lands after the other shards' records
(no timing involved); then the last record is cut in half, as a machine crash mid-append would leave it.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest
import yaml
from helpers import cache_cfg_dict, mnist_shard, save_teacher, shards_in_manifest

from distill.core.storage.journal import decode_records
from distill.images.shards import ShardReader
from distill.teacher_cache.manifest import Manifest
from distill.teacher_cache.reader import CacheError, CacheReader

pytestmark = pytest.mark.integration
DISTILL = [sys.executable, "-c", "from distill.cluster.cli import main; main()"]


def test_a_run_killed_mid_journal_lists_only_whole_records_and_the_rerun_labels_each_key_once(tmp_path):
    shards = [mnist_shard(tmp_path / "in" / f"train-{i:06d}.tar", 20, offset=20 * i) for i in range(4)]
    fifo = tmp_path / "in" / "train-000004.tar"
    os.mkfifo(fifo)  # the run blocks reading it: the kill comes after the four records, whatever the speed
    cfg = cache_cfg_dict([str(tmp_path / "in" / "*.tar")], str(tmp_path / "cache"), save_teacher(tmp_path / "t.pt"),
                         decode_processes=0)
    f = tmp_path / "cache.yaml"
    f.write_text(yaml.safe_dump(cfg))
    proc = subprocess.Popen([*DISTILL, "cache", "-c", str(f), "--no-ray"], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 300
    while shards_in_manifest(tmp_path / "cache") < 4:
        assert proc.poll() is None and time.monotonic() < deadline, "the run ended before its last shard"
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    (cache_dir,) = [p.parent for p in (tmp_path / "cache").glob("*/manifest.json")]
    (journal,) = cache_dir.glob("manifest.*.journal")  # killed: never compacted
    data = journal.read_bytes()
    records, _ = decode_records(data)
    torn = records[-1]["shard"]
    last = data.rstrip(b"\n").rfind(b"\n") + 1
    journal.write_bytes(data[:last + (len(data) - last) // 2])  # the last record cut in half

    reader = CacheReader(cache_dir)
    assert reader.shards == sorted(r["shard"] for r in records[:-1]) and torn not in reader.shards
    assert (cache_dir / records[-1]["entry"]["file"]).exists()  # its file was renamed into place before its record
    with pytest.raises(CacheError, match=f"'{torn}' has no complete cache file"):
        reader.arrays(torn)

    fifo.unlink()
    shards.append(mnist_shard(fifo, 20, offset=80))
    again = subprocess.run([*DISTILL, "cache", "-c", str(f), "--no-ray"], capture_output=True, text=True,
                           timeout=600)
    assert again.returncode == 0, (again.stdout + again.stderr)[-3000:]
    assert not list(cache_dir.glob("manifest.*.journal"))  # folded into the snapshot
    m = Manifest.load(cache_dir)
    assert sorted(m.shards) == [f"train-{i:06d}" for i in range(5)]
    reader = CacheReader(cache_dir)
    keys = [k for s in reader.shards for k in reader.arrays(s).keys]
    assert sorted(keys) == sorted(s.key for p in shards for s in ShardReader(p)) and len(keys) == len(set(keys))
