"""Issue 10 items 4, 5, 8 at cache time: bad samples are recorded and skipped; the shard still gets its file."""

import io

import numpy as np
import pytest
import torch
from helpers import cache_cfg_dict, encode, mnist, save_teacher, write_tar
from PIL import Image

from distill.teacher.load import LoadedTeacher, load_teacher
from distill.teacher_cache.config import CacheConfig
from distill.teacher_cache.labeler import Labeler, ShardTask

pytestmark = pytest.mark.integration


def _png(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


def _shard(path):
    x, y = mnist(6)
    good = [(f"good{i}", {"png": encode(x[i]), "cls": str(int(y[i])).encode()}) for i in range(6)]
    bad = [
        ("cls_too_big", {"png": encode(x[0]), "cls": b"10"}),  # 10 classes: ids 0..9
        ("cls_int32", {"png": encode(x[1]), "cls": b"99999999999"}),  # ArrowInvalid before: killed the shard
        ("bomb", {"png": _png(np.zeros((7000, 6000), np.uint8))}),  # 42 Mpx > the 40 Mpx default
        ("gif", {"png": _gif(x[2])}),  # not a format we accept, whatever the extension says
    ]
    return write_tar(path, good[:3] + bad + good[3:])


def _gif(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="GIF")
    return buf.getvalue()


class _NaNOnBright(torch.nn.Module):
    """A real (tiny) teacher that returns NaN logits for bright images, as a diverged checkpoint might."""

    def __init__(self, inner: torch.nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = self.inner(x)
        bright = x.flatten(1).mean(1) > 0.2
        return torch.where(bright[:, None], torch.full_like(z, float("nan")), z)


def _labeler(tmp_path, teacher=None, processes=0):
    cfg = CacheConfig.model_validate(cache_cfg_dict([str(tmp_path / "s.tar")], tmp_path / "cache",
                                                    save_teacher(tmp_path / "t.pt"), decode_processes=processes))
    return cfg, Labeler(cfg, "fp", teacher)


@pytest.mark.parametrize("processes", [0, 1])
def test_bad_labels_bombs_and_formats_are_recorded_not_cached(tmp_path, processes):
    _shard(tmp_path / "s.tar")
    cfg, lab = _labeler(tmp_path, processes=processes)
    try:
        res = lab.label_shard(ShardTask("s", tmp_path / "s.tar", tmp_path / "cache" / "fp"))
    finally:
        lab.close()
    assert res.ok, res.message
    assert res.rows == 6
    reasons = {e["key"]: e["reason"] for e in res.error_records}
    assert set(reasons) == {"cls_too_big", "cls_int32", "bomb", "gif"}
    assert "outside [0, 10)" in reasons["cls_too_big"] and "outside" in reasons["cls_int32"]
    assert "max_image_pixels" in reasons["bomb"]
    labels = pd_labels(tmp_path / "cache" / "fp" / res.file)  # s-<sha16>.parquet
    assert all(0 <= v < 10 for v in labels)


def pd_labels(path):
    import pyarrow.parquet as pq

    return pq.read_table(path, columns=["label"]).column("label").to_pylist()


def test_non_finite_teacher_logits_are_recorded_not_cached(tmp_path):
    x, y = mnist(40)
    write_tar(tmp_path / "s.tar", [(f"k{i}", {"png": encode(x[i]), "cls": str(int(y[i])).encode()})
                                   for i in range(40)])
    cfg = CacheConfig.model_validate(cache_cfg_dict([str(tmp_path / "s.tar")], tmp_path / "cache",
                                                    save_teacher(tmp_path / "t.pt"), decode_processes=0))
    real = load_teacher(cfg.teacher)
    nan_teacher = LoadedTeacher(_NaNOnBright(real.model).eval(), real.num_classes, real.preprocessing, real.info)
    lab = Labeler(cfg, "fp", nan_teacher)
    res = lab.label_shard(ShardTask("s", tmp_path / "s.tar", tmp_path / "cache" / "fp"))
    assert res.ok, res.message
    nan_keys = {e["key"] for e in res.error_records if "not finite" in e["reason"]}
    assert 0 < len(nan_keys) < 40 and res.rows == 40 - len(nan_keys)
    import pyarrow.parquet as pq

    t = pq.read_table(tmp_path / "cache" / "fp" / res.file)
    assert not nan_keys & set(t.column("key").to_pylist())
    tail = np.asarray(t.column("tail_lse").to_pylist(), dtype=np.float32)
    assert np.isfinite(tail).all()
