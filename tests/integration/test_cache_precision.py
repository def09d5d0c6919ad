"""Issue 21 items 10 and 11 on real digits: the file records how it was labelled, and bf16 (CPU autocast here;
the same autocast path as CUDA) no longer coarsens the soft labels through the classifier head."""

import pytest
import torch
import yaml
from helpers import cache_cfg_dict, mnist_shard, save_teacher
from torch import nn

from distill.images.preprocessing import Preprocessing
from distill.images.shards import ShardReader
from distill.teacher.load import LoadedTeacher, load_teacher
from distill.teacher_cache.config import CacheConfig
from distill.teacher_cache.fingerprint import fingerprint
from distill.teacher_cache.labeler import Labeler
from distill.teacher_cache.reader import CacheReader
from distill.teacher_cache.run import run

pytestmark = pytest.mark.integration


def _head_only_teacher() -> LoadedTeacher:
    """All of its compute is the head (1,000 classes, logits of std ~4, like a real ImageNet head's): any error
    in the cached top-k is the head's."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(32 * 32, 1000)).eval()
    with torch.no_grad():
        model[1].weight.mul_(40.0)
    prep = Preprocessing(32, 1.0, (0.13,), (0.31,), "bilinear", 1)
    return LoadedTeacher(model, 1000, prep, {"source": "arch", "arch": "head", "weights_sha256": "0",
                                             "num_classes": 1000, "arch_kwargs": {}})


def test_bf16_labels_keep_the_heads_fp32_logits(tmp_path):
    shard = mnist_shard(tmp_path / "s.tar", 48)
    teacher = _head_only_teacher()
    labellers = {}
    for precision in ("fp32", "bf16"):
        cfg = CacheConfig.model_validate(cache_cfg_dict([str(shard)], tmp_path / "c", tmp_path / "unused.pt",
                                                        precision=precision, device="cpu", decode_processes=0,
                                                        topk=10, views={"num_views": 2}))
        labellers[precision] = Labeler(cfg, "fp", teacher)
    batch = next(labellers["fp32"]._batches(ShardReader(shard), [], "s"))
    ids32, vals32, tail32, _, _ = labellers["fp32"]._teacher_step(batch)
    ids16, vals16, tail16, _, _ = labellers["bf16"]._teacher_step(batch)
    assert labellers["bf16"].head_precision == "fp32"
    assert torch.equal(ids32, ids16)  # the same top-k set in every row
    torch.testing.assert_close(vals16, vals32, rtol=0, atol=1e-4)
    torch.testing.assert_close(tail16, tail32, rtol=0, atol=1e-4)


def test_cache_file_records_precision_head_and_decode_backend(tmp_path):
    mnist_shard(tmp_path / "in" / "s0.tar", 12)
    ckpt = save_teacher(tmp_path / "t.pt")
    for precision, cache in (("auto", "c_auto"), ("bf16", "c_bf16")):
        cfg = CacheConfig.model_validate(cache_cfg_dict([str(tmp_path / "in" / "*.tar")], tmp_path / cache, ckpt,
                                                        precision=precision, device="cpu"))
        res = run(cfg)
        assert res.status == "success"
        meta = CacheReader(res.cache_dir).meta("s0")
        want = "fp32" if precision == "auto" else "bf16"
        assert (meta.precision, meta.head_precision, meta.decode_backend) == (want, "fp32", "cpu")
        resolved = yaml.safe_load((res.cache_dir / "cache_config.resolved.yaml").read_text())
        assert (resolved["precision"], resolved["device"], resolved["decode_backend"]) == (want, "cpu", "cpu")
        assert res.fingerprint == fingerprint(load_teacher(cfg.teacher), cfg.model_copy(update={"precision": want}))
