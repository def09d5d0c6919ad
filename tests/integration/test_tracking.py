"""Every sweep in MLflow (core/tracking.py, student_train/tracking.py): a parent run, a child run per student and
twin with its params, tags and per-epoch metrics, artifacts at the end; a re-run continues the same runs; a store
that cannot be reached costs a warning, never the work."""

from __future__ import annotations

import logging

import pytest
from conftest import train_cfg
from mlflow.tracking import MlflowClient

from distill.student_train.config import TrainConfig
from distill.student_train.run import run

pytestmark = pytest.mark.integration


def _runs(uri: str) -> dict[str, object]:
    client = MlflowClient(uri)
    exp = client.get_experiment_by_name("distill")
    return {r.info.run_name: r for r in client.search_runs([exp.experiment_id])}


def test_a_sweep_is_a_parent_run_with_a_child_per_student_and_twin(kd_data, tmp_path):
    d = train_cfg(kd_data, tmp_path / "students", twins=True, variants=[{"name": "kd", "alpha": 0.5,
                                                                         "temperature": 2.0}])
    d["base"]["epochs"] = 2
    res = run(TrainConfig.model_validate(d))
    assert res.status == "success"
    uri = f"sqlite:///{tmp_path / 'mlruns' / 'mlflow.db'}"  # the default store: beside the run's output
    runs = _runs(uri)
    assert set(runs) == {"train students", "kd", "cnn_small-noKD"}
    parent, kd, twin = runs["train students"], runs["kd"], runs["cnn_small-noKD"]
    assert kd.data.tags["mlflow.parentRunId"] == parent.info.run_id == twin.data.tags["mlflow.parentRunId"]
    assert kd.data.tags["distill.twin"] == "cnn_small-noKD" and twin.data.tags["distill.twin_of"] == "kd"
    assert kd.data.params["alpha"] == "0.5" and kd.data.params["loss"] == "0.5*kd(temperature=2) + 0.5*ce"
    assert kd.data.tags["distill.cache_fingerprint"] == kd_data["cache_dir"].name
    client = MlflowClient(uri)
    history = client.get_metric_history(kd.info.run_id, "val_top1")
    assert [m.step for m in history] == [1, 2]  # one point per epoch, logged by the worker
    assert {m.key for m in client.get_metric_history(kd.info.run_id, "kd_loss")} == {"kd_loss"}
    assert kd.info.status == "FINISHED" and parent.info.status == "FINISHED"
    row = next(r for r in res.leaderboard if r["variant"] == "kd")
    assert kd.data.metrics["delta_top1_vs_twin"] == pytest.approx(row["delta_top1_vs_twin"])
    assert kd.data.metrics["best_val_top1"] == pytest.approx(row["val_top1"])
    artifacts = {a.path for a in client.list_artifacts(parent.info.run_id)}
    assert {"leaderboard.txt", "leaderboard.parquet", "curves.png"} <= artifacts
    assert (tmp_path / "students" / "curves.png").exists()

    again = run(TrainConfig.model_validate(d))  # nothing to train: the same runs are continued, none added
    assert again.status == "success"
    after = _runs(uri)
    assert set(after) == set(runs) and after["kd"].info.run_id == kd.info.run_id


def test_an_unreachable_store_is_a_warning_and_disabled_tracking_writes_nothing(kd_data, tmp_path, caplog):
    d = train_cfg(kd_data, tmp_path / "a", tracking={"uri": "http://127.0.0.1:9"})  # nothing listens on port 9
    with caplog.at_level(logging.WARNING, logger="distill.core.tracking"):
        assert run(TrainConfig.model_validate(d)).status == "success"
    assert "experiment tracking off for this run" in caplog.text
    off = train_cfg(kd_data, tmp_path / "b", tracking={"enabled": False})
    assert run(TrainConfig.model_validate(off)).status == "success"
    assert not (tmp_path / "mlruns").exists()


def test_the_cache_pass_is_a_run_with_its_rate_and_the_teachers_accuracy(kd_data):
    runs = _runs(f"sqlite:///{kd_data['root'] / 'mlruns' / 'mlflow.db'}")  # the session's cache pass (conftest)
    cache = runs[f"cache {kd_data['cache_dir'].name}"]
    assert cache.data.tags["distill.stage"] == "cache" and cache.info.status == "FINISHED"
    assert cache.data.metrics["images"] == 280 and cache.data.metrics["shards_labelled"] == 5
    assert 0 <= cache.data.metrics["teacher_top1_on_labelled"] <= 1 and cache.data.metrics["images_per_s"] > 0


def test_a_pipeline_level_tracking_block_reaches_every_stage():
    from distill.cluster.pipeline import PipelineConfig

    d = {"cache": {"shards": ["s/*.tar"], "cache_root": "c", "teacher": {"arch": "mlp", "checkpoint": "t.pt"}},
         "train": {"run_dir": "r", "data": {"train_shards": ["s/*.tar"]}, "tracking": {"experiment": "own"}},
         "tracking": {"uri": "http://127.0.0.1:5000", "experiment": "nightly"}}
    cfg = PipelineConfig.model_validate(d)
    assert cfg.cache.tracking.uri == "http://127.0.0.1:5000" and cfg.cache.tracking.experiment == "nightly"
    assert cfg.train.tracking.experiment == "own" and cfg.train.tracking.uri is None  # a stage's own block wins
