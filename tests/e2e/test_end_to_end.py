"""End to end: the demo config through the CLI on real MNIST digits and an embedded Ray (scaled down), twice
(the second run continues and redoes nothing). All real, all on 127.0.0.1. The operations path (`ray job submit`
/ `stop`, Prometheus, Pushgateway, the refresh lock) is in test_operations.py.
"""

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest

pytestmark = pytest.mark.e2e
ROOT = Path(__file__).resolve().parents[2]


# --- (1) the demo pipeline ---------------------------------------------------------------------------
DISTILL = [sys.executable, "-c", "from distill.cluster.cli import main; main()"]
SMALL = [
    "shards.limit=1200", "shards.samples_per_shard=250",
    "teacher.base.epochs=1", "teacher.base.arch_kwargs.width=8",
    "cache.teacher.arch_kwargs.width=8", "train.teacher.arch_kwargs.width=8",
    "train.base.epochs=1",
    "compress.prune.finetune_epochs=1", "compress.latency={repeats_b1: 5, repeats_b32: 3, warmup: 1}",
    "deploy.int8_min_agreement=0.5",  # a 1-epoch toy student; the real demo keeps the strict floor
    "train.variants=[{name: cnn-soft, arch: cnn_small, arch_kwargs: {width: 4}, alpha: 0.9},"
    " {name: cnn-noKD, arch: cnn_small, arch_kwargs: {width: 4}, mode: none}]",
]


def _distill(args, cwd, timeout=900):
    env = dict(os.environ, RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0")
    return subprocess.run(DISTILL + args, cwd=cwd, capture_output=True, text=True, timeout=timeout, env=env)


@pytest.mark.timeout(1500)  # the whole pipeline, twice
def test_demo_pipeline_end_to_end(tmp_path):
    sets = [a for s in SMALL for a in ("--set", s)]
    r = _distill(["pipeline", "-c", str(ROOT / "examples" / "demo.yaml"), *sets], tmp_path)
    assert r.returncode == 0, r.stderr[-4000:]
    demo = tmp_path / "runs" / "demo"
    assert len(list((demo / "shards").glob("train-*.tar"))) == 5  # 1080 train samples, 250 per shard
    assert (demo / "teacher" / "teacher" / "best.pt").exists()
    board = {row["variant"]: row for row in pq.read_table(demo / "students" / "leaderboard.parquet").to_pylist()}
    assert set(board) == {"cnn-soft", "cnn-noKD"} and all(b["status"] == "done" for b in board.values())
    assert "artifacts:" in r.stdout and "runs/demo/students" in r.stdout
    bundle = json.loads((demo / "bundle" / "bundle.json").read_text())  # the stage within the accuracy floor
    assert (demo / "bundle" / "model.onnx").exists() and (demo / "compressed" / "pareto.png").exists()
    assert (demo / "bundle" / "model.int8.onnx").exists() == ("int8" in bundle["stage"])
    if importlib.util.find_spec("litert_torch"):  # the `litert` extra (make venv and CI install it)
        assert bundle["litert"]["file"] and (demo / "bundle" / bundle["litert"]["file"]).exists(), bundle["litert"]
    info = json.loads(_distill(["cache", "inspect", "runs/demo/cache", "--json"], tmp_path).stdout)
    assert info["rows"] == 1200 and info["views"] == 6 and info["k"] == 5  # the demo caches 6 views
    assert info["teacher_top1_vs_labels"] is not None
    # a second run continues: nothing is redone
    again = _distill(["pipeline", "-c", str(ROOT / "examples" / "demo.yaml"), *sets], tmp_path)
    assert again.returncode == 0, again.stderr[-3000:]
    out = r.stdout
    assert out.index("distilled student vs its undistilled twin") < out.index("winner: ") < out.index("artifacts:")
    stages = {s["stage"]: s for s in json.loads(again.stdout[again.stdout.index("\nstages:\n") + 9:])}
    assert stages["shards"]["skipped"] and stages["cache"]["labelled"] == 0 and stages["cache"]["unchanged"] == 6
