"""View sampling is deterministic and replay reproduces the exact crop."""

import numpy as np
import pytest
import torch
from torchvision.transforms import InterpolationMode
from torchvision.transforms.v2 import functional as F

from distill.images.views import ViewParams, ViewPolicy, eval_view, replay_view, sample_views


def _image(h=60, w=80, c=3):
    g = torch.Generator().manual_seed(1)
    return torch.randint(0, 256, (c, h, w), generator=g, dtype=torch.uint8)


def test_replay_equals_manual_crop_resize_flip():
    img = _image()
    view = ViewParams(top=5, left=11, height=30, width=40, flip=True)
    out = replay_view(img, view, 16)
    crop = img[:, 5:35, 11:51]
    manual = F.horizontal_flip(F.resize(crop, [16, 16], interpolation=InterpolationMode.BILINEAR, antialias=True))
    assert torch.equal(out, manual)
    # identity view at native size gives back the exact pixels
    same = replay_view(img, ViewParams(0, 0, 60, 80, False), (60, 80))
    assert torch.equal(same, img)


def test_views_are_deterministic_per_key_and_inside_the_image():
    policy = ViewPolicy(num_views=6, seed=3)
    a = sample_views("sample_1", 60, 80, policy)
    assert a == sample_views("sample_1", 60, 80, policy)
    assert a != sample_views("sample_2", 60, 80, policy)
    assert a != sample_views("sample_1", 60, 80, ViewPolicy(num_views=6, seed=4))
    assert a[0] == eval_view(60, 80, policy.crop_pct) and not a[0].flip
    for v in a:
        assert v.top >= 0 and v.left >= 0 and v.top + v.height <= 60 and v.left + v.width <= 80
    flips = [v.flip for key in range(50) for v in sample_views(f"k{key}", 60, 80, policy)[1:]]
    assert 0.3 < np.mean(flips) < 0.7


def test_eval_view_is_centre_square():
    v = eval_view(100, 200, 0.5)
    assert (v.height, v.width) == (50, 50)
    assert (v.top, v.left) == (25, 75)


def test_replay_refuses_an_image_of_another_size():
    with pytest.raises(ValueError, match="image changed"):
        replay_view(_image(20, 20), ViewParams(10, 10, 30, 30, False), 8)


def test_live_rotation_is_reproducible_bounded_and_real():
    """`data.train_rotate`: the angle comes from (seed, key) like a view, stays within ±degrees, moves pixels."""
    from distill.student_train.data import rotate_live

    img = torch.zeros(1, 28, 28, dtype=torch.uint8)
    img[0, 4:24, 13:15] = 255  # a vertical bar: a "1"
    a = rotate_live(img, "k1", 0, 15.0)
    assert torch.equal(a, rotate_live(img, "k1", 0, 15.0)) and a.dtype == torch.uint8 and a.shape == img.shape
    outs = [rotate_live(img, f"k{i}", 0, 15.0) for i in range(20)]
    assert sum(not torch.equal(o, img) for o in outs) >= 18  # rotated, not passed through
    assert len({o.numpy().tobytes() for o in outs}) >= 15  # different angles per key
    for o in outs:  # within ±15°: the bar's ends move at most 10 px * sin(15°) ≈ 2.6 px sideways
        cols = torch.nonzero(o[0, 4:6] > 127)[:, 1]
        assert cols.numel() and (cols.float() - 13.5).abs().max() <= 4
    far = rotate_live(img, "k1", 0, 90.0)
    assert not torch.equal(far, a)
