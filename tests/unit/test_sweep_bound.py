"""bench/sweep.py's reading aids: the bound K(L+S)/(L+KS) a shared loader can reach, and the table of medians with
their range over alternating rounds (the benchmark itself runs only by hand: BENCHMARKS.md, "Fused sweep")."""

import importlib.util
from pathlib import Path

import pytest

SPEC = importlib.util.spec_from_file_location("bench_sweep", Path(__file__).resolve().parents[2] / "bench" / "sweep.py")
sweep = importlib.util.module_from_spec(SPEC)
SPEC.loader.exec_module(sweep)


def test_the_bound_is_k_when_the_loader_dominates_and_1_when_the_students_do():
    assert sweep.fusion_bound(8, 1.0, 0.0) == 8
    assert sweep.fusion_bound(8, 0.0, 1.0) == 1
    assert sweep.fusion_bound(8, 2.3 / 100, 4.0 / 8 / 100) == pytest.approx(8 * 0.028 / 0.063, rel=1e-3)
    # the loaded run: each student step 13x slower, the loader 2x: the bound falls toward 1
    quiet, loaded = sweep.fusion_bound(8, 1.0, 0.1), sweep.fusion_bound(8, 2.0, 1.3)
    assert quiet > 4 > loaded > 1


def test_the_table_gives_medians_with_their_range_and_the_bound():
    rounds = [{"speedup_epoch": 3.9, "bound": 4.4}, {"speedup_epoch": 4.2, "bound": 4.6}, {"speedup_epoch": 1.4,
                                                                                           "bound": 1.5}]
    row = {"workload": "photos", "k": 8}
    for key in ("group_epoch_s", "loader_s", "steps_s", "efficiency", "today_epochs_s", "speedup_wall",
                "loader_per_batch_s", "step_per_batch_s", "load_1m"):
        row[key] = sweep._spread([1.0, 2.0, 3.0])
    row["speedup_epoch"] = sweep._spread([r["speedup_epoch"] for r in rounds])
    row["bound"] = sweep._spread([r["bound"] for r in rounds])
    text = sweep.table([row], 3)
    assert "over 3 rounds (order alternating)" in text and "bound = K(L+S)/(L+KS)" in text
    assert "| 3.90 [1.40-4.20] |" in text and "| 4.40 [1.50-4.60] |" in text
