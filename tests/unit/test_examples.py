"""Every shipped example config validates against the model its command loads (docs in step with the code)."""

from pathlib import Path

import pytest
import yaml

from distill.cluster.pipeline import PipelineConfig
from distill.teacher_cache.config import CacheConfig

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"


@pytest.mark.parametrize("name", sorted(p.name for p in EXAMPLES.glob("cache_*.yaml")))
def test_cache_examples_validate(name):
    cfg = CacheConfig.model_validate(yaml.safe_load((EXAMPLES / name).read_text()))
    assert cfg.shards


def test_the_s3_example_keeps_its_urls():
    cfg = CacheConfig.model_validate(yaml.safe_load((EXAMPLES / "cache_s3.yaml").read_text()))
    assert cfg.cache_root == "s3://ml-cache/teacher-cache" and cfg.shards[0].startswith("s3://datasets/")


def test_the_demo_pipeline_validates():
    assert PipelineConfig.model_validate(yaml.safe_load((EXAMPLES / "demo.yaml").read_text())).cache
