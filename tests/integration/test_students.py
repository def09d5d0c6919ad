"""Real students on a real grey cache (MNIST shards, a real teacher's soft labels): what the config decides is
refused before any work (exit 2), a torchvision student trains from the grey cache with its pixels replicated to
3 channels, one student that fails in a sweep fails alone (exit 3) and compress + deploy take the others (real Ray,
real DeepSpeed on CPU), and a student starts from a local "pretrained" checkpoint (weights made here: no hub is
reachable)."""

import argparse
import json

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
import yaml
from click.testing import CliRunner
from conftest import train_cfg
from helpers import encode, mnist

from distill.cluster.cli import cli
from distill.core.atomic_io import file_sha256
from distill.core.models import create_model
from distill.student_train.config import TrainConfig
from distill.student_train.job import student_prep
from distill.student_train.job_plan import plan_job
from distill.student_train.run import run

pytestmark = pytest.mark.integration
TV_SMALL = {"arch": "torchvision:mobilenet_v3_small", "arch_kwargs": {"width_mult": 0.25}}


def _yaml(tmp_path, cfg: dict, name: str = "train.yaml") -> str:
    f = tmp_path / name
    f.write_text(yaml.safe_dump(json.loads(json.dumps(cfg, default=str))))
    return str(f)


def test_what_the_config_decides_is_exit_2_before_any_work(kd_data, tmp_path):
    """The issue's sweep: a torchvision student on a 1-channel cache used to train the others, fail its own
    trial and then crash the leaderboard (exit 6, no leaderboard.parquet). Now every such student is named at
    once, with the fix, and nothing trains."""
    variants = [{"name": "good"}, {"name": "tv", **TV_SMALL}, {"name": "bad-mean", "mean": [0.1, 0.2]},
                {"name": "rgb-ckpt", "init_checkpoint": str(_pretrained(tmp_path, "timm:mobilenetv3_small_050"))}]
    r = CliRunner().invoke(cli, ["train", "--config", _yaml(tmp_path, train_cfg(kd_data, tmp_path / "run",
                                                                                variants=variants))])
    assert r.exit_code == 2, (r.output[-3000:], r.exception)
    assert "3 student(s) cannot train on this cache (nothing was trained)" in r.stderr
    assert "variant tv: torchvision:mobilenet_v3_small takes 3 input channels and this student gets 1: set " \
           "`channels: 3` in the variant" in r.stderr
    assert "variant bad-mean: mean has 2 values for 1 input channels" in r.stderr
    assert "variant rgb-ckpt: init_checkpoint" in r.stderr and "does not fit this student" in r.stderr
    assert "variant good" not in r.stderr
    assert not (tmp_path / "run").exists()  # not even a run directory: nothing was done


def test_a_grey_cache_serves_a_3_channel_student_through_train_compress_deploy(kd_data, tmp_path):
    variants = [{"name": "grey"}, {"name": "tv", "channels": 3, **TV_SMALL}]
    cfg = TrainConfig.model_validate(train_cfg(kd_data, tmp_path / "run", variants=variants))
    job = plan_job(cfg)
    [(_, grey), (_, tv)] = cfg.expand()
    from distill.student_train.data import JoinedStream, StreamSpec

    def first_batch(v):
        spec = StreamSpec(cache_dir=job.cache_dir, pairs=job.train[:1], student=student_prep(v, job.teacher_prep),
                          teacher=None, num_classes=10, views=3, train=True, batch_size=16, shuffle_buffer=1,
                          seed=0, epoch=1, rank=0, world=1, loader_workers=0)
        return next(iter(JoinedStream(spec)))

    g, t = first_batch(grey), first_batch(tv)
    assert g["pixels"].shape == (16, 1, 32, 32) and t["pixels"].shape == (16, 3, 32, 32)
    for c in range(3):  # the cached view's grey pixels, exactly, in every channel
        assert torch.equal(t["pixels"][:, c:c + 1], g["pixels"])
    assert torch.equal(t["topk_ids"], g["topk_ids"])

    res = run(cfg)
    assert res.status == "success", res.leaderboard
    board = {r["variant"]: r for r in res.leaderboard}
    assert board["tv"]["group"] != board["grey"]["group"]  # other input channels: another stream
    info = json.loads((tmp_path / "run" / "tv" / "arch.json").read_text())
    assert info["in_chans"] == 3 and info["preprocessing"]["source_channels"] == 1
    model = create_model(info["arch"], info["num_classes"], info["in_chans"], **info["arch_kwargs"])
    model.load_state_dict(torch.load(tmp_path / "run" / "tv" / "best.pt", weights_only=True))

    comp = {"train_run": str(tmp_path / "run"), "out_dir": str(tmp_path / "comp"), "prune": {"enabled": False},
            "litert": {"enabled": False}, "quantize": {"calib_samples": 32},
            "latency": {"repeats_b1": 3, "repeats_b32": 3, "warmup": 1}}
    dep = {"compress_dir": str(tmp_path / "comp"), "out_dir": str(tmp_path / "bundle"), "max_top1_drop": None,
           "int8_min_agreement": 0.0}
    f = _yaml(tmp_path, {"compress": comp, "deploy": dep}, "cd.yaml")
    for command in (["compress", "--student", "tv"], ["deploy"]):
        r = CliRunner().invoke(cli, [*command, "--config", f])
        assert r.exit_code == 0, (command, r.output[-3000:], r.exception)
    prep = json.loads((tmp_path / "bundle" / "preprocessing.json").read_text())
    assert prep["channels"] == 3 and prep["source_channels"] == 1
    from distill.deploy.serve import preprocess

    png = encode(mnist(1, 3000)[0][0])
    served = preprocess(png, prep, 10_000)
    grey = preprocess(png, {**prep, "channels": 1, "source_channels": None}, 10_000)
    assert served.shape == (3, 32, 32) and np.array_equal(served, np.repeat(grey, 3, axis=0))


def test_one_failing_student_fails_alone_and_compress_and_deploy_take_the_others(kd_data, tmp_path, ray_local):
    """A timm ResNet-18 at 32 px ends on a 1x1 map; a last batch of one image (4 shards of 60 at batch 59) makes
    its BatchNorm raise in training. It shares its group (one data stream) with a good student."""
    cfg = train_cfg(kd_data, tmp_path / "run", ray={"enabled": True},
                    base={"arch": "cnn_small", "arch_kwargs": {"width": 4}, "epochs": 1, "batch_size": 59,
                          "num_workers": 1, "cpus_per_worker": 0.45},
                    variants=[{"name": "good"}, {"name": "resnet18", "arch": "timm:resnet18", "arch_kwargs": {}}],
                    tune={"max_concurrent": 1, "cpus_per_trial": 0.05, "max_failures": 0})
    comp = {"train_run": str(tmp_path / "run"), "out_dir": str(tmp_path / "comp"), "select": {"top_n": 2},
            "prune": {"enabled": False}, "litert": {"enabled": False}, "quantize": {"calib_samples": 32},
            "latency": {"repeats_b1": 3, "repeats_b32": 3, "warmup": 1}}
    dep = {"compress_dir": str(tmp_path / "comp"), "out_dir": str(tmp_path / "bundle"), "max_top1_drop": None,
           "int8_min_agreement": 0.0}
    f = _yaml(tmp_path, {"train": cfg, "compress": comp, "deploy": dep})
    r = CliRunner().invoke(cli, ["train", "--config", f])
    assert r.exit_code == 3, (r.output[-3000:], r.exception)
    board = {b["variant"]: b for b in pq.read_table(tmp_path / "run" / "leaderboard.parquet").to_pylist()}
    assert board["good"]["status"] == "done" and board["good"]["epochs"] == 1
    assert board["good"]["group"] == board["resnet18"]["group"]  # one stream: the premise
    bad = board["resnet18"]
    assert bad["status"] == "failed" and "Expected more than 1 value per channel" in bad["reason"]
    assert bad["params"] > 10_000_000 and bad["macs"] > 0  # measured at planning: no model built at the end
    assert "Expected more than 1 value per channel" in (tmp_path / "run" / "leaderboard.txt").read_text()
    r = CliRunner().invoke(cli, ["compress", "--config", f])
    assert r.exit_code == 0, (r.output[-3000:], r.exception)
    assert {row["student"] for row in json.loads((tmp_path / "comp" / "report.json").read_text())} == {"good"}
    r = CliRunner().invoke(cli, ["deploy", "--config", f])
    assert r.exit_code == 0, (r.output[-3000:], r.exception)
    assert json.loads((tmp_path / "bundle" / "bundle.json").read_text())["student"] == "good"
    r = CliRunner().invoke(cli, ["compress", "--config", f, "--student", "resnet18"])
    assert r.exit_code == 2 and "'resnet18' cannot be compressed: its status is failed (" in r.stderr
    assert "students that can be compressed: good" in r.stderr


def _pretrained(tmp_path, arch: str, classes: int = 1000, chans: int = 3, seed: int = 7):
    """A stand-in for downloaded ImageNet weights: the architecture's own random weights, 1000 classes, RGB."""
    torch.manual_seed(seed)
    path = tmp_path / f"{arch.replace(':', '_')}-{classes}-{chans}.pth"
    torch.save(create_model(arch, classes, chans).state_dict(), path)
    return path


def _student(job, v):
    from distill.student_train.student import StudentRun, seeded_model

    s = StudentRun("s", v, job.run_dir / "s", v.make_loss())
    return s, seeded_model(s, job, torch.device("cpu"))


def test_a_student_starts_from_a_local_checkpoint_head_replaced_stem_adapted(kd_data, tmp_path):
    arch = "timm:mobilenetv3_small_050"
    ckpt = _pretrained(tmp_path, arch)
    given = torch.load(ckpt, weights_only=True)
    cfg = TrainConfig.model_validate(train_cfg(kd_data, tmp_path / "run", variants=[
        {"name": "rgb", "arch": arch, "arch_kwargs": {}, "channels": 3, "init_checkpoint": str(ckpt)},
        {"name": "grey", "arch": arch, "arch_kwargs": {}, "init_checkpoint": str(ckpt)},
        {"name": "fresh", "arch": arch, "arch_kwargs": {}, "channels": 3}]))
    job = plan_job(cfg)
    v = dict(cfg.expand())
    s, rgb = _student(job, v["rgb"])  # the code that builds every student before its first step
    _, fresh = _student(job, v["fresh"])
    mine = rgb.state_dict()
    assert mine["classifier.weight"].shape == (10, 1024) and given["classifier.weight"].shape == (1000, 1024)
    for key, t in given.items():
        if not key.startswith("classifier."):
            assert torch.equal(mine[key], t), key  # every other tensor is the checkpoint's
    assert torch.equal(mine["classifier.weight"], fresh.state_dict()["classifier.weight"])  # a fresh head, seeded
    assert not torch.equal(mine["conv_stem.weight"], fresh.state_dict()["conv_stem.weight"])
    assert s.init["head_replaced"] == ["classifier.weight", "classifier.bias"] and s.init["stem_adapted"] is None
    g, grey = _student(job, v["grey"])
    assert torch.allclose(grey.state_dict()["conv_stem.weight"], given["conv_stem.weight"].sum(1, keepdim=True))
    assert g.init["stem_adapted"] == "conv_stem.weight: 3 -> 1 input channels"
    grey.classifier.load_state_dict(rgb.classifier.state_dict())  # the fresh heads differ: other draws before them
    x = torch.randn(2, 1, 32, 32)
    with torch.no_grad():  # the summed stem on grey == the RGB stem on grey replicated to RGB
        assert torch.allclose(grey.eval()(x), rgb.eval()(x.repeat(1, 3, 1, 1)), atol=1e-5)


def test_a_run_from_a_checkpoint_records_it_and_its_twin_starts_there_too(kd_data, tmp_path):
    arch = "timm:mobilenetv3_small_050"
    ckpt = _pretrained(tmp_path, arch)
    given = torch.load(ckpt, weights_only=True)
    cfg = train_cfg(kd_data, tmp_path / "run", twins=True, variants=[
        {"name": "pre", "arch": arch, "arch_kwargs": {}, "channels": 3, "init_checkpoint": str(ckpt),
         "lr": 1e-9, "weight_decay": 0.0, "warmup_epochs": 0}])
    res = run(TrainConfig.model_validate(cfg))
    assert res.status == "success", res.leaderboard
    board = {r["variant"]: r for r in res.leaderboard}
    assert set(board) == {"pre", "timm:mobilenetv3_small_050-noKD"}
    assert {r["init_checkpoint"] for r in board.values()} == {str(ckpt)}  # the twin: same recipe, same start
    info = json.loads((tmp_path / "run" / "pre" / "arch.json").read_text())["init_checkpoint"]
    assert info["path"] == str(ckpt) and info["sha256"] == file_sha256(ckpt)
    assert info["head_shapes_in_checkpoint"] == {"classifier.weight": [1000, 1024], "classifier.bias": [1000]}
    best = torch.load(tmp_path / "run" / "pre" / "best.pt", weights_only=True)
    moved = max(float((best[k] - t).abs().max()) for k, t in given.items()
                if not k.startswith("classifier.") and t.is_floating_point() and "running" not in k)
    assert moved < 1e-5  # one epoch at lr 1e-9 from the checkpoint's weights (a fresh init is O(0.1) away)
    assert "started from: " + str(ckpt) in (tmp_path / "run" / "leaderboard.txt").read_text()


def test_a_checkpoint_that_is_not_plain_weights_is_refused_before_any_work(kd_data, tmp_path):
    bad = tmp_path / "pickled.pth"
    torch.save({"state_dict": create_model("cnn_small", 10, 1, width=4).state_dict(),
                "args": argparse.Namespace(lr=0.1)}, bad)  # as training scripts save them: needs a full unpickle
    cfg = train_cfg(kd_data, tmp_path / "run", variants=[{"name": "x", "init_checkpoint": str(bad)}])
    r = CliRunner().invoke(cli, ["train", "--config", _yaml(tmp_path, cfg)])
    assert r.exit_code == 2, (r.output[-3000:], r.exception)
    assert "variant x: init_checkpoint" in r.stderr and "cannot be read with weights_only=True" in r.stderr
