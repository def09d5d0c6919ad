"""Feature KD: the feature loss against a direct reference, and the projector that never leaves training."""

import math

import pytest
import torch

from distill.core.models import create_model
from distill.student_train.config import VariantConfig
from distill.student_train.feature_kd import FeatureKDError, StudentWithProjector, plain_student_state, wrap_student
from distill.student_train.losses import create_loss, feature_distance


def _batch(n=4, c=5, d=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    return {"label": torch.tensor([0, 1, -1, 2][:n]),
            "teacher_logp": {4.0: torch.log_softmax(torch.randn(n, c, generator=g), 1)},  # at each term's T
            "teacher_top1": torch.zeros(n, dtype=torch.int64), "weight": torch.tensor([1.0, 1.0, 1.0, 0.0][:n]),
            "student_feat": torch.randn(n, d, generator=g), "teacher_feat": torch.randn(n, d, generator=g)}


def _dot(a, b):
    return sum(x * y for x, y in zip(a, b, strict=True))


def test_feature_loss_matches_a_direct_reference():
    b = _batch()
    s, t, w = b["student_feat"].tolist(), b["teacher_feat"].tolist(), b["weight"].tolist()
    cos = [1 - _dot(si, ti) / math.sqrt(_dot(si, si) * _dot(ti, ti)) for si, ti in zip(s, t, strict=True)]
    mse = [_dot([a - c for a, c in zip(si, ti, strict=True)], [a - c for a, c in zip(si, ti, strict=True)]) / len(si)
           for si, ti in zip(s, t, strict=True)]
    ref = {"cosine": _dot(cos, w) / sum(w), "mse": _dot(mse, w) / sum(w)}  # weight 0 rows (padding) count nothing
    for kind in ("cosine", "mse"):
        per = feature_distance(b["student_feat"], b["teacher_feat"], kind)
        assert per.shape == (4,)
        base = create_loss("soft", 0.9, 4.0)(torch.randn(4, 5), b)
        torch.manual_seed(0)
        logits = torch.randn(4, 5)
        plain = create_loss("soft", 0.9, 4.0)(logits, b)
        out = create_loss("soft", 0.9, 4.0, beta=2.5, feature_loss=kind)(logits, b)
        assert set(out) == {"loss", "kd_loss", "task_loss", "feat_loss"} and set(base) == set(out)
        assert out["feat_loss"].item() == pytest.approx(ref[kind], rel=1e-5)
        assert out["loss"].item() == pytest.approx(plain["loss"].item() + 2.5 * ref[kind], rel=1e-5)
        assert plain["feat_loss"].item() == 0.0  # beta 0: the term is reported as zero and not added


def test_feature_loss_trains_the_projector_only_through_weighted_rows():
    b = _batch()
    proj = torch.nn.Linear(3, 3)
    b["student_feat"] = proj(torch.randn(4, 3))
    out = create_loss("hard", 1.0, 1.0, beta=1.0, feature_loss="cosine")(torch.randn(4, 5, requires_grad=True), b)
    out["loss"].backward()
    assert proj.weight.grad is not None and proj.weight.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="unknown feature_loss 'l1'"):
        create_loss("soft", beta=1.0, feature_loss="l1")


def test_projector_is_dropped_from_the_exported_student():
    torch.manual_seed(0)
    student = create_model("cnn_small", num_classes=10, in_chans=1, width=4)
    fresh = create_model("cnn_small", num_classes=10, in_chans=1, width=4)
    wrapped = wrap_student(student, True, 7, "v")
    assert isinstance(wrapped, StudentWithProjector) and wrapped.projector.weight.shape == (7, 16)
    x = torch.randn(2, 1, 16, 16)
    logits, proj = wrapped(x, with_features=True)
    assert proj.shape == (2, 7)
    torch.testing.assert_close(wrapped.eval()(x), student(x))  # evaluation sees the plain student
    state = plain_student_state(wrapped.state_dict())
    assert list(state) == list(fresh.state_dict())
    fresh.load_state_dict(state)  # strict: no projector key left, none missing
    assert plain_student_state(fresh.state_dict()).keys() == fresh.state_dict().keys()
    assert wrap_student(student, False, None, "v") is student
    with pytest.raises(FeatureKDError, match="cache.features.enabled: true"):
        wrap_student(student, True, None, "v")


def test_variant_fields():
    v = VariantConfig(beta=0.5, feature_loss="mse")
    assert v.beta == 0.5 and VariantConfig().beta == 0.0 and VariantConfig().feature_loss == "cosine"
    with pytest.raises(ValueError, match="beta > 0 \\(feature KD\\) needs the teacher cache"):
        VariantConfig(mode="none", beta=0.1)
    with pytest.raises(ValueError):
        VariantConfig(feature_loss="l1")
