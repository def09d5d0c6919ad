"""Quantization-aware distillation (compress/qad.py): the fake-quant student trained through the training loop from
the teacher cache (the teacher's file deleted first: nothing may load it), exported to int8 ONNX and int8 LiteRT,
compared in real ONNX Runtime and the real LiteRT interpreter, reported and bundled by deploy.

Needs the optional extra (pip install -e '.[litert]': torchao's PT2E, litert-torch); `make venv` and CI install it.
"""

import importlib.util
import json
import shutil

import numpy as np
import onnxruntime as ort
import pandas as pd
import pytest
import torch
import yaml
from conftest import train_cfg

from distill.compress.config import CompressConfig
from distill.compress.run import run as run_compress
from distill.deploy.bundle import run as run_deploy
from distill.deploy.config import DeployConfig
from distill.student_train.config import TrainConfig, VariantConfig
from distill.student_train.run import run as run_train

pytestmark = [pytest.mark.integration,
              pytest.mark.skipif(importlib.util.find_spec("litert_torch") is None
                                 or importlib.util.find_spec("torchao") is None,
                                 reason="LiteRT extra not installed: pip install -e '.[litert]' (make venv does)")]
QAD_STAGES = {"qad+int8", "pruned+qad+int8", "qad+litert+int8", "pruned+qad+litert+int8"}


@pytest.fixture(scope="module")
def qad(kd_data, tmp_path_factory):
    """A depthwise + residual student (mobilenet_mini) trained from the cache; then the teacher's checkpoint is
    deleted (the cache is named by its fingerprint) and compress runs QAD on the baseline and the pruned model."""
    root = tmp_path_factory.mktemp("qad")
    teacher = dict(kd_data["teacher"], checkpoint=str(root / "teacher.pt"))
    shutil.copy(kd_data["teacher"]["checkpoint"], root / "teacher.pt")
    base = train_cfg(kd_data, root / "students")
    base["data"]["fingerprint"] = kd_data["cache_dir"].name
    run_train(TrainConfig.model_validate({**base, "teacher": teacher, "variants": [{"name": "mob"}], "base": {
        "arch": "mobilenet_mini", "arch_kwargs": {"width": 8}, "epochs": 3, "batch_size": 32, "lr": 0.01,
        "mode": "soft", "alpha": 0.5, "temperature": 2.0}}))
    (root / "teacher.pt").unlink()  # from here, loading the teacher fails
    comp = run_compress(CompressConfig.model_validate({
        "train_run": str(root / "students"), "out_dir": str(root / "compressed"),
        "prune": {"ratio": 0.7, "finetune_epochs": 1}, "quantize": {"calib_samples": 64},
        "qad": {"enabled": True, "epochs": 1, "models": ["baseline", "pruned"]},
        "latency": {"rounds": 3, "repeats_b1": 3, "repeats_b32": 3, "warmup": 1}}))
    return {"root": root, "compress": comp, "src": root / "compressed" / "mob"}


def test_qad_trains_from_the_cache_without_the_teacher(qad, kd_data):
    assert not qad["compress"].failures, qad["compress"].failures
    info = json.loads((qad["src"] / "qad.json").read_text())
    assert info["status"] == "done" and [e["stage"] for e in info["stages"]] == ["qad+int8", "pruned+qad+int8"]
    for entry in info["stages"]:
        run_dir = qad["src"] / entry["run_dir"].rsplit("/", 1)[-1]
        # the training loop's own outputs: one epoch over every cached training row, in mode soft
        m = pd.read_csv(run_dir / "qad" / "metrics.csv")
        assert len(m) == 1 and m["train_samples"].iloc[0] == 240
        # the KD term is the cached soft labels' (no teacher exists to give them), weighted by the student's alpha
        assert m["kd_loss"].iloc[0] > 0 and np.isfinite(m["train_loss"].iloc[0])
        assert m["train_loss"].iloc[0] == pytest.approx(0.5 * m["kd_loss"].iloc[0] + 0.5 * m["task_loss"].iloc[0],
                                                        rel=1e-3)
        v = VariantConfig.model_validate(yaml.safe_load((run_dir / "qad" / "variant.yaml").read_text()))
        assert v.mode == "soft" and v.epochs == 1 and v.alpha == 0.5 and v.temperature == 2.0
        ident = json.loads((run_dir / "identity.json").read_text())
        # the cache version the training job planned against (a local cache's published version)
        assert ident["cache_dir"].startswith(str(kd_data["cache_dir"]))
        assert json.loads((run_dir / "qad" / "arch.json").read_text())["cache_dir"] == ident["cache_dir"]
    assert not (qad["root"] / "teacher.pt").exists()


def _fake_quant_graph(qad, stage_prefix):
    """The trained fake-quant graph, rebuilt from its parent (the trained student: compress keeps no pruned module,
    so only `qad+` can be rebuilt here) and the QAD run's best.pt, ranges measured on the same cached calibration
    views as compress did."""
    from distill.compress.qad_model import calibrate_ranges, fake_quant_model
    from distill.compress.run import calibration, load_student
    from distill.student_train.job_plan import plan_job

    root = qad["root"]
    job = plan_job(TrainConfig.model_validate(yaml.safe_load((root / "students" /
                                                               "train_config.resolved.yaml").read_text())))
    v = VariantConfig.model_validate(yaml.safe_load((root / "students" / "mob" / "variant.yaml").read_text()))
    info = json.loads((qad["src"] / "qad.json").read_text())
    entry = next(e for e in info["stages"] if e["stage"] == f"{stage_prefix}int8")
    parent = load_student(root / "students", "mob", v)
    size = np.load(qad["src"] / "val_images.npy").shape[-1]
    graph = fake_quant_model(parent, 1, size)
    graph.load_state_dict(torch.load(qad["src"] / entry["run_dir"].rsplit("/", 1)[-1] / "qad" / "best.pt",
                                     weights_only=True))
    calib = calibration(job, v, 64)
    assert calibrate_ranges(graph, calib) == entry["calibration_views"]
    return graph


def _steps(a, b, scale):
    return np.abs(a - b) / scale


def test_the_fake_quant_model_computes_what_the_int8_models_compute(qad):
    """On real val digits: the trained fake-quant model against its int8 ONNX model in ONNX Runtime (the graph as
    written, each QDQ node executed, and the served session with its fused int8 kernels) and its int8 .tflite in the
    LiteRT interpreter, in steps of the logits' quantization scale: every logit within a few steps of each int8
    model (the QDQ graph as written within one: a rounding tie). How much closer than the float twin it sits depends
    on how large the quantization error is, which a 3-epoch plumbing student does not make large: not asserted."""
    from distill.compress.litert_run import LiteRTModel
    from distill.compress.qad_model import fake_quants

    graph = _fake_quant_graph(qad, "qad+")
    src = qad["src"]
    x = np.load(src / "val_images.npy")
    with torch.no_grad():
        fq = graph(torch.from_numpy(x)).numpy()
        twin = torch.jit.load(str(src / "qad.ts"))(torch.from_numpy(x)).numpy()
    out_scale = float(fake_quants(graph)[1][-1].scale)  # the logits' fake-quant (the last activation one)

    def ort_run(level):
        opts = ort.SessionOptions()
        opts.graph_optimization_level = level
        return ort.InferenceSession(str(src / "qad_int8.onnx"), opts, providers=["CPUExecutionProvider"]).run(
            None, {"input": x})[0]

    written = ort_run(ort.GraphOptimizationLevel.ORT_DISABLE_ALL)
    served = ort_run(ort.GraphOptimizationLevel.ORT_ENABLE_ALL)
    lite = LiteRTModel(src / "qad_int8.tflite")(x)
    # as written, the QDQ graph is the fake-quant arithmetic: equal up to a rounding tie flipping one step
    assert _steps(fq, written, out_scale).max() <= 1.01, _steps(fq, written, out_scale).max()
    for name, int8, max_steps in (("ONNX Runtime fused", served, 4), ("LiteRT", lite, 4)):
        d = _steps(fq, int8, out_scale)
        assert d.mean() <= 1.0 and d.max() <= max_steps, (name, d.mean(), d.max())
        assert (fq.argmax(1) == int8.argmax(1)).mean() >= 0.95, name
    # the float twin is the same weights without the rounding: it is what the int8 models were quantized from
    assert np.abs(twin - written).max() > 0 and np.isfinite(twin).all()
    # compress measured the same and wrote it down
    entry = json.loads((src / "qad.json").read_text())["stages"][0]
    assert entry["fake_quant_vs_onnx_int8"]["samples"] == len(x)
    assert entry["fake_quant_vs_litert_int8"]["max_abs_logit_diff"] == pytest.approx(np.abs(fq - lite).max(),
                                                                                      abs=1e-5)


def test_the_float_twin_is_the_trained_graph_without_fake_quant(qad):
    from distill.compress.qad_model import fake_quants, float_twin

    graph = _fake_quant_graph(qad, "qad+")
    twin = float_twin(graph)
    assert fake_quants(twin) == ([], []) and fake_quants(graph)[0] and fake_quants(graph)[1]
    x = torch.from_numpy(np.load(qad["src"] / "val_images.npy"))
    with torch.no_grad():
        ours = twin(x).numpy()
        written = torch.jit.load(str(qad["src"] / "qad.ts"))(x).numpy()
    sess = ort.InferenceSession(str(qad["src"] / "qad.onnx"), providers=["CPUExecutionProvider"])
    assert np.abs(ours - written).max() < 1e-5
    assert np.abs(sess.run(None, {"input": x.numpy()})[0] - ours).max() < 1e-4


def test_qad_stages_are_reported_and_deploy_bundles_them(qad, tmp_path):
    rows = {r["stage"]: r for r in qad["compress"].rows}
    assert set(rows) >= QAD_STAGES and "qad+litert" not in rows  # the twin's fp32 .tflite is checked, no stage
    for stage in QAD_STAGES:
        r = rows[stage]
        assert r["runtime"] == ("litert" if "litert" in stage else "onnxruntime")
        assert 0 <= r["val_top1"] <= 1 and r["val_samples"] == 40 and r["latency_b1_ms"] > 0
        assert r["macs"] == rows["pruned" if stage.startswith("pruned") else "baseline"]["macs"]
    report = json.loads((qad["root"] / "compressed" / "report.json").read_text())
    assert {r["stage"] for r in report} >= QAD_STAGES and "qad+int8" in qad["compress"].table
    assert json.loads((qad["src"] / "litert.json").read_text())["parity"]["qad+litert"]["top1_agreement"] >= 0.99
    # a plumbing student (3 epochs on 240 digits): no floor, and an agreement gate it can pass
    dep = run_deploy(DeployConfig.model_validate({
        "compress_dir": str(qad["root"] / "compressed"), "out_dir": str(tmp_path / "bundle"), "stage": "qad+int8",
        "litert_stage": "qad+litert+int8", "max_top1_drop": None, "int8_min_agreement": 0.5}))
    b = dep.bundle
    assert dep.stage == "qad+int8" and dep.litert == "model.int8.tflite"
    for bundled, made in (("model.onnx", "qad.onnx"), ("model.int8.onnx", "qad_int8.onnx"),
                          ("model.int8.tflite", "qad_int8.tflite")):
        assert (b / bundled).read_bytes() == (qad["src"] / made).read_bytes(), bundled
    card = (b / "model_card.md").read_text()
    assert "## Quantization-aware distillation" in card and "`qad+litert+int8`" in card
    assert "fake-quant vs onnx int8: top-1 agreement" in card
    assert json.loads((b / "bundle.json").read_text())["litert"]["stage"] == "qad+litert+int8"
    sess = ort.InferenceSession(str(b / "model.int8.onnx"), providers=["CPUExecutionProvider"])
    size = np.load(qad["src"] / "val_images.npy").shape[-1]
    assert sess.run(None, {"input": np.zeros((2, 1, size, size), np.float32)})[0].shape == (2, 10)
