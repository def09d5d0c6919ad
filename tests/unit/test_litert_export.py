"""ONNX -> LiteRT conversion of the registered students, checked in the real LiteRT interpreter.

Needs the optional extra (pip install -e '.[litert]'); `make venv` and CI install it, so these run in CI.
"""

import importlib.util

import numpy as np
import pytest
import torch

from distill.compress.litert_export import LiteRTConversionError, export_litert
from distill.compress.onnx_export import export_onnx
from distill.core.models import create_model

pytestmark = pytest.mark.skipif(importlib.util.find_spec("ai_edge_litert") is None,
                                reason="LiteRT extra not installed: pip install -e '.[litert]' (make venv does)")


def _model(arch):
    torch.manual_seed(0)
    model = create_model(arch, num_classes=10, in_chans=1, **({"input_size": 20, "hidden": 16} if arch == "mlp"
                                                               else {"width": 8}))
    for m in model.modules():  # non-trivial BatchNorm statistics, so folding them is exercised
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
    return model.eval()


@pytest.mark.parametrize("arch", ["cnn_small", "resnet_mini", "mobilenet_mini", "mlp"])
def test_registered_students_convert_and_match_pytorch(arch, tmp_path):
    """Odd 20x20 input: stride-2 convolutions need explicit padding; the classifier reads NCHW-ordered features."""
    from distill.compress.litert_run import LiteRTModel

    model = _model(arch)
    tfl = export_litert(export_onnx(model, tmp_path / "m.onnx", 1, 20), tmp_path / "m.tflite")
    x = np.random.default_rng(1).standard_normal((5, 1, 20, 20)).astype(np.float32)
    with torch.no_grad():
        ref = model(torch.from_numpy(x)).numpy()
    lite = LiteRTModel(tfl)
    got = lite(x)
    assert got.shape == (5, 10) and np.abs(got - ref).max() < 1e-4
    assert lite.io_details()["input"]["shape"] == [1, 20, 20, 1]  # NHWC, batch 1 in the file (resizable)


def test_an_operator_without_a_mapping_is_named(tmp_path):
    model = torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3), torch.nn.Softplus(), torch.nn.AdaptiveAvgPool2d(1),
                                torch.nn.Flatten(), torch.nn.Linear(4, 3)).eval()
    onnx_path = export_onnx(model, tmp_path / "soft.onnx", 1, 12)
    with pytest.raises(LiteRTConversionError, match=r"soft\.onnx: operator 'Softplus' \(ONNX node .*\) has no LiteRT"):
        export_litert(onnx_path, tmp_path / "soft.tflite")
    assert not (tmp_path / "soft.tflite").exists()


def test_a_failed_conversion_leaves_the_onnx_stages_and_says_why(tmp_path):
    """compress: the LiteRT stages of a model that does not convert are skipped with the operator named."""
    import json

    from distill.compress.litert_stages import Source, litert_stages

    model = torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3), torch.nn.Softplus(), torch.nn.AdaptiveAvgPool2d(1),
                                torch.nn.Flatten(), torch.nn.Linear(4, 3)).eval()
    onnx_path = export_onnx(model, tmp_path / "baseline.onnx", 1, 12)
    rows = litert_stages([Source("", onnx_path, model, 1, 1)], tmp_path, lambda *a: pytest.fail("measured"),
                         [], np.zeros((4, 1, 12, 12), np.float32))
    status = json.loads((tmp_path / "litert.json").read_text())
    assert rows == [] and status["status"] == "failed" and "'Softplus'" in status["reason"]


def test_int8_is_full_integer_and_close_to_fp32(tmp_path):
    from distill.compress.litert_run import LiteRTModel, quantize_litert_int8

    model = _model("cnn_small")
    fp32 = export_litert(export_onnx(model, tmp_path / "m.onnx", 1, 20), tmp_path / "m.tflite")
    rng = np.random.default_rng(2)
    calib = [rng.standard_normal((8, 1, 20, 20)).astype(np.float32) for _ in range(2)]
    q = LiteRTModel(quantize_litert_int8(fp32, tmp_path / "m.int8.tflite", calib))
    io = q.io_details()
    assert io["input"]["dtype"] == "int8" and io["output"]["dtype"] == "int8" and io["input"]["scale"] > 0
    assert {d["dtype"].__name__ for d in q.interp.get_tensor_details()} <= {"int8", "int32"}
    x = calib[0]
    ref = LiteRTModel(fp32)(x)
    assert np.abs(q(x) - ref).max() < 0.1 * np.abs(ref).max() + 0.1
    assert (tmp_path / "m.int8.tflite").stat().st_size < (tmp_path / "m.tflite").stat().st_size / 2.5
