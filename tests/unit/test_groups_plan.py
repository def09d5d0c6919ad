"""Planning groups (which students share a data stream) and ASHA's rule per student, without training."""

from __future__ import annotations

import random
from pathlib import Path

import pytest

from distill.images.preprocessing import Preprocessing
from distill.student_train.asha import asha_decisions, decide, milestones
from distill.student_train.config import TrainConfig
from distill.student_train.data import ShardPair
from distill.student_train.groups import format_plan, plan_groups
from distill.student_train.job import AshaRule, JobSpec
from distill.student_train.variant import VariantConfig


def _job(pool: bool) -> JobSpec:
    train = [ShardPair("train-0", Path("train-0.tar"), 100, labelled=100)]
    if pool:
        train += [ShardPair(f"pool-{i}", Path(f"pool-{i}.tar"), 100, labelled=0, unlabelled=True) for i in range(9)]
    return JobSpec(run_dir=Path("run"), cache_dir=Path("cache"), train=train, val=[], num_classes=10, num_views=4,
                   teacher_prep=Preprocessing(28, 1.0, (0.1,), (0.3,), "bilinear", 1))


def _variants(**kw) -> list[tuple[str, VariantConfig]]:
    cfg = TrainConfig.model_validate({"run_dir": "run", "data": {"train_shards": ["x"]}, "twins": True,
                                      "base": {"arch": "cnn_small", "epochs": 3}, **kw})
    return cfg.expand()


def test_an_alpha_temperature_lr_sweep_is_one_group():
    variants = _variants(grid={"alpha": [0.5, 0.9], "temperature": [2.0, 4.0], "lr": [1e-3, 4e-3]}, twins=False)
    groups = plan_groups(variants, _job(pool=False))
    assert [len(g.members) for g in groups] == [8]
    assert [len(g.members) for g in plan_groups(variants, _job(pool=False), fuse=3)] == [3, 3, 2]
    assert [len(g.members) for g in plan_groups(variants, _job(pool=False), fuse="off")] == [1] * 8
    # horizontal fusion: auto fuses on CUDA only (measured not to pay on the CPU); on = always
    assert plan_groups(variants, _job(False), device_type="cpu")[0].fused == []
    assert plan_groups(variants, _job(False), device_type="cuda")[0].fused == [[n for n, _ in variants]]
    assert plan_groups(variants, _job(False), horizontal="off", device_type="cuda")[0].fused == []


def test_streams_differ_by_epochs_batch_views_data_seed_input_and_ranks():
    changes = {"base": {}, "epochs": {"epochs": 4}, "batch": {"batch_size": 32}, "views": {"views": 1},
               "seed": {"seed": 1}, "seed-same-data": {"seed": 2, "data_seed": 0}, "size": {"input_size": 32},
               "ranks": {"num_workers": 2}, "online": {"mode": "online"},
               "lr": {"lr": 0.1, "arch": "mlp", "optimizer": "sgd", "alpha": 0.1, "temperature": 9.0}}
    variants = [(n, VariantConfig(**{"name": n, "epochs": 3, **kw})) for n, kw in changes.items()]
    groups = plan_groups(variants, _job(pool=False))
    by = {n: g.id for g in groups for n in g.names}
    assert by["base"] == by["seed-same-data"] == by["lr"]  # a seed sweep over one data seed, another arch/optimizer
    others = ["epochs", "batch", "views", "seed", "size", "ranks", "online"]
    assert len({by[n] for n in others} | {by["base"]}) == len(others) + 1


def test_the_twin_beside_a_pool_is_its_own_stream_and_the_plan_says_why():
    variants = _variants(variants=[{"name": "kd-a", "alpha": 0.5}, {"name": "kd-b", "alpha": 0.9}])
    job = _job(pool=True)
    groups = plan_groups(variants, job)
    assert [g.names for g in groups] == [["kd-a", "kd-b"], ["cnn_small-noKD"]]
    text = format_plan(groups, job, "auto")
    twin = text.split("g2:")[1]
    assert "train shards 1 (not 1 labelled + 9 pool)" in twin and "passes per epoch 10 (not 1)" in twin
    assert "mode none cannot learn from the unlabelled pool" in twin


def test_bare_yaml_on_off_are_read_as_words():
    cfg = TrainConfig.model_validate({"run_dir": "r", "data": {"train_shards": ["x"]}, "fuse": False,
                                      "horizontal": True})
    assert (cfg.fuse, cfg.horizontal) == ("off", "on")
    with pytest.raises(ValueError, match="fuse"):
        TrainConfig.model_validate({"run_dir": "r", "data": {"train_shards": ["x"]}, "fuse": 0})


@pytest.mark.parametrize(("grace", "rf", "max_t"), [(1, 2.0, 4), (1, 3.0, 9), (2, 2.0, 8)])
def test_asha_per_student_decides_as_ray_tunes_bracket(grace, rf, max_t):
    """Our rule against Ray Tune's own _Bracket (one bracket) on a random stream of results."""
    from ray.tune.schedulers.async_hyperband import _Bracket
    from ray.tune.schedulers.trial_scheduler import TrialScheduler

    class Trial:
        def __init__(self, trial_id: str) -> None:
            self.trial_id = trial_id

    rule = AshaRule(max_t, grace, rf)
    bracket = _Bracket(grace, max_t, rf, 0)
    assert milestones(rule) == [int(m) for m, _ in bracket._rungs]
    rng = random.Random(grace * 10 + max_t)
    records: dict = {}
    alive = {f"s{i}": 0 for i in range(12)}
    while alive:
        name = rng.choice(sorted(alive))
        alive[name] += 1
        epoch, score = alive[name], rng.random()
        want = bracket.on_result(Trial(name), epoch, score) == TrialScheduler.STOP
        assert (decide(records, rule, name, epoch, score) is not None) == want, (name, epoch)
        if want or epoch >= max_t - 1:
            del alive[name]


def test_asha_records_are_shared_by_the_groups_of_a_run(tmp_path):
    rule = AshaRule(max_t=4)
    assert asha_decisions(tmp_path, rule, [("good", {"epoch": 1, "val_top1": 0.9})]) == {}
    # another group, later: compared with what the first group recorded at the same rung
    out = asha_decisions(tmp_path, rule, [("weak", {"epoch": 1, "val_top1": 0.1})])
    assert out["weak"].startswith("stopped early by ASHA after 1 epoch")
    assert asha_decisions(tmp_path, rule, [("last", {"epoch": 4, "val_top1": 0.0})]) == {}  # its final epoch
