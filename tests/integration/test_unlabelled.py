"""A sweep over labelled shards plus an unlabelled pool, in-process: KD learns from every row, the twin from
the labelled shards only (as many passes over them as give it the distilled variant's steps), and the
leaderboard counts both kinds of rows and the Δ against the twin."""

from dataclasses import replace

import pandas as pd
import pytest
from conftest import train_cfg

from distill.student_train.config import TrainConfig
from distill.student_train.data import JoinedStream, steps_per_epoch
from distill.student_train.job_plan import plan_job
from distill.student_train.run import run
from distill.student_train.train_loop import Stream, WorkerContext, _spec

pytestmark = pytest.mark.integration


def test_sweep_with_an_unlabelled_pool_trains(kd_data, tmp_path):
    shards = kd_data["root"] / "shards"
    cfg = train_cfg(kd_data, tmp_path / "run", twins=True, variants=[{"name": "kd", "alpha": 0.5, "temperature": 2}])
    cfg["data"].update(train_shards=[str(shards / "train-000000.tar")],
                       unlabelled_shards=[str(shards / "train-00000[1-3].tar")])
    tc = TrainConfig.model_validate(cfg)
    job = plan_job(tc)
    assert job.interleave_shards == 4  # the default beside a pool; without one, 1 (one shard after another)
    plain = dict(cfg, data={**cfg["data"], "unlabelled_shards": []})
    assert plan_job(TrainConfig.model_validate(plain)).interleave_shards == 1
    pool = [p for p in job.train if p.unlabelled]
    assert len(pool) == 3 and all(p.labelled == 0 for p in pool)
    # the pool's shards carry .cls files, yet their rows reach the loss unlabelled
    spec = _spec(job, Stream(tc.expand()[0][1], 1, 1, 0), pool[:1], 0, True, WorkerContext())
    labels = [int(x) for b in JoinedStream(spec) for x in b["label"]]
    assert len(labels) == 60 and set(labels) == {-1}
    # training reads its slot's shards 4 at a time, rows mixed: the labelled shard's rows are spread over the
    # epoch's batches instead of one block, and the loader yields exactly the planned step count
    kd_v = tc.expand()[0][1]
    blocks = {}
    for k in (1, 4):
        mixed_job = replace(job, interleave_shards=k)
        batches = list(JoinedStream(_spec(mixed_job, Stream(kd_v, 1, 1, 0), job.train, 0, True, WorkerContext())))
        assert len(batches) == steps_per_epoch(job.train, 0, kd_v.seed, 1, 0, kd_v.batch_size, True, k)
        assert sum(len(b["label"]) for b in batches) == 240
        blocks[k] = sum(bool((b["label"] >= 0).any()) for b in batches)
    assert blocks[4] > blocks[1] == -(-60 // kd_v.batch_size)
    # the twin's epoch = 4 passes over its 60 labelled rows (240 rows / 60), each pass the order and the views
    # of one plain epoch: epoch 1 of the twin is plain epochs 4..7
    twin_v = tc.expand()[0][1].model_copy(update={"mode": "none"})
    own = [p for p in job.train if not p.unlabelled]
    passes = JoinedStream(_spec(job, Stream(twin_v, 4, job.num_views, 0), own, 1, True, WorkerContext()))
    one = Stream(twin_v, 1, job.num_views, 0)
    plain = [JoinedStream(_spec(job, one, own, e, True, WorkerContext())) for e in range(4, 8)]

    def rows(stream):  # (label, the replayed view's pixel sum) per row: same order and same view, or not equal
        return [(int(lab), round(float(px.sum()), 2)) for b in stream
                for lab, px in zip(b["label"], b["pixels"], strict=True)]

    got, want = rows(passes), [r for s in plain for r in rows(s)]
    assert len(got) == 240 and got == want and all(lab >= 0 for lab, _ in got)
    assert got[:60] != rows(JoinedStream(_spec(job, one, own, 1, True, WorkerContext())))

    res = run(tc)
    assert res.status == "success", res.leaderboard
    board = {r["variant"]: r for r in res.leaderboard}
    assert set(board) == {"kd", "cnn_small-noKD"}
    kd, twin = board["kd"], board["cnn_small-noKD"]
    assert (kd["labelled_samples"], kd["unlabelled_samples"]) == (60, 180)
    assert (twin["labelled_samples"], twin["unlabelled_samples"]) == (240, 0)  # 4 passes: equal steps
    assert kd["twin"] == "cnn_small-noKD" and kd["delta_top1_vs_twin"] == pytest.approx(
        100 * (kd["val_top1"] - twin["val_top1"]))
    assert pd.read_csv(tmp_path / "run" / "kd" / "metrics.csv")["train_samples"].tolist() == [240]
    assert pd.read_csv(tmp_path / "run" / "cnn_small-noKD" / "metrics.csv")["train_samples"].tolist() == [240]
    text = (tmp_path / "run" / "leaderboard.txt").read_text()
    assert text.startswith("distilled student vs its undistilled twin") and "kd" in text.splitlines()[1]


def test_pool_overlapping_train_shards_is_refused(kd_data, tmp_path):
    cfg = train_cfg(kd_data, tmp_path / "run")
    cfg["data"]["unlabelled_shards"] = [str(kd_data["root"] / "shards" / "train-000001.tar")]
    with pytest.raises(ValueError, match="in both data.train_shards and data.unlabelled_shards"):
        plan_job(TrainConfig.model_validate(cfg))
