"""The training loader reads the cache's manifest once per process, not once per shard it opens (at 20,000 shards
the manifest is ~10 MB), and reads it again when a refresh changed it."""

from __future__ import annotations

import shutil

import pytest

from distill.images.preprocessing import Preprocessing
from distill.images.shards import expand_shard_patterns, shard_stem
from distill.student_train.data import JoinedStream, ShardPair, StreamSpec
from distill.teacher_cache.manifest import Manifest
from distill.teacher_cache.reader import CacheReader

pytestmark = pytest.mark.integration


def _spec(cache_dir, shards) -> StreamSpec:
    reader = CacheReader(cache_dir)
    pairs = [ShardPair(shard_stem(p), p, reader.manifest.shards[shard_stem(p)].rows) for p in shards]
    prep = Preprocessing(16, 1.0, (0.5,), (0.5,), "bilinear", 1)
    return StreamSpec(cache_dir=cache_dir, pairs=pairs, student=prep, teacher=None, num_classes=10,
                      views=1, train=False, batch_size=32, shuffle_buffer=1, seed=0, epoch=0,
                      rank=0, world=1, loader_workers=0)


def test_the_loader_reads_the_manifest_once_per_process_and_again_after_a_change(kd_data, monkeypatch, tmp_path):
    shards = expand_shard_patterns(kd_data["train"])
    assert len(shards) == 4
    cache_dir = tmp_path / kd_data["cache_dir"].name
    shutil.copytree(kd_data["cache_dir"], cache_dir)  # its own directory: no reader of it exists in this process
    spec = _spec(cache_dir, shards)
    loads = []
    real = Manifest.read.__func__

    def counting(cls, journal, where, fingerprint=None):
        loads.append(where)
        return real(cls, journal, where, fingerprint)

    monkeypatch.setattr(Manifest, "read", classmethod(counting))
    rows = sum(len(b["label"]) for b in JoinedStream(spec))
    assert rows == sum(p.rows for p in spec.pairs)
    assert len(loads) == 1, loads  # four shards, one manifest read
    sum(len(b["label"]) for b in JoinedStream(spec))  # the next epoch: nothing changed, nothing read
    assert len(loads) == 1
    Manifest.load(cache_dir).save(cache_dir)  # a refresh rewrote the manifest: the loader must read the new one
    loads.clear()
    sum(len(b["label"]) for b in JoinedStream(spec))
    assert len(loads) == 1


def test_train_planning_takes_label_counts_from_the_manifest(kd_data, monkeypatch, tmp_path):
    """`distill train` planning opens no cache file's table for its row and label counts (20,000 files would be
    20,000 Parquet reads); it still checksums each file once (the trust rule)."""
    from conftest import train_cfg

    from distill.student_train.config import TrainConfig
    from distill.student_train.job_plan import plan_job

    tables = []
    real = CacheReader.table
    monkeypatch.setattr(CacheReader, "table", lambda self, stem, columns=None: tables.append(stem) or
                        real(self, stem, columns))
    job = plan_job(TrainConfig.model_validate(train_cfg(kd_data, tmp_path / "run")))
    assert tables == []
    m = Manifest.load(kd_data["cache_dir"])
    assert [p.labelled for p in job.train] == [m.shards[p.stem].labelled for p in job.train]
    assert all(p.labelled == p.rows == 60 for p in job.train)  # every MNIST row has its .cls
