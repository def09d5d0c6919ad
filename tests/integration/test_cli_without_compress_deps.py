"""`distill cache --no-ray` on a host without the compress stage's dependencies (torch_pruning, onnxruntime)."""

import subprocess
import sys

import pytest
import yaml
from helpers import cache_cfg_dict, mnist_shard, save_teacher

pytestmark = pytest.mark.integration

_BLOCKER = """
import sys

# None in sys.modules: `import x` raises ModuleNotFoundError and importlib.util.find_spec(x) returns None,
# exactly as on a host where the package is not installed
for name in ("torch_pruning", "onnxruntime"):
    sys.modules[name] = None
"""


def test_cache_exits_0_when_compress_deps_cannot_be_imported(tmp_path):
    """Before the fix, every exit went through an import of onnxruntime/torch_pruning: exit 1 after success."""
    (tmp_path / "block").mkdir()
    (tmp_path / "block" / "sitecustomize.py").write_text(_BLOCKER)
    mnist_shard(tmp_path / "in" / "train-000000.tar", 12)
    cfg = cache_cfg_dict([str(tmp_path / "in" / "*.tar")], tmp_path / "cache", save_teacher(tmp_path / "t.pt"))
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(cfg))
    import os

    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(tmp_path / "block"), *sys.path])
    probe = subprocess.run([sys.executable, "-c", "import torch_pruning"], env=env, capture_output=True, text=True)
    assert probe.returncode != 0 and "ModuleNotFoundError" in probe.stderr  # the blocker is active
    cmd = [sys.executable, "-c", "from distill.cluster.cli import main; main()", "cache", "--no-ray", "-c",
           str(tmp_path / "c.yaml")]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    bad = subprocess.run(cmd[:-1] + [str(tmp_path / "missing.yaml")], env=env, capture_output=True, text=True,
                         timeout=300)
    assert bad.returncode == 2 and "ModuleNotFoundError" not in bad.stderr, bad.stderr[-2000:]
