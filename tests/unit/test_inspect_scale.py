"""`cache inspect` stays linear in the number of shards: the reader sorts its shard list once, not once per shard
(the loop indexed `reader.shards[0]`, sorting 20,000 names 20,000 times: 5.8 s at 20,000 shards)."""

import builtins

import numpy as np

import distill.teacher_cache.reader as reader_module
from distill.images.shards import file_sha256
from distill.images.views import ViewParams
from distill.teacher_cache.cache_file import write_cache_file
from distill.teacher_cache.inspect_cache import inspect_cache
from distill.teacher_cache.manifest import Manifest, ShardEntry
from distill.teacher_cache.schema import SCHEMA_VERSION, CacheMeta

N, V, K, C, SHARDS = 4, 1, 3, 10, 40


def test_inspect_sorts_the_shard_list_once(tmp_path, monkeypatch):
    d = tmp_path / "fp"
    rng = np.random.default_rng(0)
    cols = {"key": [f"k{i}" for i in range(N)], "label": [i % C for i in range(N)], "hw": [(8, 8)] * N,
            "views": [[ViewParams(0, 0, 8, 8, False)] * V for _ in range(N)],
            "ids": rng.integers(0, C, (N, V, K)), "logits": rng.normal(size=(N, V, K)) - 2.0,
            "tail": rng.normal(size=(N, V))}
    m = Manifest(fingerprint="fp", teacher={"arch": "t"})
    for i in reversed(range(SHARDS)):  # listed out of order: the reader must sort
        stem = f"s{i:03d}"
        path = d / f"{stem}.parquet"
        write_cache_file(path, cols, CacheMeta(SCHEMA_VERSION, "fp", K, V, C, {"input_size": 8}, {"arch": "t"},
                                               stem, {"seed": 0}, None))
        m.shards[stem] = ShardEntry(source=f"/x/{stem}.tar", size=1, mtime_ns=1, content_sha256="c", file=path.name,
                                    file_bytes=path.stat().st_size, file_sha256=file_sha256(path), rows=N, errors=0)
    m.save(d)
    sorts = []

    def counting_sorted(*args, **kwargs):
        sorts.append(1)
        return builtins.sorted(*args, **kwargs)

    monkeypatch.setattr(reader_module, "sorted", counting_sorted, raising=False)
    info = inspect_cache(d, verify=False)
    assert info["shards"] == SHARDS and info["rows"] == SHARDS * N
    assert info["labelled_rows"] == SHARDS * N  # every shard was summarised (from its file: no manifest numbers)
    assert len(sorts) <= 2, f"the shard list was sorted {len(sorts)} times for {SHARDS} shards"
