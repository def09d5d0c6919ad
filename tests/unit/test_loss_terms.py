"""Loss terms as an extension point: a loss is a weighted sum of registered terms; a mode is a recipe of terms; a new
term is one registered function (here: DKD against a dense reference, and a term registered by the test itself)."""

import pytest
import torch
import torch.nn.functional as F

from distill.student_train import losses
from distill.student_train.epoch_losses import EpochLosses
from distill.student_train.losses import Loss, create_loss, make_term, register_term
from distill.student_train.twins import add_twins
from distill.student_train.variant import VariantConfig
from distill.teacher_cache.topk import pack_topk, rebuild_log_probs


def _batch(n=12, c=10, t=4.0, seed=0, k=None):
    g = torch.Generator().manual_seed(seed)
    teacher, student = torch.randn(n, c, generator=g) * 3, torch.randn(n, c, generator=g) * 2
    label = torch.randint(0, c, (n,), generator=g)
    label[::3] = -1  # unlabelled rows: DKD's target is then the teacher's top-1
    ids, vals, tail = pack_topk(teacher, k or c)
    logp = rebuild_log_probs(ids.to(torch.int16), vals.half(), tail, c, t)
    batch = {"label": label, "weight": torch.ones(n), "teacher_top1": ids[:, 0], "teacher_logp": {t: logp}}
    return teacher, student, batch


def test_explicit_terms_equal_the_mode_recipe_they_spell_out():
    _, student, batch = _batch(t=2.0)
    by_mode = create_loss("soft", 0.7, 2.0)(student, batch)
    by_terms = create_loss(terms={"kd": {"weight": 0.7, "temperature": 2.0}, "ce": {"weight": 0.3}})(student, batch)
    assert set(by_mode) == set(by_terms) == set(losses.loss_parts())
    for part in by_mode:
        assert torch.equal(by_mode[part], by_terms[part]), part
    assert create_loss("soft", 0.7, 2.0).describe() == "0.7*kd(temperature=2) + 0.3*ce"


def test_dkd_term_against_a_dense_reference():
    """DKD (Zhao et al. 2022) from the full teacher logits, written out directly from the paper's definitions."""
    t, a, b = 4.0, 1.0, 8.0
    teacher, student, batch = _batch(t=t)
    out = create_loss(terms={"dkd": {"weight": 1.0, "temperature": t, "alpha": a, "beta": b}})(student, batch)
    target = torch.where(batch["label"] >= 0, batch["label"], teacher.argmax(1))
    pt, ps = F.softmax(teacher / t, 1), F.softmax(student / t, 1)
    ref = []
    for i in range(len(target)):
        g = int(target[i])
        bt, bs = torch.tensor([pt[i, g], 1 - pt[i, g]]), torch.tensor([ps[i, g], 1 - ps[i, g]])
        tckd = (bt * (bt / bs).log()).sum()
        keep = torch.arange(teacher.shape[1]) != g
        qt, qs = pt[i, keep] / pt[i, keep].sum(), ps[i, keep] / ps[i, keep].sum()
        nckd = (qt * (qt / qs).log()).sum()
        ref.append(a * tckd + b * nckd)
    ref = torch.stack(ref).mean() * t * t
    assert torch.allclose(out["loss"], ref, rtol=2e-3, atol=1e-4) and torch.equal(out["kd_loss"], out["loss"])


def test_a_new_term_is_one_registered_function(monkeypatch):
    monkeypatch.setattr(losses, "TERMS", dict(losses.TERMS))  # registered for this test only

    @register_term("margin", needs=("teacher_top1",))
    def margin(logits, batch, gap: float = 1.0):
        top = logits.gather(1, batch["teacher_top1"][:, None]).squeeze(1)
        other = logits.masked_fill(F.one_hot(batch["teacher_top1"], logits.shape[1]).bool(), -1e9).amax(1)
        return (gap - (top - other)).clamp_min(0).mean()

    _, student, batch = _batch()
    v = VariantConfig(name="m", mode="soft", loss={"margin": {"weight": 0.5, "gap": 2.0}, "ce": {"weight": 0.5}})
    loss = v.make_loss()
    out = loss(student, batch)
    assert "margin_loss" in out and losses.loss_parts()[-1] == "margin_loss"  # the part comes from the term
    assert torch.allclose(out["loss"], 0.5 * out["margin_loss"] + 0.5 * out["task_loss"])
    assert out["kd_loss"].item() == 0.0  # a part the loss does not use is reported as 0
    assert loss.needs == {"teacher_top1", "label"} and loss.temperatures == []


def test_terms_own_their_temperature_and_the_teacher_is_rebuilt_at_each():
    loss = create_loss(terms={"kd": {"weight": 0.5, "temperature": 2.0}, "dkd": {"weight": 0.5, "temperature": 4}})
    assert loss.temperatures == [2.0, 4.0]
    assert create_loss("hard", 0.5, 9.0).temperatures == []  # hard KD reads no distribution: T is unused


def test_bad_terms_are_named_with_the_valid_ones():
    with pytest.raises(ValueError, match=r"unknown loss term 'dkd2'; valid: \['ce', 'dkd', 'feat', 'hard_kd', 'kd'"):
        make_term("dkd2", 1.0)
    with pytest.raises(ValueError, match=r"loss term 'kd' has no parameter \['tau'\]; it takes \['temperature'\]"):
        make_term("kd", 1.0, tau=2.0)
    with pytest.raises(ValueError, match="needs a `weight`"):
        create_loss(terms={"ce": {}})
    with pytest.raises(ValueError, match=r"need a teacher: set mode soft/hard/online"):
        VariantConfig(mode="none", loss={"kd": {"weight": 1.0}})


def test_explicit_terms_get_a_twin_and_feed_the_epoch_means():
    v = VariantConfig(name="dkd", arch="cnn_small", loss={"dkd": {"weight": 1.0}, "ce": {"weight": 1.0}})
    names = dict(add_twins([("dkd", v)]))
    assert names["cnn_small-noKD"].mode == "none" and names["cnn_small-noKD"].loss is None
    _, student, batch = _batch()
    acc = EpochLosses(torch.device("cpu"))
    out = v.make_loss()(student, batch)
    acc.add(out, batch)
    means = acc.means()
    assert means["kd_loss"] == pytest.approx(float(out["kd_loss"])) and means["train_samples"] == 12
    assert means["task_loss"] == pytest.approx(float(out["task_loss"]))  # over the 8 labelled rows only


def test_loss_objects_have_only_weighted_terms():
    assert [t.spec.name for t in Loss([make_term("kd", 1.0), make_term("ce", 0.0)]).terms] == ["kd"]
