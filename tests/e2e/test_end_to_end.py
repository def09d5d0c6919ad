"""End to end: the demo config through the CLI on real MNIST digits and an embedded Ray (scaled down), twice
(the second run continues and redoes nothing). All real, all on 127.0.0.1. The operations path (`ray job submit`
/ `stop`, Prometheus, Pushgateway, the refresh lock) is in test_operations.py.
"""

import importlib.util
import json
import os
import shlex
import socket
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


def _distill(args, cwd, timeout=900, merged=False):
    """The CLI in a subprocess; `merged`: stderr into stdout, unbuffered, as a terminal shows them (in order)."""
    env = dict(os.environ, RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0", PYTHONUNBUFFERED="1")
    if merged:
        return subprocess.run(DISTILL + args, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                              timeout=timeout, env=env)
    return subprocess.run(DISTILL + args, cwd=cwd, capture_output=True, text=True, timeout=timeout, env=env)


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _query_as_printed(out, cwd):
    """Run the printed `distill serve ... &` and `curl ...` lines in a shell, as a user pasting them would (only the
    port is moved off 8000, which another job on this machine may hold); returns curl's output."""
    lines = out.splitlines()
    at = next(i for i, ln in enumerate(lines) if ln.startswith("query the served model"))
    serve_line, curl_line = lines[at + 1].strip(), lines[at + 2].strip()
    assert serve_line.startswith("distill serve --bundle ") and serve_line.endswith(" --port 8000 &")
    port = str(_free_port())
    argv = shlex.split(serve_line.removesuffix("&"))[1:]  # `distill` -> this interpreter running the same CLI
    argv[argv.index("--port") + 1] = port
    curl = curl_line.replace("127.0.0.1:8000/", f"127.0.0.1:{port}/")
    script = f"{shlex.join(DISTILL + argv)} &\nSERVE=$!\n{curl}\nrc=$?\nkill $SERVE\nwait $SERVE\nexit $rc\n"
    env = dict(os.environ, RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0")
    return subprocess.run(["bash", "-c", script], cwd=cwd, capture_output=True, text=True, timeout=300, env=env)


@pytest.mark.timeout(1500)  # the whole pipeline, twice
def test_demo_pipeline_end_to_end(tmp_path):
    sets = [a for s in SMALL for a in ("--set", s)]
    r = _distill(["pipeline", "-c", str(ROOT / "examples" / "demo.yaml"), *sets], tmp_path, merged=True)
    assert r.returncode == 0, r.stdout[-4000:]
    demo = tmp_path / "runs" / "demo"
    assert len(list((demo / "shards").glob("train-*.tar"))) == 5  # 1080 train samples, 250 per shard
    assert [p.name for p in (demo / "shards").glob("test-*.tar")] == ["test-000000.tar"]  # 60 held out
    assert (demo / "teacher" / "teacher" / "best.pt").exists()
    board = {row["variant"]: row for row in pq.read_table(demo / "students" / "leaderboard.parquet").to_pylist()}
    assert set(board) == {"cnn-soft", "cnn-noKD"} and all(b["status"] == "done" for b in board.values())
    assert all(b["test_samples"] == 60 and b["test_top1"] is not None for b in board.values())
    assert board["cnn-soft"]["compared_on"] == "test"  # the twin verdict on the held-out split
    assert "artifacts:" in r.stdout and "runs/demo/students" in r.stdout
    bundle = json.loads((demo / "bundle" / "bundle.json").read_text())  # the stage within the accuracy floor
    assert (demo / "bundle" / "model.onnx").exists() and (demo / "compressed" / "pareto.png").exists()
    assert (demo / "bundle" / "model.int8.onnx").exists() == ("int8" in bundle["stage"])
    if importlib.util.find_spec("litert_torch"):  # the `litert` extra (make venv and CI install it)
        assert bundle["litert"]["file"] and (demo / "bundle" / bundle["litert"]["file"]).exists(), bundle["litert"]
    # every stage recorded in the demo's own MLflow store (issue 33), the sweep's curves beside its leaderboard
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{demo / 'mlruns' / 'mlflow.db'}")
    names = {r.info.run_name for r in client.search_runs([client.get_experiment_by_name("distill").experiment_id])}
    assert {"train teacher", "teacher", "train students", "cnn-soft", "cnn-noKD"} <= names, names
    assert any(n.startswith("cache ") for n in names) and any(n.startswith("compress ") for n in names), names
    assert (demo / "students" / "curves.png").exists() and "curves.png" in r.stdout and "mlruns" in r.stdout
    info = json.loads(_distill(["cache", "inspect", "runs/demo/cache", "--json"], tmp_path).stdout)
    assert info["rows"] == 1200 and info["views"] == 6 and info["k"] == 5  # the demo caches 6 views (test included)
    assert info["teacher_top1_vs_labels"] is not None
    # a second run continues: nothing is redone
    again = _distill(["pipeline", "-c", str(ROOT / "examples" / "demo.yaml"), *sets, "--json"], tmp_path)
    assert again.returncode == 0, again.stderr[-3000:]
    # the screen ends on the summary, in this order, after Ray's teardown: nothing of Ray's comes after it
    out = r.stdout
    order = [out.rindex(s) for s in ("distilled student vs its undistilled twin", "winner: ", "artifacts:",
                                     "  bundle ", "query the served model", "distill serve --bundle", "curl ")]
    assert order == sorted(order), out[-3000:]
    tail = out[order[0]:]
    assert "held-out test split" in tail and "\nstages:" not in out and "{" not in tail  # no JSON dump at the end
    assert out.rstrip().splitlines()[-1].lstrip().startswith("curl "), out[-3000:]
    bundle_line = next(ln for ln in tail.splitlines() if ln.startswith("  bundle "))
    shipped = sorted(f for f in bundle["files"] if f != "bundle.json")
    assert bundle_line.endswith(f"({', '.join(shipped)})")  # the bundle's real files, the .tflite among them
    if bundle["litert"]["file"]:
        assert bundle["litert"]["file"] in bundle_line
    # the curl names a file that exists (a held-out test digit, listed in bundle.json) and works as printed
    image = next(a for a in shlex.split(out.rstrip().splitlines()[-1]) if a.startswith("@"))[1:]
    assert (tmp_path / image).is_file() and Path(image).name == bundle["sample"]["file"] == "sample.png"
    assert "test-000000.tar#" in bundle["sample"]["source"] and bundle["sample"]["label"] in [str(i) for i in range(10)]
    query = _query_as_printed(out, tmp_path)
    assert query.returncode == 0, (query.stdout[-2000:], query.stderr[-3000:])
    # curl's JSON is the last line (the server's own banner may come first on the same terminal)
    assert len(json.loads(query.stdout.strip().splitlines()[-1])["predictions"]) == 5
    stages = {s["stage"]: s for s in json.loads((demo / "pipeline.json").read_text())}
    assert stages["shards"]["skipped"] and stages["cache"]["labelled"] == 0 and stages["cache"]["unchanged"] == 7
    assert {s["stage"] for s in json.loads(again.stdout)} == set(stages)  # --json: the stage summaries, only them
