"""A cache, its resolved config and a bundle written by the build before the `distill` namespace (commit 04d82f4,
tests/data/compat-04d82f4/README.md says how) are read by today's build unchanged: same fingerprint, nothing
relabelled, the bundle verified and served."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
import yaml

from distill.deploy.bundle_files import verify
from distill.deploy.serve import preprocess
from distill.teacher_cache.config import CacheConfig
from distill.teacher_cache.reader import CacheReader

pytestmark = pytest.mark.integration
FIXTURE = Path(__file__).resolve().parents[1] / "data" / "compat-04d82f4"
FINGERPRINT = "0f41825a4498172e"  # the directory name that build gave its cache


@pytest.fixture
def old(tmp_path: Path) -> Path:
    return Path(shutil.copytree(FIXTURE, tmp_path / "old"))


def test_old_cache_and_config_read_and_refresh_labels_nothing(old: Path) -> None:
    resolved = yaml.safe_load((old / "cache" / FINGERPRINT / "cache_config.resolved.yaml").read_text())
    CacheConfig.model_validate(resolved)  # a resolved config of that build is still a valid config
    reader = CacheReader(old / "cache" / FINGERPRINT, expect_fingerprint=FINGERPRINT)
    assert reader.shards == ["train-000000", "train-000001", "val-000000"]
    with tarfile.open(old / "shards" / "val-000000.tar") as tar:
        keys = sorted({Path(m.name).name.split(".")[0] for m in tar.getmembers()})
    assert sorted(s.key for s in reader.iter_shard("val-000000")) == keys

    env = dict(os.environ, RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0")
    done = subprocess.run([sys.executable, "-m", "distill", "cache", "--no-ray", "-c", "cache.yaml"], cwd=old,
                          env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    out = json.loads(done.stdout[done.stdout.index("{"):])
    assert out["fingerprint"] == FINGERPRINT  # the hash did not move with the modules
    assert out["labelled"] == 0 and [p.name for p in (old / "cache").iterdir() if p.is_dir()] == [FINGERPRINT]


def test_old_bundle_verifies_and_predicts(old: Path) -> None:
    import onnxruntime as ort

    root, manifest = verify(old / "bundle")  # every file against its recorded SHA-256 (bundle.json holds NaN)
    assert manifest["stage"] and manifest["litert"]["file"] == "model.int8.tflite"
    prep = json.loads((root / "preprocessing.json").read_text())
    session = ort.InferenceSession(str(root / "model.onnx"), providers=["CPUExecutionProvider"])
    from helpers import encode, mnist

    x, _ = mnist(32)
    batch = np.stack([preprocess(encode(img), prep, 40_000_000) for img in x])
    logits = session.run(None, {"input": batch})[0]
    assert logits.shape == (32, 10) and np.isfinite(logits).all()
