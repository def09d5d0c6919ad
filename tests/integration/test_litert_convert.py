"""PyTorch -> LiteRT with litert-torch and int8 with ai-edge-quantizer (compress/litert_convert.py), checked in the
real LiteRT interpreter. Needs the optional extra (pip install -e '.[litert]'); `make venv` and CI install it."""

import importlib.util

import numpy as np
import pytest
import torch

from distill.core.models import create_model

pytestmark = [pytest.mark.integration,
              pytest.mark.skipif(importlib.util.find_spec("litert_torch") is None,
                                 reason="LiteRT extra not installed: pip install -e '.[litert]' (make venv does)")]


def _model(arch):
    torch.manual_seed(0)
    model = create_model(arch, num_classes=10, in_chans=1, **({"input_size": 20, "hidden": 16} if arch == "mlp"
                                                               else {"width": 8}))
    for m in model.modules():  # non-trivial BatchNorm statistics, so folding them is exercised
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
    return model.eval()


@pytest.mark.parametrize("arch", ["resnet_mini", "mlp"])
def test_a_converted_student_matches_pytorch_at_any_batch(arch, tmp_path):
    """resnet_mini's batch resizes; mlp flattens the whole image (litert-torch writes a literal batch of 1 into that
    reshape), so it runs image by image, and says so."""
    from distill.compress.litert_convert import convert_litert
    from distill.compress.litert_run import LiteRTModel

    model = _model(arch)
    lite = LiteRTModel(convert_litert(model, tmp_path / "m.tflite", 1, 20))
    assert lite.resizable == (arch != "mlp") and lite.io_details()["batch_resizable"] == lite.resizable
    x = np.random.default_rng(0).standard_normal((5, 1, 20, 20)).astype(np.float32)
    with torch.no_grad():
        ref = model(torch.from_numpy(x)).numpy()
    for batch in (x, x[:1]):
        got = lite(batch)
        assert got.shape == (len(batch), 10) and np.abs(got - ref[:len(batch)]).max() < 1e-4


def test_int8_ranges_are_the_global_min_max_over_the_calibration_views(tmp_path):
    """The brightest views come last: ai-edge-quantizer's default moving average (0.95 on what it had) would keep
    their range at about 5% of its width; the deployed int8 model must cover them."""
    from distill.compress.litert_convert import convert_litert, quantize_litert_int8
    from distill.compress.litert_run import LiteRTModel

    fp32 = convert_litert(_model("cnn_small"), tmp_path / "m.tflite", 1, 20)
    rng = np.random.default_rng(1)
    calib = [rng.standard_normal((32, 1, 20, 20)).astype(np.float32) for _ in range(3)]
    calib.append(4 * calib[0])  # the extremes, in the last batch
    q, how = quantize_litert_int8(fp32, tmp_path / "m.int8.tflite", calib)
    assert how["views"] == 128 and "global min/max" in how["method"]
    pixels = np.concatenate(calib)
    logits = LiteRTModel(fp32)(pixels)
    io = LiteRTModel(q).io_details()
    for side, values in (("input", pixels), ("output", logits)):
        scale, zero = io[side]["scale"], io[side]["zero_point"]
        lo, hi = (-128 - zero) * scale, (127 - zero) * scale
        assert abs(lo - min(values.min(), 0)) <= scale and abs(hi - max(values.max(), 0)) <= scale, (side, lo, hi)
    got = LiteRTModel(q)(pixels)
    assert (got.argmax(1) == logits.argmax(1)).mean() > 0.5  # it computes the same function, coarsely


def test_a_model_litert_torch_cannot_lower_is_refused_with_its_name(tmp_path):
    from distill.compress.litert_convert import LiteRTConversionError, convert_litert

    class Spectrum(torch.nn.Module):
        def forward(self, x):
            return torch.fft.rfft2(x).abs().mean((2, 3))

    with pytest.raises(LiteRTConversionError, match=r"spectrum: litert-torch could not convert it .*FFT"):
        convert_litert(Spectrum(), tmp_path / "s.tflite", 1, 16, name="spectrum")
    assert not (tmp_path / "s.tflite").exists()
