"""`distill compress` with a student it cannot prune (refused at planning, exit 2, before any work; compressed
without pruning when asked) and one it cannot load (reported; the others' results, report.json and the plot are
written, deploy takes them); students are compressed by name. Real students
trained from a real cache (real DeepSpeed on CPU), a real ViT that Torch-Pruning breaks."""

import json

import pytest
import yaml
from click.testing import CliRunner
from conftest import train_cfg

from distill.cluster.cli import cli
from distill.student_train.config import TrainConfig
from distill.student_train.run import run as run_train

pytestmark = pytest.mark.integration
VIT = {"arch": "timm:vit_tiny_patch16_224", "arch_kwargs": {"img_size": 32, "patch_size": 8, "depth": 2}}


@pytest.fixture(scope="module")
def trained(kd_data, tmp_path_factory):
    root = tmp_path_factory.mktemp("iso")
    res = run_train(TrainConfig.model_validate(train_cfg(kd_data, root / "run", variants=[
        {"name": "res", "arch": "resnet_mini", "arch_kwargs": {"width": 8}}, {"name": "vit", **VIT},
        {"name": "cnn"}])))
    assert res.status == "success", res.leaderboard
    return root


def _config(root, tmp_path, **over) -> str:
    comp = {"train_run": str(root / "run"), "out_dir": str(tmp_path / "comp"), "select": {"top_n": 3},
            "prune": {"ratio": 0.6, "finetune_epochs": 0}, "litert": {"enabled": False},
            "quantize": {"calib_samples": 32}, "latency": {"repeats_b1": 3, "repeats_b32": 3, "warmup": 1}, **over}
    dep = {"compress_dir": str(tmp_path / "comp"), "out_dir": str(tmp_path / "bundle"), "max_top1_drop": None,
           "int8_min_agreement": 0.0}
    f = tmp_path / "c.yaml"
    f.write_text(yaml.safe_dump({"compress": comp, "deploy": dep}))
    return str(f)


def test_an_architecture_pruning_cannot_take_is_refused_before_any_work(trained, tmp_path):
    f = _config(trained, tmp_path)
    r = CliRunner().invoke(cli, ["compress", "--config", f])
    assert r.exit_code == 2, (r.output[-3000:], r.exception)
    assert "student 'vit' (timm:vit_tiny_patch16_224): prune (Torch-Pruning)" in r.stderr
    assert "set prune.enabled: false" in r.stderr and "nothing was done" in r.stderr
    assert "'res'" not in r.stderr and "'cnn'" not in r.stderr  # the others pass planning
    assert not (tmp_path / "comp" / "report.json").exists()


def test_a_student_that_fails_is_reported_and_the_others_are_compressed_and_deployed(trained, tmp_path):
    best = trained / "run" / "cnn" / "best.pt"
    intact = best.read_bytes()
    best.write_bytes(intact[: len(intact) // 2])  # a damaged checkpoint (a copy cut short): it cannot load
    try:
        f = _config(trained, tmp_path, select={"students": ["res", "cnn"]})
        r = CliRunner().invoke(cli, ["compress", "--config", f])
    finally:
        best.write_bytes(intact)
    assert r.exit_code == 3, (r.output[-3000:], r.exception)
    out = tmp_path / "comp"
    stages = {}
    for row in json.loads((out / "report.json").read_text()):
        stages.setdefault(row["student"], set()).add(row["stage"])
    assert stages == {"res": {"baseline", "int8", "pruned", "pruned+int8"}}
    failures = {f["student"]: f for f in json.loads((out / "failures.json").read_text())}
    assert set(failures) == {"cnn"} and failures["cnn"]["stage"] == "all"
    reason = failures["cnn"]["reason"]
    assert f"{best} cannot be read" in reason and "re-run `distill train`" in reason
    report = (out / "report.txt").read_text()
    assert "FAILED cnn: not compressed" in report
    assert "compression" in report and (out / "pareto.png").stat().st_size > 10_000  # the others' verdicts, plot
    r = CliRunner().invoke(cli, ["deploy", "--config", f])
    assert r.exit_code == 0, (r.output[-3000:], r.exception)
    assert json.loads((tmp_path / "bundle" / "bundle.json").read_text())["student"] == "res"
    r = CliRunner().invoke(cli, ["deploy", "--config", f, "--set", "student=cnn"])
    assert r.exit_code == 2 and "its compression failed" in r.stderr


def test_an_architecture_that_cannot_be_pruned_is_compressed_without_pruning(trained, tmp_path):
    f = _config(trained, tmp_path, prune={"enabled": False}, select={"students": ["vit"]})
    r = CliRunner().invoke(cli, ["compress", "--config", f])
    assert r.exit_code == 0, (r.output[-3000:], r.exception)
    rows = json.loads((tmp_path / "comp" / "report.json").read_text())
    assert {(row["student"], row["stage"]) for row in rows} == {("vit", "baseline"), ("vit", "int8")}
    assert (tmp_path / "comp" / "vit" / "preprocessing.json").exists()


def test_compress_one_student_by_name(trained, tmp_path):
    f = _config(trained, tmp_path, prune={"enabled": False})
    r = CliRunner().invoke(cli, ["compress", "--config", f, "--student", "cnn"])
    assert r.exit_code == 0, (r.output[-3000:], r.exception)
    assert {row["student"] for row in json.loads((tmp_path / "comp" / "report.json").read_text())} == {"cnn"}
    assert json.loads((tmp_path / "comp" / "failures.json").read_text()) == []
    r = CliRunner().invoke(cli, ["compress", "--config", f, "--set", "select.students=[nobody]"])
    assert r.exit_code == 2
    assert "no variant 'nobody'" in r.stderr and "students that can be compressed: " in r.stderr
    for name in ("res", "vit", "cnn"):
        assert name in r.stderr.rsplit("students that can be compressed: ", 1)[1]
