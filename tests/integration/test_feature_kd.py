"""Feature KD end to end: cache with teacher features (schema v2) -> train beta > 0 -> plain student best.pt."""

import json

import pandas as pd
import pytest
import torch
from conftest import train_cfg
from helpers import cache_cfg_dict

from distill.core.models import create_model
from distill.student_train.config import TrainConfig
from distill.student_train.feature_kd import FeatureKDError
from distill.student_train.job_plan import plan_job
from distill.student_train.run import run as run_train
from distill.teacher_cache.config import CacheConfig
from distill.teacher_cache.inspect_cache import format_inspect, inspect_cache
from distill.teacher_cache.reader import CacheReader
from distill.teacher_cache.run import run as run_cache

pytestmark = pytest.mark.integration


def test_cache_features_then_train_beta(kd_data, tmp_path):
    import shutil

    root = kd_data["root"]
    cache_root = tmp_path / "cache"  # kd_data is shared by the session: its cache root stays as it is
    shutil.copytree(kd_data["cache_dir"], cache_root / kd_data["cache_dir"].name)
    cfg = cache_cfg_dict([str(root / "shards" / "*.tar")], str(cache_root), kd_data["teacher"]["checkpoint"],
                         features={"enabled": True, "dim": 8, "seed": 3})
    res = run_cache(CacheConfig.model_validate(cfg))
    assert res.status == "success" and res.fingerprint != kd_data["cache_dir"].name  # a different cache
    reader = CacheReader(res.cache_dir)
    a = reader.arrays(reader.shards[0])
    meta = reader.meta(reader.shards[0])
    assert meta.schema_version == 2 and meta.features["source_dim"] == 16 and meta.features["seed"] == 3
    assert a.features.shape == (60, 3, 8) and a.features.dtype.name == "float16" and a.features.any()
    info = inspect_cache(res.cache_dir, verify=False)
    assert info["bytes_per_sample_view_without_features"] < info["bytes_per_sample_view"]
    assert "gaussian projection from 16" in format_inspect(info)

    base = train_cfg(kd_data, tmp_path / "run", variants=[{"name": "feat", "beta": 1.0, "feature_loss": "cosine"},
                                                          {"name": "feat-mse", "beta": 0.5, "feature_loss": "mse"}])
    base["data"].update(fingerprint=res.fingerprint, cache_root=str(cache_root))
    # the same variants against the cache without features: refused at planning time, naming the fix
    no_feat = {**base, "data": {**base["data"], "fingerprint": kd_data["cache_dir"].name}}
    with pytest.raises(FeatureKDError, match="cache.features.enabled: true"):
        plan_job(TrainConfig.model_validate(no_feat))
    assert plan_job(TrainConfig.model_validate(base)).feature_dim == 8

    out = run_train(TrainConfig.model_validate(base))
    assert out.status == "success", out.leaderboard
    fresh = create_model("cnn_small", num_classes=10, in_chans=1, width=4)
    for name in ("feat", "feat-mse"):
        metrics = pd.read_csv(tmp_path / "run" / name / "metrics.csv")
        assert (metrics["feat_loss"] > 0).all() and (metrics["train_samples"] == 240).all()
        state = torch.load(tmp_path / "run" / name / "best.pt", weights_only=True)
        assert list(state) == list(fresh.state_dict())  # the projector is not exported
        info = json.loads((tmp_path / "run" / name / "arch.json").read_text())
        model = create_model(info["arch"], info["num_classes"], info["in_chans"], **info["arch_kwargs"])
        model.load_state_dict(state)
