"""The stages from Python (README, "Python API"): config objects or dicts in, result objects out, and inside a
process that already runs Ray (a user's own Ray job) the stages use that Ray and leave it running."""

from __future__ import annotations

import pytest
import ray

from distill import api
from distill.core.config import StrictConfig

pytestmark = pytest.mark.integration


def test_stages_from_python_inside_a_users_ray_job(tmp_path, monkeypatch, ray_local):
    monkeypatch.chdir(tmp_path)
    made = api.shards({"source": "digits", "out_dir": "shards", "samples_per_shard": 40, "limit": 100})
    assert made.samples == 100 and len(made.train) == 3 and isinstance(made.train_pattern, str)
    from helpers import save_teacher

    teacher = save_teacher(tmp_path / "t.pt", width=4)
    cfg = api.CacheConfig(shards=[made.train_pattern, made.val_pattern], cache_root="cache", topk=3,
                          views={"num_views": 2}, progress=False, metrics={"enabled": False},
                          teacher={"arch": "resnet_mini", "arch_kwargs": {"width": 4}, "checkpoint": str(teacher),
                                   "preprocessing": {"input_size": 16, "mean": [0.5], "std": [0.25], "channels": 1}},
                          ray={"num_actors": 1, "cpus_per_actor": 0.5})
    assert isinstance(cfg, StrictConfig)
    assert ray.is_initialized()  # this process's own Ray (the session's), as in a user's Ray job
    session = ray.get_runtime_context().get_job_id()
    res = api.cache(cfg)
    assert res.status == "success" and sorted(res.labelled) == ["train-000000", "train-000001", "train-000002",
                                                               "val-000000"]
    assert ray.is_initialized() and ray.get_runtime_context().get_job_id() == session  # the user's Ray, kept
    again = api.cache(cfg.model_dump())  # a dict is validated as the CLI validates YAML
    assert again.labelled == [] and again.fingerprint == res.fingerprint
    with pytest.raises(ValueError, match="topk"):
        api.cache({**cfg.model_dump(), "topk": 0})
