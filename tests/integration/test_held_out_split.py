"""The held-out test split: every student and twin is scored once on it from its best.pt (chosen on val), the
leaderboard reports it beside val, the twin verdict is made on it, and nothing selects on it. Real MNIST shards,
a real cache, real DeepSpeed training in-process."""

import csv
import json

import pytest
import torch
from helpers import cache_cfg_dict, mnist_shard, save_teacher

from distill.core.atomic_io import file_sha256
from distill.images.preprocessing import Preprocessing
from distill.student_train.config import TrainConfig
from distill.student_train.data import JoinedStream, ShardPair, StreamSpec
from distill.student_train.job_plan import plan_job
from distill.student_train.run import run
from distill.student_train.test_split import load_best
from distill.teacher_cache.config import CacheConfig
from distill.teacher_cache.run import run as run_cache

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def split_data(tmp_path_factory):
    root = tmp_path_factory.mktemp("split")
    shards = root / "shards"
    for i in range(2):
        mnist_shard(shards / f"train-{i:06d}.tar", 60, offset=60 * i)
    mnist_shard(shards / "val-000000.tar", 40, offset=1000)
    mnist_shard(shards / "test-000000.tar", 40, offset=2000)
    cfg = cache_cfg_dict([str(shards / "*.tar")], root / "cache", save_teacher(root / "teacher.pt"))
    assert run_cache(CacheConfig.model_validate(cfg)).status == "success"
    return {"shards": shards, "cache_root": root / "cache", "teacher": cfg["teacher"]}


def _cfg(d, run_dir, **data):
    s = d["shards"]
    return TrainConfig.model_validate({
        "run_dir": str(run_dir), "teacher": d["teacher"], "ray": {"enabled": False}, "metrics_port": None,
        "log_every": 50, "twins": True,
        "data": {"train_shards": [str(s / "train-*.tar")], "val_shards": [str(s / "val-*.tar")],
                 "test_shards": [str(s / "test-*.tar")], "cache_root": str(d["cache_root"]), "loader_workers": 0,
                 "shuffle_buffer": 16, **data},
        "base": {"arch": "cnn_small", "arch_kwargs": {"width": 4}, "epochs": 3, "batch_size": 32, "lr": 0.01,
                 "mode": "soft", "alpha": 0.5},
        "variants": [{"name": "kd"}]})


def _plain_test_top1(variant_dir, shard, prep):
    """best.pt on the raw test tar through the cache-less loader (the live evaluation view, no cache join)."""
    model = load_best(variant_dir)
    spec = StreamSpec(cache_dir=None, pairs=[ShardPair("test-000000", shard, 40)], student=prep, teacher=None,
                      num_classes=10, views=1, train=False, batch_size=16, shuffle_buffer=1, seed=0, epoch=0, rank=0,
                      world=1, loader_workers=0)
    right = n = 0
    with torch.no_grad():
        for b in JoinedStream(spec):
            right += int((model(b["pixels"]).argmax(1) == b["label"]).sum())
            n += len(b["label"])
    return right / n, n


def test_students_and_twins_are_scored_on_test_from_their_val_chosen_best_pt(split_data, tmp_path):
    cfg = _cfg(split_data, tmp_path / "run")
    res = run(cfg)
    rows = {r["variant"]: r for r in res.leaderboard}
    assert set(rows) == {"kd", "cnn_small-noKD"} and all(r["status"] == "done" for r in rows.values())
    prep = Preprocessing.from_dict(split_data["teacher"]["preprocessing"] | {"crop_pct": 0.875,
                                                                            "interpolation": "bilinear"})
    for name, r in rows.items():
        out = tmp_path / "run" / name
        scored = json.loads((out / "test.json").read_text())
        assert scored["best_sha256"] == file_sha256(out / "best.pt")  # the best.pt it scored, no other
        with open(out / "metrics.csv") as f:
            val = [float(m["val_top1"]) for m in csv.DictReader(f)]
        assert scored["best_epoch"] == 1 + val.index(max(val)) and scored["best_by"] == "val_top1"  # chosen on val
        assert (r["test_top1"], r["test_samples"]) == (scored["test_top1"], 40)
        assert r["val_top1"] == max(val)  # val: the best epoch, the selection split
        # the same number from the raw test tar without the cache: the score is best.pt on the test images
        assert _plain_test_top1(out, split_data["shards"] / "test-000000.tar", prep) == (r["test_top1"], 40)
    kd, twin = rows["kd"], rows["cnn_small-noKD"]
    assert kd["compared_on"] == "test"
    assert kd["delta_top1_vs_twin"] == round(100 * (kd["test_top1"] - twin["test_top1"]), 4)
    assert res.teacher_test_top1 is not None and res.teacher_test_top1[1] == 40
    text = (tmp_path / "run" / "leaderboard.txt").read_text()
    assert "held-out test split" in text and "test top-1 on 40 labelled test images" in text
    assert res.best()["variant"] == max(rows.values(), key=lambda r: r["val_top1"])["variant"]  # chosen on val

    # a re-run trains nothing and scores nothing again; a best.pt that changed is scored again
    stamps = {n: (tmp_path / "run" / n / "test.json").stat().st_mtime_ns for n in rows}
    run(cfg)
    assert {n: (tmp_path / "run" / n / "test.json").stat().st_mtime_ns for n in rows} == stamps
    best = tmp_path / "run" / "kd" / "best.pt"
    state = torch.load(best, weights_only=True)
    torch.save({k: (v * 0 if v.is_floating_point() else v) for k, v in state.items()}, best)
    again = {r["variant"]: r for r in run(cfg).leaderboard}
    assert json.loads((best.parent / "test.json").read_text())["best_sha256"] == file_sha256(best)
    assert again["cnn_small-noKD"]["test_top1"] == twin["test_top1"]


def test_a_test_shard_that_also_trains_or_selects_is_refused_before_training(split_data, tmp_path):
    s = split_data["shards"]
    with pytest.raises(ValueError, match="test split must be held out"):
        plan_job(_cfg(split_data, tmp_path / "r", test_shards=[str(s / "val-*.tar")]))
    with pytest.raises(ValueError, match="data.test_shards and data.train_shards"):
        plan_job(_cfg(split_data, tmp_path / "r", test_shards=[str(s / "train-000001.tar")]))
    assert not (tmp_path / "r").exists()
