"""Config validation reports every problem at once with its field path; --set overrides; sections."""

import pytest

from distill.cluster.config_loading import ConfigError, load_config
from distill.teacher_cache.config import CacheConfig


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
    with pytest.raises(ConfigError, match="needs preprocessing.input_size, preprocessing.mean, preprocessing.std, "
                                          "preprocessing.crop_pct"):
        load_config(CacheConfig, None, ["shards=[a]", "cache_root=x", "teacher.scripted=t.pt"], "cache")
    # issue 30: mean/std/crop_pct were taken from defaults, and a foreign teacher labelled other pixels
    with pytest.raises(ConfigError, match=r"`scripted` teacher needs preprocessing\.crop_pct: "):
        load_config(CacheConfig, None, ["shards=[a]", "cache_root=x", "teacher.scripted=t.pt",
                                        "teacher.preprocessing.input_size=32", "teacher.preprocessing.mean=[0.5]",
                                        "teacher.preprocessing.std=[0.5]"], "cache")
    cfg = load_config(CacheConfig, None, ["shards=[a]", "cache_root=x", "teacher.scripted=t.pt",
                                          "teacher.preprocessing.input_size=32", "teacher.preprocessing.mean=[0.5]",
                                          "teacher.preprocessing.std=[0.5]", "teacher.preprocessing.crop_pct=1.0"],
                      "cache")
    assert cfg.teacher.preprocessing.crop_pct == 1.0


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


def test_set_indexes_into_lists_and_says_what_exists(tmp_path):
    """`--set variants.1.temperature=3` sets the second variant's field (it failed with "Input should be a valid
    list": the override turned the list into a dict keyed "1"); a bad index names the list and its length."""
    from distill.student_train.config import TrainConfig

    f = tmp_path / "train.yaml"
    f.write_text("train:\n  run_dir: r\n  data: {train_shards: [a.tar]}\n"
                 "  variants: [{name: a, mode: none}, {name: b, temperature: 2}]\n")
    cfg = load_config(TrainConfig, f, ["variants.1.temperature=3", "variants.-1.alpha=0.25", "variants.0.epochs=2"],
                      "train")
    variants = dict(cfg.expand())
    assert variants["b"].temperature == 3.0 and variants["b"].alpha == 0.25 and variants["a"].epochs == 2
    with pytest.raises(ConfigError, match=r"variants has 2 entries \(indices 0\.\.1\); 2 is out of range"):
        load_config(TrainConfig, f, ["variants.2.temperature=3"], "train")
    with pytest.raises(ConfigError, match="variants is a list; index it with a number"):
        load_config(TrainConfig, f, ["variants.b.temperature=3"], "train")
    with pytest.raises(ConfigError, match="there is no list 'grid' in the config to index"):
        load_config(TrainConfig, f, ["grid.0.lr=0.1"], "train")
