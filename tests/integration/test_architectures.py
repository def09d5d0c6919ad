"""The students users ship, through every stage: train from the cache -> prune -> KD fine-tune -> ONNX fp32 + int8
-> LiteRT fp32 + int8 (litert-torch, ai-edge-quantizer) -> deploy (ONNX and LiteRT parity against PyTorch on real
val images) -> one request over real HTTP to a real Ray Serve on 127.0.0.1 (one Serve instance, each bundle its
own app and route). Small: 32 px RGB digits, one epoch on 64 images, the real architectures at their own widths
(timm's and torchvision's ResNet-18 take no width argument here), the registered ones narrow.

Plumbing, not quality: a 1-epoch student is near chance, so deploy's accuracy floor and int8 agreement gate are
off (its LiteRT and ONNX parity checks are not); each architecture prints what every stage gave (`-s`).
Needs the LiteRT extra (pip install -e '.[litert]'); `make venv` and CI install it.
"""

import importlib.util
import json
import time
import urllib.request

import pytest
from conftest import train_cfg
from helpers import encode, free_port, mnist

from distill.core.models import registered_models

pytestmark = [pytest.mark.integration,
              pytest.mark.skipif(importlib.util.find_spec("litert_torch") is None,
                                 reason="LiteRT extra not installed: pip install -e '.[litert]' (make venv does)")]

REAL = {"timm:mobilenetv3_small_050": {}, "timm:mobilenetv2_050": {}, "timm:efficientnet_lite0": {},
        "timm:resnet18": {}, "torchvision:mobilenet_v3_small": {"width_mult": 0.5}, "torchvision:resnet18": {}}
SMALL = {"cnn_small": {"width": 8}, "resnet_mini": {"width": 8}, "mobilenet_mini": {"width": 8},
         "mlp": {"input_size": 32, "hidden": 64}}  # every registered student; a new one runs at its defaults
ARCHS = {**REAL, **{name: SMALL.get(name, {}) for name in registered_models()}}


@pytest.fixture(scope="module")
def rgb_data(tmp_path_factory):
    """Real MNIST digits as 3-channel 32 px inputs (torchvision's models take RGB), cached from a small teacher:
    2 train shards x 32, 1 val shard x 32."""
    from helpers import cache_cfg_dict, mnist_shard, save_teacher

    from distill.teacher_cache.config import CacheConfig
    from distill.teacher_cache.run import run

    root = tmp_path_factory.mktemp("rgb")
    for i in range(2):
        mnist_shard(root / "shards" / f"train-{i:06d}.tar", 32, offset=32 * i)
    mnist_shard(root / "shards" / "val-000000.tar", 32, offset=1000)
    ckpt = save_teacher(root / "teacher.pt", in_chans=3)
    cfg = cache_cfg_dict([str(root / "shards" / "*.tar")], str(root / "cache"), str(ckpt), views={"num_views": 2})
    cfg["teacher"]["preprocessing"].update(channels=3, mean=[0.13] * 3, std=[0.31] * 3)
    res = run(CacheConfig.model_validate(cfg))
    assert res.status == "success"
    return {"root": root, "cache_root": root / "cache", "teacher": cfg["teacher"],
            "train": [str(root / "shards" / "train-*.tar")], "val": [str(root / "shards" / "val-*.tar")]}


@pytest.fixture(scope="module")
def serve_url(ray_local):
    from ray import serve

    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    yield f"http://127.0.0.1:{port}"
    serve.shutdown()


def _post_image(url: str, data: bytes) -> tuple[int, dict]:
    req = urllib.request.Request(url, data=data, method="POST", headers={"Content-Type": "image/png"})
    with urllib.request.urlopen(req, timeout=120) as r:
        return r.status, json.loads(r.read())


def _serve_one(bundle, slug: str, base: str) -> dict:
    """Deploy the bundle as its own Serve app under /<slug>, POST one real digit, take the app down."""
    from helpers import wait_healthy
    from ray import serve

    from distill.deploy.config import ServeConfig
    from distill.deploy.serve import build_app

    serve.run(build_app(ServeConfig(bundle=bundle, cpus_per_replica=0.25)), name=slug, route_prefix=f"/{slug}")
    try:
        wait_healthy(f"{base}/{slug}", 120)
        x, _ = mnist(1, 3000)
        status, body = _post_image(f"{base}/{slug}/predict", encode(x[0], mode="RGB"))
    finally:
        serve.delete(slug, _blocking=False)  # its replica stops while the next architecture trains
    assert status == 200 and len(body["predictions"]) == 5 and body["model"] == "model.int8.onnx", body
    return body


@pytest.mark.parametrize("arch", list(ARCHS))
def test_every_stage(arch, rgb_data, serve_url, tmp_path):
    from distill.compress.config import CompressConfig
    from distill.compress.run import run as run_compress
    from distill.deploy.bundle import run as run_deploy
    from distill.deploy.config import DeployConfig
    from distill.student_train.config import TrainConfig
    from distill.student_train.run import run as run_train

    slug = arch.replace(":", "-").replace("_", "-")
    t = {"start": time.perf_counter()}
    res = run_train(TrainConfig.model_validate(train_cfg(
        rgb_data, tmp_path / "students", base={"arch": arch, "arch_kwargs": ARCHS[arch], "epochs": 1,
                                               "batch_size": 32, "mode": "soft", "alpha": 0.5},
        variants=[{"name": slug}])))
    assert res.status == "success", res.leaderboard
    t["train"] = time.perf_counter()
    comp = run_compress(CompressConfig.model_validate({
        "train_run": str(tmp_path / "students"), "out_dir": str(tmp_path / "compressed"),
        "prune": {"ratio": 0.8, "steps": 1, "finetune_epochs": 1}, "quantize": {"calib_samples": 32},
        "litert": {"models": ["pruned"]}, "latency": {"repeats_b1": 3, "repeats_b32": 3, "warmup": 1}}))
    t["compress"] = time.perf_counter()
    rows = {r["stage"]: r for r in comp.rows}
    assert set(rows) == {"baseline", "int8", "pruned", "pruned+int8", "pruned+litert", "pruned+litert+int8"}
    assert rows["pruned"]["macs"] < rows["baseline"]["macs"]  # pruned, then fine-tuned from the cache:
    out = tmp_path / "compressed" / slug
    [ft] = out.glob("finetune-*")
    assert len((ft / "step1" / "metrics.csv").read_text().splitlines()) == 2  # header + its KD epoch
    litert = json.loads((out / "litert.json").read_text())
    assert litert["status"] == "done" and litert["converter"] == "litert-torch", litert
    assert litert["io"]["pruned+litert+int8"]["input"]["dtype"] == "int8"
    dep = run_deploy(DeployConfig.model_validate({
        "compress_dir": str(tmp_path / "compressed"), "out_dir": str(tmp_path / "bundle"), "stage": "pruned+int8",
        "litert_stage": "pruned+litert+int8", "max_top1_drop": None, "int8_min_agreement": 0.0}))
    t["deploy"] = time.perf_counter()
    manifest = json.loads((dep.bundle / "bundle.json").read_text())
    assert dep.litert == "model.int8.tflite" and (dep.bundle / "model.int8.tflite").exists()
    lite = manifest["litert"]["parity"]  # deploy refuses beyond deploy.litert_parity_atol (1e-3): checked there
    assert lite["samples"] == 32 and lite["max_abs_logit_diff"] <= 1e-3 and lite["top1_agreement"] >= 0.99
    body = _serve_one(dep.bundle, slug, serve_url)
    t["serve"] = time.perf_counter()
    steps = [f"{k} {t[k] - prev:.0f}s" for k, prev in zip(list(t)[1:], list(t.values())[:-1], strict=True)]
    print(f"\n{arch}: params {rows['baseline']['params']:,} -> {rows['pruned']['params']:,}; ONNX parity "
          f"{dep.parity['max_abs_logit_diff']:.1e}, ONNX int8 agreement {dep.parity['int8_agreement']:.3f}; LiteRT "
          f"parity {lite['max_abs_logit_diff']:.1e} (top-1 {lite['top1_agreement']:.3f}), LiteRT int8 agreement "
          f"{lite['int8_agreement']:.3f}, {rows['pruned+litert+int8']['size_mb']:.2f} MB; served top-1 "
          f"{body['predictions'][0]['class']}; {', '.join(steps)}")


def test_an_architecture_a_stage_cannot_take_is_refused_before_any_work(rgb_data, tmp_path):
    """A ViT trains from the cache, but Torch-Pruning cuts channels its attention reshapes into heads: `distill
    compress` exits 2 naming the student, its architecture, the stage and the reason, and writes nothing (before
    the planning check it failed after the baseline's exports, deep inside the prune stage)."""
    import os
    import subprocess
    import sys

    import yaml

    from distill.student_train.config import TrainConfig
    from distill.student_train.run import run as run_train

    vit = "timm:vit_tiny_patch16_224"
    res = run_train(TrainConfig.model_validate(train_cfg(
        rgb_data, tmp_path / "students", base={"epochs": 1, "batch_size": 32, "mode": "soft", "alpha": 0.5},
        variants=[{"name": "cnn", "arch": "cnn_small", "arch_kwargs": {"width": 8}},
                  {"name": "vit", "arch": vit, "arch_kwargs": {"img_size": 32, "patch_size": 4}}])))
    assert res.status == "success", res.leaderboard
    cfg = tmp_path / "compress.yaml"
    cfg.write_text(yaml.safe_dump({"compress": {"train_run": str(tmp_path / "students"),
                                                "out_dir": str(tmp_path / "compressed"), "select": {"top_n": 2}}}))
    done = subprocess.run([sys.executable, "-m", "distill", "compress", "-c", str(cfg)], capture_output=True,
                          text=True, timeout=600, env=dict(os.environ, RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0"))
    assert done.returncode == 2, done.stderr[-3000:]
    assert f"student 'vit' ({vit}): prune (Torch-Pruning)" in done.stderr and "prune.enabled: false" in done.stderr
    assert "'cnn'" not in done.stderr  # the CNN passed every check
    assert not (tmp_path / "compressed").exists() or not any((tmp_path / "compressed").iterdir())
