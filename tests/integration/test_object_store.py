"""Shards and the cache in object storage, against a real S3 API server on 127.0.0.1 (moto's server, started and
stopped by the fixture): label, no-op refresh with 0 shard-object reads (counted at the server), a changed object,
a killed run, a refresh holding the lock against two others. Where a run must be caught in the middle, the server
holds back the body of one shard object (a gate the test releases), never a moment picked by the machine's speed.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from dataclasses import asdict

import pytest
import yaml
from helpers import S3_ROOT, S3_SHARDS, cache_cfg_dict, mnist_shard, s3_cache_cfg, upload_mnist_shards

from distill.core import object_store
from distill.core.storage import open_store
from distill.images.shards import ShardReader
from distill.teacher_cache.config import CacheConfig
from distill.teacher_cache.locate import find_cache_dir
from distill.teacher_cache.manifest import CacheLockedError, Manifest
from distill.teacher_cache.reader import CacheReader
from distill.teacher_cache.run import run

pytestmark = pytest.mark.integration
DISTILL = [sys.executable, "-c", "from distill.cluster.cli import main; main()"]
SHARDS, ROOT = S3_SHARDS, S3_ROOT


@pytest.fixture()
def s3(s3):
    """The S3 server of conftest.py; these tests use its request log only."""
    return s3[1]


def _upload_shards(tmp_path, n: int, per_shard: int = 24, offset: int = 0) -> list:
    return upload_mnist_shards(tmp_path, n, per_shard, offset)


def _cfg(tmp_path, staging: str = "staging", **over) -> CacheConfig:
    return s3_cache_cfg(tmp_path, staging, **over)


def _remote_manifest(fp: str) -> dict:
    """The manifest as readers see it (snapshot + journal), in the snapshot's JSON shape."""
    m = Manifest.load(open_store(f"{ROOT}/{fp}"))
    return {"shards": {k: asdict(v) for k, v in m.shards.items()} if m is not None else {}}


def _raw_manifest(fp: str) -> dict:
    return json.loads(object_store.get_bytes(f"{ROOT}/{fp}/manifest.json"))


def _parquet_objects(fp: str) -> set[str]:
    return {u.rsplit("/", 1)[-1] for u in object_store.list_dir(f"{ROOT}/{fp}") if u.endswith(".parquet")}


def test_label_then_noop_refresh_reads_no_shard_object_then_a_changed_object_is_relabelled(tmp_path, s3):
    local = _upload_shards(tmp_path, 4)
    cfg = _cfg(tmp_path)
    first = run(cfg)
    assert first.status == "success" and sorted(first.labelled) == [f"train-{i:06d}" for i in range(4)]
    assert first.cache_url == f"{ROOT}/{first.fingerprint}"
    m = _remote_manifest(first.fingerprint)
    names = {e["file"] for e in m["shards"].values()}
    assert all(n.startswith(s) and n.endswith(".parquet") and len(n) > len(s) + 9 for s, n in
               ((s, e["file"]) for s, e in m["shards"].items()))  # <stem>-<sha16>.parquet: content-addressed
    assert _parquet_objects(first.fingerprint) == names  # every listed file is there, nothing else
    assert object_store.get_bytes(f"{ROOT}/{first.fingerprint}/.lock") is None  # released
    assert m["shards"]["train-000000"]["etag"]  # identity from the store's listing

    reader = CacheReader(find_cache_dir(ROOT), verify=True)  # a verified local mirror
    keys = sorted(k for s in reader.shards for k in reader.arrays(s).keys)
    assert keys == sorted(s.key for p in local for s in ShardReader(p))

    s3.reset()
    again = run(cfg)
    assert again.labelled == [] and sorted(again.unchanged) == sorted(m["shards"])
    assert s3.object_reads("shards") == 0, s3.keys  # the no-op refresh read no shard object (counted at the server)
    assert s3.object_reads("cache", f"root/{first.fingerprint}/train-") == 0  # nor any cache file

    time.sleep(1.1)  # last-modified has 1 s resolution: the replaced object must differ in ETag anyway
    changed = mnist_shard(tmp_path / "local2" / "train-000001.tar", 24, offset=900)
    object_store.put_file(changed, f"{SHARDS}/train-000001.tar")
    third = run(cfg)
    assert third.changed == ["train-000001"] and third.labelled == ["train-000001"]
    m3 = _remote_manifest(first.fingerprint)
    assert m3["shards"]["train-000001"]["file"] != m["shards"]["train-000001"]["file"]
    run(cfg)  # the next run removes the replaced file: nothing but what the manifest lists stays
    assert _parquet_objects(first.fingerprint) == {e["file"] for e in m3["shards"].values()}
    reader = CacheReader(find_cache_dir(ROOT), verify=True)
    assert sorted(reader.arrays("train-000001").keys) == sorted(s.key for s in ShardReader(changed))


def test_conditional_put_lets_exactly_one_of_many_racers_create_the_lock(s3):
    wins: list[str] = []
    start = threading.Barrier(8)

    def racer(i: int) -> None:
        start.wait()
        if object_store.put_if_absent("s3://cache/race/.lock", f"owner {i}".encode()) is not None:
            wins.append(str(i))

    threads = [threading.Thread(target=racer, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(wins) == 1, wins
    assert object_store.get_bytes("s3://cache/race/.lock") == f"owner {wins[0]}".encode()


def _write(tmp_path, name: str, cfg: CacheConfig) -> str:
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(cfg.model_dump(mode="json")))
    return str(path)


def _cli(tmp_path, name: str, cfg: CacheConfig, command: tuple[str, ...] = ("cache",)) -> subprocess.Popen:
    return subprocess.Popen([*DISTILL, *command, "-c", _write(tmp_path, name, cfg), "--no-ray"], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, env=dict(os.environ))


def _wait_for(event: threading.Event, proc: subprocess.Popen, what: str) -> None:
    """Until the server saw what the test waits for, while the job runs (the timeout only catches a hang)."""
    deadline = time.monotonic() + 600
    while not event.wait(0.1):
        assert proc.poll() is None, f"the job ended before {what}:\n{proc.communicate()[0][-3000:]}"
        assert time.monotonic() < deadline, f"timed out waiting for {what}"


def test_a_refresh_holding_the_lock_refuses_both_commands_then_labels_everything(tmp_path, s3):
    _upload_shards(tmp_path, 6)
    # the first job holds the lock while it reads the last shard, whose body the server holds back; two more
    # machines (each its own staging directory: only the lock object in the store keeps them apart) meet it
    gate = s3.hold("shards/train/train-000005.tar")
    holder = _cli(tmp_path, "holder", _cfg(tmp_path, staging="staging0"))
    try:
        _wait_for(gate.reached, holder, "the holder to read its last shard")
        refused = [_cli(tmp_path, f"job{i}", _cfg(tmp_path, staging=f"staging{i}"), cmd)
                   for i, cmd in ((1, ("cache",)), (2, ("cache", "refresh")))]
        outs = [p.communicate(timeout=600)[0] for p in refused]
    finally:
        gate.release()
    out = holder.communicate(timeout=600)[0]
    assert holder.returncode == 0, out[-3000:]
    for p, o in zip(refused, outs, strict=True):  # `distill cache` and `distill cache refresh` both exit 5
        assert p.returncode == 5, o[-1500:]
        assert "is being written by another job" in o and "lease until" in o, o[-1500:]
    assert re.search(r'"labelled": 6', out), out[-1500:]  # the holder labelled every shard, nobody else any
    cache_dir = find_cache_dir(ROOT)
    assert len(CacheReader(cache_dir).shards) == 6


def test_killed_run_keeps_what_the_manifest_lists_and_the_next_run_breaks_the_expired_lock(tmp_path, s3):
    local = _upload_shards(tmp_path, 8, per_shard=40)
    cfg = _cfg(tmp_path, lock_lease_s=30.0)
    gate = s3.hold("shards/train/train-000007.tar")  # the run waits inside its last shard until it is killed
    proc = _cli(tmp_path, "killed", cfg)
    try:
        _wait_for(gate.reached, proc, "the run to read its last shard")
        fp = object_store.filesystem().glob(f"{ROOT}/*/manifest.json")[0].rsplit("/", 2)[-2]
        cfg2 = _cfg(tmp_path, staging="staging-elsewhere", lock_lease_s=30.0)  # resumed on another machine
        with pytest.raises(CacheLockedError, match="is being written by another job"):
            run(cfg2)  # the lease is honoured while its holder lives (it renews it while it waits)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.communicate()
        gate.release()
    kept = _remote_manifest(fp)["shards"]
    assert 2 <= len(kept) < 8
    assert object_store.get_bytes(f"{ROOT}/{fp}/.lock") is not None  # a SIGKILL releases nothing

    resumed = run(cfg2, wait_for_lock=True)  # waits for the dead holder's lease to run out, then breaks the lock
    assert resumed.status == "success"
    assert sorted(resumed.labelled) == sorted(set(f"train-{i:06d}" for i in range(8)) - set(kept))
    m = _remote_manifest(fp)
    assert {k: m["shards"][k]["file"] for k in kept} == {k: e["file"] for k, e in kept.items()}  # kept as they were
    assert _parquet_objects(fp) == {e["file"] for e in m["shards"].values()}  # orphans of the killed run removed
    reader = CacheReader(find_cache_dir(ROOT), verify=True)
    keys = [k for s in reader.shards for k in reader.arrays(s).keys]
    assert sorted(keys) == sorted(s.key for p in local for s in ShardReader(p)) and len(set(keys)) == len(keys)


def test_training_reads_shards_and_cache_from_object_storage(tmp_path, s3):
    """`distill train` with both shard lists and the cache root as s3:// URLs: the driver checks the shards
    against the mirrored manifest, and the loader worker process streams the tars from the store."""
    import pandas as pd
    from conftest import train_cfg

    from distill.student_train.config import TrainConfig
    from distill.student_train.run import run as run_train

    local = _upload_shards(tmp_path, 2, per_shard=48)
    val = mnist_shard(tmp_path / "local" / "val-000000.tar", 32, offset=2000)
    object_store.put_file(val, f"{SHARDS}/{val.name}")
    cfg = _cfg(tmp_path)
    cfg.shards = [f"{SHARDS}/*.tar"]
    assert run(cfg).status == "success"
    data = {"train": [f"{SHARDS}/train-*.tar"], "val": [f"{SHARDS}/val-*.tar"], "cache_root": ROOT,
            "teacher": cache_cfg_dict([], ROOT, tmp_path / "t.pt")["teacher"]}
    d = train_cfg(data, tmp_path / "run", variants=[{"name": "kd", "mode": "soft"}])
    d["data"]["loader_workers"] = 1  # a forked worker process opens the shard objects itself
    out = run_train(TrainConfig.model_validate(d))
    assert out.status == "success", out.leaderboard
    metrics = pd.read_csv(tmp_path / "run" / "kd" / "metrics.csv")
    assert (metrics["train_samples"] == sum(1 for p in local for _ in ShardReader(p))).all()
    assert s3.object_reads("shards", "train/train-") > 0  # it did read the shards from the store

    # a worker on a node without the driver's mirror makes its own, verified, from the store
    from distill.student_train.data import _cache_dir_here

    driver_mirror = find_cache_dir(ROOT)
    os.environ["DISTILL_MIRROR_DIR"] = str(tmp_path / "other-node")
    here = _cache_dir_here(tmp_path / "gone" / driver_mirror.name, f"{ROOT}/{driver_mirror.parent.name}")
    assert here.is_relative_to(tmp_path / "other-node") and here.name == driver_mirror.name
    assert CacheReader(here, verify=True).shards == CacheReader(driver_mirror).shards


def test_ray_actors_upload_their_cache_files_themselves(tmp_path, s3):
    """Through the CLI with its embedded Ray: the actor that labels a shard puts the cache file in the store (the
    driver never holds it), and the driver's manifest names exactly those objects."""
    _upload_shards(tmp_path, 3)
    cfg = _cfg(tmp_path, ray={"enabled": True, "num_actors": 1, "cpus_per_actor": 1.0})
    done = subprocess.run([*DISTILL, "cache", "-c", _write(tmp_path, "ray", cfg)], capture_output=True, text=True,
                          timeout=600, env=dict(os.environ))
    assert done.returncode == 0, (done.stdout + done.stderr)[-3000:]
    fp = object_store.filesystem().glob(f"{ROOT}/*/manifest.json")[0].rsplit("/", 2)[-2]
    m = _remote_manifest(fp)
    assert len(m["shards"]) == 3 and _parquet_objects(fp) == {e["file"] for e in m["shards"].values()}
    assert not list((tmp_path / "staging" / fp).glob("*.parquet"))  # uploaded, not left in staging


def test_a_reader_whose_file_was_replaced_mid_copy_reads_the_new_manifest(tmp_path, s3, monkeypatch):
    """A refresh relabels a shard (new content-addressed name, old one deleted) while a reader mirrors: the reader
    finds the old name gone, reads the manifest again, and copies the new file, checksum-verified."""
    _upload_shards(tmp_path, 2)
    first = run(_cfg(tmp_path))
    fp = first.fingerprint
    old = _raw_manifest(fp)
    gone = old["shards"]["train-000001"]["file"]
    stale = json.loads(json.dumps(old))
    stale["shards"]["train-000001"]["file"] = "train-000001-0000000000000000.parquet"  # a name since deleted
    object_store.put_bytes(f"{ROOT}/{fp}/manifest.json", json.dumps(stale).encode())
    real_get = object_store.get_bytes

    def get_bytes(url: str) -> bytes | None:
        data = real_get(url)
        if url.endswith("0000000000000000.parquet"):  # the refresh finishes right now: the current manifest is back
            object_store.put_bytes(f"{ROOT}/{fp}/manifest.json", json.dumps(old).encode())
        return data

    monkeypatch.setattr(object_store, "get_bytes", get_bytes)
    reader = CacheReader(find_cache_dir(ROOT, fp), verify=True)
    assert (reader.directory / gone).exists() and reader.shards == sorted(old["shards"])
