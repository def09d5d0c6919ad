"""The project as a user installs it: a non-editable wheel in a fresh virtual environment, run from a directory
outside the checkout. Catches a package-data file the wheel lacks, a sub-package pyproject.toml does not list, and
any import that only works because the checkout is on the path.

The environment is fresh as far as the project goes (the wheel is its only `distill`; the checkout's editable
install is not in it); its third-party dependencies are the test venv's, reached through a `.pth` line instead of
5 GB of torch installed again. A path added by a `.pth` line is not a site directory, so the editable install's
own `.pth` hook in that directory stays inert (asserted below)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest
import torch
import yaml

pytestmark = pytest.mark.integration
ROOT = Path(__file__).resolve().parents[2]
GENERIC = ("core", "cluster", "teacher_cache", "student_train", "compress", "deploy")


def _source_copy(dest: Path) -> Path:
    """What a clean clone holds (tracked files plus new ones not ignored), so the build never sees build/ or .venv."""
    listed = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard"], cwd=ROOT,
                            capture_output=True, text=True, check=True).stdout.splitlines()
    for rel in listed:
        if (ROOT / rel).is_file():
            (dest / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / rel, dest / rel)
    return dest


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> Path:
    work = tmp_path_factory.mktemp("wheel")
    src = _source_copy(work / "src")
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w",
                    str(work / "dist"), str(src)], check=True, capture_output=True, text=True, timeout=300)
    wheel = next((work / "dist").glob("distill-*.whl"))
    venv = work / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120)
    site = next((venv / "lib").glob("python*/site-packages"))
    (site / "test_deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    subprocess.run([sys.executable, "-m", "pip", "--python", str(venv / "bin" / "python"), "install", "-q",
                    "--no-deps", "--no-index", str(wheel)], check=True, capture_output=True, text=True, timeout=300)
    return venv


def _run(venv: Path, args: list[str], cwd: Path, timeout: float = 300) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env["PATH"] = f"{venv / 'bin'}{os.pathsep}{env.get('PATH', '')}"
    return subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


def test_installed_wheel_is_one_package_and_runs_from_outside_the_checkout(installed, tmp_path):
    py = str(installed / "bin" / "python")
    probe = _run(installed, [py, "-c", f"""
import importlib.util, sys
import distill, distill.cluster.cli, distill.core.storage
print(distill.__file__); print(distill.core.storage.__file__)
print([n for n in {GENERIC!r} if importlib.util.find_spec(n) is not None])
print([f for f in sys.meta_path if "editable" in type(f).__name__.lower() or "editable" in repr(f).lower()])
"""], cwd=tmp_path)
    assert probe.returncode == 0, probe.stderr[-3000:]
    pkg_file, storage_file, generic, finders = probe.stdout.splitlines()
    site = str(next((installed / "lib").glob("python*/site-packages")))
    assert pkg_file.startswith(site) and storage_file.startswith(site)  # the wheel's copy, not the checkout's
    assert generic == "[]" and finders == "[]"  # nothing generic at the top level; no editable hook active

    dashboards = _run(installed, [py, "-c", "import distill.cluster, pathlib; p = pathlib.Path(distill.cluster."
                                  "__file__).parent; print(len(list(p.glob('grafana/dashboards/*.json'))), "
                                  "len(list(p.glob('k8s/*.yaml'))), (p / 'prometheus' / 'prometheus.yml').is_file())"],
                      cwd=tmp_path)
    assert dashboards.stdout.split() == ["1", "3", "True"], dashboards.stderr[-2000:]

    distill_bin = str(installed / "bin" / "distill")
    for cmd in ([distill_bin, "--help"], [py, "-m", "distill", "--help"]):
        out = _run(installed, cmd, cwd=tmp_path)
        assert out.returncode == 0 and "Usage: distill" in out.stdout, out.stderr[-2000:]

    shards = _run(installed, [distill_bin, "shards", "--source", "mnist", "--out-dir", "shards",
                              "--set", "limit=40", "--set", "samples_per_shard=20"], cwd=tmp_path)
    assert shards.returncode == 0, shards.stderr[-3000:]
    assert len(list((tmp_path / "shards").glob("*.tar"))) == 3

    teacher = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(28 * 28, 10))
    torch.jit.save(torch.jit.script(teacher), tmp_path / "teacher.pt")
    cfg = {"shards": ["shards/*.tar"], "cache_root": "cache", "topk": 3, "views": {"num_views": 2},
           "progress": False, "metrics": {"enabled": False},
           "teacher": {"scripted": "teacher.pt", "preprocessing": {
               "input_size": 28, "crop_pct": 1.0, "mean": [0.13], "std": [0.31], "channels": 1}}}
    (tmp_path / "cache.yaml").write_text(yaml.safe_dump(cfg))
    cache = _run(installed, [distill_bin, "cache", "--no-ray", "-c", "cache.yaml"], cwd=tmp_path)
    assert cache.returncode == 0, cache.stderr[-3000:]
    assert len(list((tmp_path / "cache").glob("*/*.parquet"))) == 3

