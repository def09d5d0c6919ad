"""Teacher feature extraction (last-Linear hook) and the seeded projection that shrinks it."""

import numpy as np
import pytest
import torch
from torch import nn

from distill.core.models import create_model
from distill.teacher.hooks import FeatureError, check_features, last_linear
from distill.teacher_cache.config import CacheConfig
from distill.teacher_cache.features import FeatureExtractor, projection_matrix, seeded_normal


def test_seeded_normal_is_pinned_across_machines():
    """The exact stream is part of the cache contract: a matrix rebuilt anywhere from the seed is the same."""
    np.testing.assert_allclose(seeded_normal(0, 5), [-0.455219, 0.77565297, -0.98206182, -0.20231649, 0.67052145],
                               rtol=0, atol=1e-7)
    np.testing.assert_allclose(seeded_normal(7, 3), [-2.0740146, -0.10528575, 0.99305703], rtol=0, atol=1e-7)
    assert not np.allclose(seeded_normal(1, 5), seeded_normal(0, 5))
    x = seeded_normal(3, 100_000)  # a standard normal: moments of a correct Box-Muller, not a speed claim
    assert abs(x.mean()) < 0.02 and abs(x.std() - 1) < 0.02


@pytest.mark.parametrize("kind", ["gaussian", "orthogonal"])
def test_projection_deterministic_from_seed(kind):
    a, b = projection_matrix(64, 8, 3, kind), projection_matrix(64, 8, 3, kind)
    assert a.shape == (64, 8) and a.dtype == np.float32
    np.testing.assert_array_equal(a, b)
    assert not np.allclose(a, projection_matrix(64, 8, 4, kind))
    if kind == "orthogonal":
        np.testing.assert_allclose(a.T @ a, np.eye(8), atol=1e-5)
    else:
        np.testing.assert_allclose(a, seeded_normal(3, 64 * 8).reshape(64, 8) / np.sqrt(8), atol=1e-7)


def test_projection_dim_checked():
    with pytest.raises(FeatureError, match="between 1 and the teacher's feature size 16"):
        projection_matrix(16, 32, 0)
    with pytest.raises(FeatureError, match="features.dim 99 is larger than the teacher's penultimate size 64"):
        check_features(create_model("cnn_small", 10, 1, width=16), 99)


@pytest.mark.parametrize("arch", ["cnn_small", "resnet_mini", "mobilenet_mini", "mlp", "timm:resnet18",
                                  "torchvision:resnet18"])
def test_hook_gives_the_classifier_input(arch):
    chans = 3 if arch.startswith("torchvision") else 1
    kwargs = {"input_size": 32} if arch == "mlp" else {}
    model = create_model(arch, num_classes=10, in_chans=chans, **kwargs).eval()
    name, linear = last_linear(model)
    x = torch.randn(2, chans, 32, 32)
    ext = FeatureExtractor(model, None, 0)
    with torch.no_grad():
        logits, feats = ext.forward(x)
        ref = model(x)
    assert feats.shape == (2, linear.in_features) and ext.spec.projection == "none"
    torch.testing.assert_close(logits, ref)
    torch.testing.assert_close(linear(feats), ref, rtol=1e-4, atol=1e-4)  # it really is the last Linear's input


def test_projected_features_match_the_matrix():
    model = create_model("cnn_small", 10, 1, width=4).eval()
    raw = FeatureExtractor(model, None, 0)
    x = torch.randn(3, 1, 16, 16)
    with torch.no_grad():
        full = raw.forward(x)[1]
        raw.hook.remove()
        proj = FeatureExtractor(model, 5, 11, "orthogonal")
        small = proj.forward(x)[1]
    want = full @ torch.from_numpy(projection_matrix(16, 5, 11, "orthogonal"))
    torch.testing.assert_close(small, want)
    assert proj.spec.as_dict()["source_dim"] == 16 and proj.spec.as_dict()["projection"] == "orthogonal"


def test_scripted_teacher_is_refused_clearly(tmp_path):
    scripted = torch.jit.script(nn.Sequential(nn.Flatten(), nn.Linear(4, 2)))
    with pytest.raises(FeatureError, match="needs an nn.Module teacher"):
        last_linear(scripted)
    with pytest.raises(FeatureError, match="no nn.Linear classifier"):
        last_linear(nn.Sequential(nn.Conv2d(1, 2, 1)))
    with pytest.raises(ValueError, match="features.enabled needs an nn.Module teacher"):
        CacheConfig.model_validate({"shards": ["x.tar"], "cache_root": str(tmp_path),
                                    "teacher": {"scripted": "t.pt", "preprocessing": {"input_size": 8, "mean": [0.5],
                                                                                  "std": [0.5], "crop_pct": 1.0}},
                                    "features": {"enabled": True}})


def test_fingerprint_unchanged_without_features_and_distinct_with_them(tmp_path):
    import hashlib
    import json

    from distill.images.preprocessing import Preprocessing
    from distill.teacher.load import LoadedTeacher
    from distill.teacher_cache.fingerprint import fingerprint, view_policy

    prep = Preprocessing(32, 1.0, (0.1,), (0.3,), "bilinear", 1)
    teacher = LoadedTeacher(model=nn.Identity(), num_classes=10, preprocessing=prep,
                            info={"source": "arch", "arch": "resnet_mini", "weights_sha256": "ab", "num_classes": 10,
                                  "arch_kwargs": {}})
    base = {"shards": ["x.tar"], "cache_root": str(tmp_path), "teacher": {"arch": "resnet_mini", "pretrained": True}}
    plain = CacheConfig.model_validate(base)
    # what a schema-v1 build hashed: existing caches keep their directory after the upgrade
    v1_payload = {"schema_version": 1, "teacher": {"source": "arch", "arch": "resnet_mini", "weights_sha256": "ab",
                                                   "num_classes": 10, "arch_kwargs": {}},
                  "preprocessing": prep.as_dict(), "topk": plain.topk, "views": view_policy(plain, prep).as_dict()}
    want = hashlib.sha256(json.dumps(v1_payload, sort_keys=True).encode()).hexdigest()[:16]
    assert fingerprint(teacher, plain) == want
    with_f = fingerprint(teacher, CacheConfig.model_validate({**base, "features": {"enabled": True}}))
    with_d = fingerprint(teacher, CacheConfig.model_validate({**base, "features": {"enabled": True, "dim": 8}}))
    assert len({fingerprint(teacher, plain), with_f, with_d}) == 3
