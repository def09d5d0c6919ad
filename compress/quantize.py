"""int8 static post-training quantization with ONNX Runtime (QDQ, per-channel weights).

Why ONNX Runtime and not PyTorch's PT2E flow: the model is served by ONNX Runtime, so calibrating and
evaluating in the runtime that serves it measures exactly what users get; PT2E's int8 -> ONNX export path is
still fragile, and ORT's QDQ graphs are fused into QLinear kernels on x86 and ARM alike.

Tolerance: on the demo models int8 stays within 5 top-1 points of the fp32 model it was made from (tested in
tests/integration/test_compress_deploy.py); `distill deploy` refuses an int8 model whose top-1 agreement
with fp32 on real val images is below `int8_min_agreement` (0.97 by default).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
from onnxruntime.quantization import (
    CalibrationDataReader,
    CalibrationMethod,
    QuantFormat,
    QuantType,
    quantize_static,
)
from onnxruntime.quantization.shape_inference import quant_pre_process

_METHODS = {"minmax": CalibrationMethod.MinMax, "entropy": CalibrationMethod.Entropy,
            "percentile": CalibrationMethod.Percentile}


class _Reader(CalibrationDataReader):
    def __init__(self, batches: Iterator[np.ndarray]) -> None:
        self._it = iter(batches)

    def get_next(self) -> dict[str, np.ndarray] | None:
        x = next(self._it, None)
        return None if x is None else {"input": x.astype(np.float32)}


def quantize_int8(fp32: Path, out: Path, calib: Iterator[np.ndarray], per_channel: bool = True,
                  method: str = "minmax", reduce_range: bool = False) -> Path:
    """Calibrate on `calib` batches (N, C, H, W float32, already normalised) and write an int8 QDQ model;
    `reduce_range`: weights on 7 bits (no saturation in x86 kernels without VNNI: QuantizeConfig.reduce_range)."""
    pre = out.with_name(out.stem + ".pre.onnx")
    quant_pre_process(str(fp32), str(pre), skip_symbolic_shape=True)
    quantize_static(str(pre), str(out), _Reader(calib), quant_format=QuantFormat.QDQ, per_channel=per_channel,
                    activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                    calibrate_method=_METHODS[method], reduce_range=reduce_range)
    pre.unlink(missing_ok=True)
    return out
