"""The tracking UI in a real browser: a sweep's store served by `mlflow server` on 127.0.0.1 and opened in headless
Chromium (Debian's package; `make test-deps` installs it where missing, as it does Prometheus). The page must list
the sweep's students by name, a student's run must show its metric history (through the REST API the page reads),
and a screenshot of the page must be a real, non-blank PNG."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import urllib.parse
import urllib.request
from pathlib import Path

import pytest
from conftest import train_cfg
from helpers import free_port, wait_http
from PIL import Image

from distill.student_train.config import TrainConfig
from distill.student_train.run import run

pytestmark = [pytest.mark.e2e, pytest.mark.skipif(shutil.which("chromium") is None,
                                                  reason="Debian's chromium is not installed (make test-deps)")]
CHROMIUM = ["chromium", "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
            "--disable-background-networking", "--disable-component-update", "--disable-sync",
            "--virtual-time-budget=20000"]


def _api(base: str, path: str, body: dict | None = None) -> dict:
    req = urllib.request.Request(f"{base}/api/2.0/mlflow/{path}", data=json.dumps(body).encode() if body else None,
                                 headers={"Content-Type": "application/json"}, method="POST" if body else "GET")
    with urllib.request.urlopen(req, timeout=30) as r:
        return json.loads(r.read())


def _browse(url: str, profile: Path, *extra: str) -> str:
    done = subprocess.run([*CHROMIUM, f"--user-data-dir={profile}", *extra, url], capture_output=True, text=True,
                          timeout=180)
    return done.stdout


@pytest.mark.timeout(900)
def test_the_sweep_in_the_mlflow_ui(kd_data, tmp_path):
    d = train_cfg(kd_data, tmp_path / "students", twins=True, variants=[{"name": "kd-student", "alpha": 0.5}])
    d["base"]["epochs"] = 2
    assert run(TrainConfig.model_validate(d)).status == "success"
    store = tmp_path / "mlruns" / "mlflow.db"
    port = free_port()
    server = subprocess.Popen([sys.executable, "-m", "mlflow", "server", "--backend-store-uri", f"sqlite:///{store}",
                               "--host", "127.0.0.1", "--port", str(port), "--workers", "1"], cwd=tmp_path,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        base = f"http://127.0.0.1:{port}"
        wait_http(f"{base}/health", timeout=300)
        exp = _api(base, "experiments/get-by-name?experiment_name=distill")["experiment"]["experiment_id"]
        runs = {r["info"]["run_name"]: r for r in _api(base, "runs/search", {"experiment_ids": [exp]})["runs"]}
        assert {"train students", "kd-student", "cnn_small-noKD"} <= set(runs)
        student = runs["kd-student"]["info"]["run_id"]
        history = _api(base, f"metrics/get-history?run_id={student}&metric_key=val_top1")["metrics"]
        assert sorted(m["step"] for m in history) == [1, 2]

        page = _browse(f"{base}/#/experiments/{exp}/runs", tmp_path / "chrome", "--dump-dom")
        assert "train students" in page  # the sweep (its students fold under it), rendered by the UI's JavaScript
        ids = urllib.parse.quote(json.dumps([r["info"]["run_id"] for r in runs.values()]))
        compare = _browse(f"{base}/#/compare-runs?runs={ids}&experiments={urllib.parse.quote(json.dumps([exp]))}",
                          tmp_path / "chrome", "--dump-dom")
        assert all(name in compare for name in ("train students", "kd-student", "cnn_small-noKD"))  # by name
        one = _browse(f"{base}/#/experiments/{exp}/runs/{student}", tmp_path / "chrome", "--dump-dom")
        assert "kd-student" in one and "val_top1" in one  # a student's run page with its metrics
        shot = tmp_path / "runs.png"
        _browse(f"{base}/#/experiments/{exp}/runs", tmp_path / "chrome", f"--screenshot={shot}",
                "--window-size=1400,900")
        with Image.open(shot) as im:
            assert im.format == "PNG" and im.size == (1400, 900)
            assert len(set(im.convert("RGB").getdata())) > 50  # text, tables and colours, not a blank page
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(timeout=60)
