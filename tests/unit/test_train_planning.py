"""Variant expansion, view cycling, rank/worker shard assignment and padding: no sample dropped or repeated."""

import random
from pathlib import Path

import pytest
import torch
from pydantic import ValidationError

from distill.student_train.config import TrainConfig
from distill.student_train.data import ShardPair, assign_shards, mixed, padded, shard_groups, steps_per_epoch, view_for


def _cfg(**kw):
    d = {"run_dir": "r", "data": {"train_shards": ["a.tar"], "cache_root": "c"}}
    d.update(kw)
    return TrainConfig.model_validate(d)


def test_grid_and_explicit_variants():
    cfg = _cfg(variants=[{"arch": "cnn_small"}, {"arch": "mobilenet_mini", "epochs": 2}],
               grid={"alpha": [0.5, 0.9], "temperature": [2.0]})
    names = [n for n, _ in cfg.expand()]
    assert len(names) == 6 and len(set(names)) == 6  # 4 distilled + one undistilled twin per recipe
    assert names[-2:] == ["cnn_small-noKD", "mobilenet_mini-noKD"]
    assert "mobilenet_mini-soft-alpha=0.9-temperature=2.0" in names
    assert {v.epochs for _, v in cfg.expand()} == {5, 2}


def test_bad_variants_are_rejected_up_front():
    with pytest.raises(ValidationError, match="grid axes \\['alpah'\\] are not variant fields"):
        _cfg(grid={"alpah": [0.5]})
    with pytest.raises(ValidationError, match="mode online needs the `teacher` block"):
        _cfg(base={"mode": "online"})
    with pytest.raises(ValidationError, match="variant names repeat"):
        _cfg(variants=[{"name": "x"}, {"name": "x"}])
    with pytest.raises(ValidationError, match="alpha"):
        _cfg(base={"alpha": 1.5})


def test_view_cycling():
    assert view_for("k1", 3, 4, train=False) == 0
    seen = {view_for("k1", e, 4, train=True) for e in range(4)}
    assert seen == {0, 1, 2, 3}  # four epochs show four different views
    assert view_for("k1", 0, 1, train=True) == 0


@pytest.mark.parametrize("world,workers", [(1, 1), (2, 1), (2, 2), (3, 2)])
def test_every_shard_once_per_epoch_and_equal_steps(world, workers):
    pairs = [ShardPair(f"s{i}", Path(f"s{i}.tar"), rows) for i, rows in enumerate([50, 37, 50, 12, 50, 49, 3])]
    for epoch in range(3):
        slots = assign_shards(pairs, epoch, 0, world * workers, shuffle=True)
        flat = sorted(p.stem for slot in slots for p in slot)
        assert flat == sorted(p.stem for p in pairs)
        steps = steps_per_epoch(pairs, epoch, 0, world, workers, 16, True)
        import math

        per_rank = [sum(math.ceil(p.rows / 16) for w in range(workers) for p in slots[r * workers + w])
                    for r in range(world)]
        assert steps == max(per_rank)
    orders = {tuple(p.stem for p in assign_shards(pairs, e, 0, 1, True)[0]) for e in range(4)}
    assert len(orders) > 1  # shard order is shuffled across epochs


def test_padded_adds_zero_weight_batches_only():
    real = [{"weight": torch.ones(4), "x": torch.full((4,), float(i))} for i in range(2)]
    placeholder = {"weight": torch.zeros(1), "x": torch.zeros(1)}
    out = list(padded(iter(real), 5, placeholder))
    assert len(out) == 5
    assert [float(b["weight"].sum()) for b in out] == [4, 4, 0, 0, 0]
    assert len(list(padded(iter([]), 2, placeholder))) == 2
    with pytest.raises(RuntimeError, match="more than the planned"):
        list(padded(iter(real), 1, placeholder))


def test_mixed_yields_every_row_once_replayably_and_leaves_one_stream_alone():
    streams = lambda: [iter([f"a{i}" for i in range(30)]), iter([f"b{i}" for i in range(5)]), iter([])]  # noqa: E731
    got = list(mixed(streams(), random.Random(7)))
    assert sorted(got) == sorted([f"a{i}" for i in range(30)] + [f"b{i}" for i in range(5)])
    assert got == list(mixed(streams(), random.Random(7)))  # seeded: an epoch replays exactly
    assert [x for x in got if x[0] == "b"] == [f"b{i}" for i in range(5)]  # each shard keeps its own order
    assert got.index("b4") < 25  # the small shard is spread among the big one's rows, not appended after them
    one, untouched = random.Random(3), random.Random(3)
    assert list(mixed([iter(range(4))], one)) == [0, 1, 2, 3] and one.random() == untouched.random()


@pytest.mark.parametrize("interleave", [1, 2, 4, 9])
def test_grouped_shards_step_count(interleave):
    pairs = [ShardPair(f"s{i}", Path(f"s{i}.tar"), rows) for i, rows in enumerate([50, 37, 50, 12, 50, 49, 3])]
    slot = assign_shards(pairs, 0, 0, 1, True)[0]
    groups = shard_groups(slot, interleave)
    assert [p for g in groups for p in g] == slot and all(len(g) <= interleave for g in groups)
    want = sum(-(-sum(p.rows for p in g) // 16) for g in groups)  # one partial batch per group
    assert steps_per_epoch(pairs, 0, 0, 1, 1, 16, True, interleave) == want
    if interleave >= len(pairs):
        assert want == -(-sum(p.rows for p in pairs) // 16)
