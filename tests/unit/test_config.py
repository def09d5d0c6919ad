"""Config validation reports every problem at once with its field path; --set overrides; sections."""

import pytest

from cluster.config_loading import ConfigError, load_config
from teacher_cache.config import CacheConfig


def test_every_problem_reported_with_its_path(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("cache_root: x\nteacher: {arch: resnet_mini, checkpoint: t.pt}\ntopk: 0\nbatchsize: 3\n"
                 "views: {num_views: 0}\n")
    with pytest.raises(ConfigError) as exc:
        load_config(CacheConfig, f, [], "cache")
    msg = str(exc.value)
    assert "cache.shards: required field is missing" in msg
    assert "cache.topk:" in msg and "greater than or equal to 1" in msg
    assert "cache.batchsize: unknown field" in msg
    assert "cache.views.num_views:" in msg
    assert msg.startswith("4 problem(s)")


def test_teacher_source_rules():
    with pytest.raises(ConfigError, match="exactly one of `arch`"):
        load_config(CacheConfig, None, ["shards=[a]", "cache_root=x", "teacher.checkpoint=t.pt"], "cache")
    with pytest.raises(ConfigError, match="needs `checkpoint"):
        load_config(CacheConfig, None, ["shards=[a]", "cache_root=x", "teacher.arch=resnet18"], "cache")
    with pytest.raises(ConfigError, match="needs `preprocessing.input_size`"):
        load_config(CacheConfig, None, ["shards=[a]", "cache_root=x", "teacher.scripted=t.pt"], "cache")


def test_section_and_overrides(tmp_path):
    f = tmp_path / "pipeline.yaml"
    f.write_text("shards: {source: mnist, out_dir: s}\ncache:\n  shards: [a.tar]\n  cache_root: c\n"
                 "  teacher: {arch: resnet_mini, checkpoint: t.pt}\n")
    cfg = load_config(CacheConfig, f, ["topk=3", "ray.num_actors=4", "teacher.arch_kwargs.width=8",
                                       "views.scale=[0.5, 1.0]"], "cache")
    assert cfg.topk == 3 and cfg.ray.num_actors == 4 and cfg.teacher.arch_kwargs == {"width": 8}
    assert cfg.views.scale == (0.5, 1.0) and cfg.shards == ["a.tar"]
    with pytest.raises(ConfigError, match="expected KEY.PATH=VALUE"):
        load_config(CacheConfig, f, ["topk"], "cache")


def test_missing_config_file(tmp_path):
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(CacheConfig, tmp_path / "nope.yaml", [], "cache")
