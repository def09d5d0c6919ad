"""Undistilled twins: pairing, de-duplication, opt-out, grids; the leaderboard's delta column."""

import pytest
from pydantic import ValidationError

from distill.student_train.config import TrainConfig, VariantConfig
from distill.student_train.data import ShardPair
from distill.student_train.leaderboard import (
    add_twin_deltas,
    format_twin_comparison,
    noise_pt,
    twin_pairs,
    twin_verdict,
)
from distill.student_train.twins import add_twins, pair_twins
from distill.student_train.unlabelled import labelled_passes, samples_per_epoch, train_pairs


def _cfg(**kw):
    d = {"run_dir": "r", "data": {"train_shards": ["a.tar"], "cache_root": "c"}}
    d.update(kw)
    return TrainConfig.model_validate(d)


def test_every_distilled_recipe_gets_one_twin_with_the_same_recipe():
    cfg = _cfg(base={"epochs": 7, "lr": 0.01, "views": 3, "seed": 5, "optimizer": "sgd", "batch_size": 32},
               variants=[{"name": "c-soft", "arch": "cnn_small", "arch_kwargs": {"width": 8}, "alpha": 0.9},
                         {"name": "c-hard", "arch": "cnn_small", "arch_kwargs": {"width": 8}, "mode": "hard"},
                         {"name": "m-soft", "arch": "mobilenet_mini", "temperature": 2}])
    out = dict(cfg.expand())
    assert list(out) == ["c-soft", "c-hard", "m-soft", "cnn_small-noKD", "mobilenet_mini-noKD"]
    twin = out["cnn_small-noKD"]
    assert twin.mode == "none" and twin.arch_kwargs == {"width": 8}
    for field in ("epochs", "lr", "views", "seed", "optimizer", "batch_size", "warmup_epochs", "weight_decay"):
        assert getattr(twin, field) == getattr(out["c-soft"], field), field
    assert pair_twins(cfg.expand()) == {"c-soft": "cnn_small-noKD", "c-hard": "cnn_small-noKD",
                                        "m-soft": "mobilenet_mini-noKD"}


def test_explicit_identical_variant_is_the_twin_and_a_different_one_is_not():
    cfg = _cfg(variants=[{"name": "kd", "alpha": 0.5}, {"name": "base", "mode": "none", "alpha": 0.1}])
    assert [n for n, _ in cfg.expand()] == ["kd", "base"]  # alpha/T do not matter to a mode-none twin
    assert pair_twins(cfg.expand()) == {"kd": "base"}
    cfg = _cfg(variants=[{"name": "kd"}, {"name": "base", "mode": "none", "epochs": 2}])  # weaker: not a twin
    assert [n for n, _ in cfg.expand()] == ["kd", "base", "cnn_small-noKD"]
    assert pair_twins(cfg.expand()) == {"kd": "cnn_small-noKD"}


def test_grid_over_kd_fields_shares_one_twin_grid_over_recipe_fields_does_not():
    cfg = _cfg(grid={"alpha": [0.5, 0.9], "temperature": [2.0, 4.0]})
    names = [n for n, _ in cfg.expand()]
    assert len(names) == 5 and names[-1] == "cnn_small-noKD"
    assert set(pair_twins(cfg.expand()).values()) == {"cnn_small-noKD"}
    cfg = _cfg(grid={"seed": [0, 1], "alpha": [0.5, 0.9]})
    pairs = pair_twins(cfg.expand())
    assert sorted(set(pairs.values())) == ["cnn_small-noKD-seed=0", "cnn_small-noKD-seed=1"]
    assert pairs["cnn_small-soft-seed=1-alpha=0.9"] == "cnn_small-noKD-seed=1"
    cfg = _cfg(grid={"arch_kwargs": [{"width": 8}, {"width": 16}]})
    assert {n for n, _ in cfg.expand()} >= {"cnn_small-noKD-width=8", "cnn_small-noKD-width=16"}


def test_opt_out_and_name_clash():
    assert [n for n, _ in _cfg(twins=False, variants=[{"name": "kd"}]).expand()] == ["kd"]
    with pytest.raises(ValidationError, match="twins"):
        _cfg(twins="maybe")
    v = [("cnn_small-noKD", VariantConfig(mode="soft", epochs=2))]  # a user's (odd) name for a distilled variant
    assert [n for n, _ in add_twins(v)] == ["cnn_small-noKD", "cnn_small-noKD-twin"]
    assert add_twins([("plain", VariantConfig(mode="none"))]) == [("plain", VariantConfig(mode="none"))]


def _row(name, mode, top1, status="done"):
    return {"variant": name, "status": status, "mode": mode, "val_top1": top1, "twin": None,
            "delta_top1_vs_twin": None}


def test_delta_column_on_hand_made_rows():
    rows = [_row("kd-a", "soft", 0.981), _row("kd-b", "soft", 0.962), _row("kd-c", "hard", 0.97, "failed"),
            _row("base", "none", 0.975), _row("lone", "soft", 0.9)]
    out = {r["variant"]: r for r in add_twin_deltas(rows, {"kd-a": "base", "kd-b": "base", "kd-c": "base"})}
    assert out["kd-a"]["twin"] == "base" and out["kd-a"]["delta_top1_vs_twin"] == pytest.approx(0.6)
    assert out["kd-b"]["delta_top1_vs_twin"] == pytest.approx(-1.3)
    assert out["kd-c"]["twin"] == "base" and out["kd-c"]["delta_top1_vs_twin"] is None  # not both done
    assert out["base"]["twin"] is None and out["lone"]["twin"] is None
    assert rows[0]["twin"] is None  # input rows untouched
    text = format_twin_comparison(twin_pairs(list(out.values()))).splitlines()
    assert "kd-a" in text[1] and "+0.60 pt" in text[1] and "distillation wins" in text[1]  # best first
    assert "kd-b" in text[2] and "-1.30 pt" in text[2] and "KD did not pay" in text[2]
    assert "kd-c" in text[3] and "n/a" in text[3]


def test_unlabelled_pool_counts_and_mode_none_skips_it():
    pairs = [ShardPair("a", "a.tar", 100, labelled=90), ShardPair("p", "p.tar", 400, labelled=0, unlabelled=True)]
    assert [p.stem for p in train_pairs(pairs, "none")] == ["a"]
    assert [p.stem for p in train_pairs(pairs, "soft")] == ["a", "p"]
    assert samples_per_epoch(pairs, "soft") == (90, 410)
    # mode none makes round(500 / 100) = 5 passes over its labelled shard per epoch: the distilled variant's steps
    assert samples_per_epoch(pairs, "none") == (450, 0)
    assert samples_per_epoch(pairs, "none", fixed_passes=1) == (90, 0)


def test_a_twin_beside_an_unlabelled_pool_makes_passes_for_equal_steps():
    labelled = ShardPair("a", "a.tar", 100, labelled=90)
    pool = [ShardPair(f"p{i}", f"p{i}.tar", 150, labelled=0, unlabelled=True) for i in range(3)]
    assert labelled_passes([labelled, *pool], "none") == round(550 / 100) == 6
    assert labelled_passes([labelled, *pool], "none", fixed=2) == 2
    assert labelled_passes([labelled, *pool], "soft") == 1  # distilled variants read the pool itself
    assert labelled_passes([labelled, ShardPair("b", "b.tar", 100, labelled=100)], "none") == 1  # no pool
    assert labelled_passes([ShardPair("a", "a.tar", 1000, labelled=900), pool[0]], "none") == 1  # rounds


def test_pipeline_end_prints_the_comparison_then_the_winner():
    from distill.cluster.cmd_pipeline import _comparison

    pairs = twin_pairs(add_twin_deltas([_row("kd", "soft", 0.975), _row("base", "none", 0.968)], {"kd": "base"}))
    out = _comparison([{"stage": "shards"}, {"stage": "train", "best": "kd", "best_val_top1": 0.975,
                                             "best_mode": "soft", "twins": pairs}])
    out = "\n".join(out).splitlines()
    assert out[0].startswith("distilled student vs its undistilled twin") and "+0.70 pt" in out[1]
    assert "no test split" in out[0]  # compared on val, and the output says that val is the selection split
    assert out[2] == "winner: kd (97.50% val top-1, chosen on val; distilled, +0.70 pt over its twin base on val)"


def _scored(name, mode, val, test, n=250):
    return {**_row(name, mode, val), "val_samples": n, "test_top1": test, "test_samples": n}


def test_the_twin_verdict_and_its_noise_band_are_made_on_the_held_out_test_split():
    # val (the best epoch of each, selected on it) says +2.4 pt, a clear win; test, which nothing selected on, says
    # +0.8 pt: within one standard error of the twin's test top-1 on 250 images (1.2 pt at 96%)
    rows = add_twin_deltas([_scored("kd", "soft", 0.984, 0.968), _scored("base", "none", 0.960, 0.960)],
                           {"kd": "base"})
    kd = next(r for r in rows if r["variant"] == "kd")
    assert kd["compared_on"] == "test" and kd["delta_top1_vs_twin"] == pytest.approx(0.8)
    [pair] = twin_pairs(rows)
    assert (pair["top1"], pair["twin_top1"], pair["samples"]) == (0.968, 0.960, 250)
    text = format_twin_comparison([pair]).splitlines()
    assert "held-out test split" in text[0]
    assert "96.80%" in text[1] and "+0.80 pt" in text[1] and "within noise (±1.2 pt" in text[1]
    assert "(val 98.40% vs 96.00%)" in text[1]  # val beside it, for the reader; not the verdict
    # the same rows without test scores fall back to val, and say so: there the +2.4 pt is a "win"
    plain = add_twin_deltas([_row("kd", "soft", 0.984) | {"val_samples": 250},
                             _row("base", "none", 0.960) | {"val_samples": 250}], {"kd": "base"})
    assert next(r for r in plain if r["variant"] == "kd")["compared_on"] == "val"
    text = format_twin_comparison(twin_pairs(plain)).splitlines()
    assert "no test split" in text[0] and "+2.40 pt  distillation wins" in text[1]
    # only one side scored on test (the twin's best.pt changed since): no mixed comparison, val for both
    mixed = add_twin_deltas([_scored("kd", "soft", 0.984, 0.968), _row("base", "none", 0.960)], {"kd": "base"})
    assert next(r for r in mixed if r["variant"] == "kd")["compared_on"] == "val"


def test_a_delta_within_one_standard_error_is_called_noise_not_a_win():
    # one binomial standard error at 95.8% on 500 val images: 100 * sqrt(0.958 * 0.042 / 500) = 0.897 pt
    assert noise_pt(0.958, 500) == pytest.approx(0.8971, abs=1e-4)
    assert noise_pt(0.958, None) is None and noise_pt(None, 500) is None
    assert twin_verdict(0.6, 0.897).startswith("distilled ahead within noise (±0.9 pt")
    assert twin_verdict(-0.4, 0.897).startswith("twin ahead within noise")
    assert twin_verdict(1.2, 0.897) == "distillation wins" and twin_verdict(-1.2, 0.897).startswith("twin wins")
    assert twin_verdict(0.0, 0.897) == "tie" and twin_verdict(None, 0.897).startswith("n/a")
    assert twin_verdict(0.6, None) == "distillation wins"  # val size unknown: no band
    # end to end through the rows: the twin's val_samples sets the band
    rows = [{**_row("kd", "soft", 0.964), "val_samples": 500}, {**_row("base", "none", 0.958), "val_samples": 500},
            {**_row("kd-big", "soft", 0.964), "val_samples": 50000}, {**_row("base-big", "none", 0.958),
                                                                      "val_samples": 50000}]
    text = format_twin_comparison(twin_pairs(add_twin_deltas(rows, {"kd": "base", "kd-big": "base-big"})))
    lines = {ln.split()[0]: ln for ln in text.splitlines()[1:]}
    assert "+0.60 pt" in lines["kd"] and "within noise" in lines["kd"]
    assert "+0.60 pt" in lines["kd-big"] and lines["kd-big"].endswith("distillation wins")  # ±0.09 pt on 50,000
