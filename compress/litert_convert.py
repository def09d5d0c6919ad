"""PyTorch -> LiteRT (.tflite) with Google's converter (litert-torch), and full-integer int8 with ai-edge-quantizer.

Layout: LiteRT's convolutions are NHWC, so the model is wrapped to take `images` as (1, H, W, C) float32 (the batch
can be resized at run time where the graph allows it: compress/litert_run.py) and returns the logits (N, classes).

int8 calibration: ai-edge-quantizer keeps a moving average of each tensor's min/max over its calibration calls
(its default), which let a few ordinary views set the output range: on a 1-epoch demo student 260 of 500 images
saturated the top logit. Here its calibrator updates the ranges by min/max instead, so every range is the
global min/max over all calibration views. A later stage (quantization-aware distillation) reuses
`convert_litert`, `calibrate` and `quantize_with`: the same recipe on its own model, views or ranges.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from distill.core.atomic_io import atomic_write
from distill.core.errors import InputError

log = logging.getLogger(__name__)
SIGNATURE = "serving_default"  # litert-torch's default signature name
CALIBRATION = ("global min/max of each tensor over every calibration view (ai-edge-quantizer's static recipe; "
               "its calibrator updates the ranges by min/max instead of its default moving average)")


class LiteRTConversionError(InputError):
    """litert-torch could not convert this model (an operator or construct it does not lower); names the model."""


class NHWC(nn.Module):
    """The model fed channels-last images, as LiteRT's kernels (and phone camera buffers) want them."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.model(images.permute(0, 3, 1, 2))


def convert_litert(model: nn.Module, out: Path, channels: int, size: int, name: str = "model") -> Path:
    """Write the fp32 .tflite of `model` (input (1, size, size, channels)) to `out`, atomically."""
    os.environ.setdefault("LITERT_TORCH_SHOW_PROGRESS", "0")  # its progress log is per pass, on stderr
    import litert_torch

    wrapped = NHWC(model.eval().float()).eval()
    try:
        edge = litert_torch.convert(wrapped, (torch.zeros(1, size, size, channels),))
        content = edge.model_content()
    except Exception as exc:  # litert-torch raises torch.export, JAX and MLIR errors alike; say which model
        first = next((line for line in str(exc).splitlines() if line.strip()), exc.__class__.__name__)
        raise LiteRTConversionError(f"{name}: litert-torch could not convert it ({exc.__class__.__name__}: "
                                    f"{first[:400]}); the ONNX models are unaffected") from exc
    atomic_write(out, bytes(content))
    return out


def _recipe(fp32: Path) -> Any:
    from ai_edge_quantizer import qtyping, quantizer

    q = quantizer.Quantizer(str(fp32))
    q.add_static_config(regex=".*", operation_name=qtyping.TFLOperationName.ALL_SUPPORTED, activation_num_bits=8,
                        weight_num_bits=8, weight_granularity=qtyping.QuantGranularity.CHANNELWISE)
    return q


def calibrate(fp32: Path, calib: Iterable[np.ndarray], chunk: int = 32) -> tuple[dict[str, dict], int]:
    """Global min/max of every activation over `calib` batches (N, C, H, W float32); returns (ranges, views).

    ai-edge-quantizer's own calibrator, given min/max as its update rule instead of its moving average; views go
    through in chunks of `chunk` (one at a time for a model whose batch is fixed at 1).
    """
    from ai_edge_litert.interpreter import Interpreter
    from ai_edge_quantizer import calibrator, recipe_manager
    from ai_edge_quantizer.utils import qsv_utils

    from distill.compress.litert_run import LiteRTModel

    [name] = Interpreter(model_path=str(fp32)).get_signature_list()[SIGNATURE]["inputs"]
    step = chunk if LiteRTModel(fp32).resizable else 1
    samples = [{name: np.ascontiguousarray(np.asarray(batch[i:i + step], np.float32).transpose(0, 2, 3, 1))}
               for batch in calib for i in range(0, len(batch), step)]
    recipe = recipe_manager.RecipeManager()
    recipe.load_quantization_recipe(_recipe(fp32).get_quantization_recipe())
    cal = calibrator.Calibrator(str(fp32), num_threads=os.cpu_count() or 1, qsv_update_func=qsv_utils.min_max_update)
    cal.calibrate({SIGNATURE: samples}, recipe)
    return cal.get_model_qsvs(), sum(len(s[name]) for s in samples)


def quantize_with(fp32: Path, out: Path, ranges: dict[str, dict]) -> Path:
    """Full-integer int8 (weights int8 per output channel; activations, input and output int8) from `ranges`."""
    result = _recipe(fp32).quantize(ranges, enable_progress_bar=False, enable_progress_report=False)
    atomic_write(out, bytes(result.quantized_model))
    return out


def quantize_litert_int8(fp32: Path, out: Path, calib: Iterable[np.ndarray]) -> tuple[Path, dict]:
    """int8 .tflite of `fp32` calibrated on `calib` (the cached training views); returns (path, what was used)."""
    ranges, views = calibrate(fp32, calib)
    if not views:
        raise LiteRTConversionError(f"{fp32}: no calibration views; quantize.calib_samples must be >= 8")
    return quantize_with(fp32, out, ranges), {"method": CALIBRATION, "views": views}
