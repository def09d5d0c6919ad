"""int8 static post-training quantization with ONNX Runtime (QDQ, per-channel weights).

Why ONNX Runtime and not PyTorch's PT2E flow: the model is served by ONNX Runtime, so calibrating and
evaluating in the runtime that serves it measures exactly what users get; PT2E's int8 -> ONNX export path is
still fragile, and ORT's QDQ graphs are fused into QLinear kernels on x86 and ARM alike.

Tolerance: on the demo models int8 stays within 5 top-1 points of the fp32 model it was made from (tested in
tests/integration/test_compress_deploy.py); `distill deploy` refuses an int8 model whose top-1 agreement
with fp32 on real val images is below `int8_min_agreement` (0.97 by default).
"""

from __future__ import annotations

import platform
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


_VNNI_FLAGS = {"avx512_vnni", "avx_vnni", "amx_int8"}


def x86_without_vnni(machine: str | None = None, cpuinfo: str | None = None) -> bool:
    """Whether this CPU (or the given `platform.machine()` and /proc/cpuinfo text) is x86 without VNNI, where ONNX
    Runtime's u8 x s8 kernels can saturate. Unknown flags (no /proc/cpuinfo) count as no: weights stay 8-bit."""
    machine = machine if machine is not None else platform.machine()
    if machine.lower() not in ("x86_64", "amd64", "i386", "i686"):
        return False
    if cpuinfo is None:
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text()
        except OSError:
            return False
    flags = next((line.split(":", 1)[1].split() for line in cpuinfo.splitlines() if line.startswith("flags")), None)
    return flags is not None and not _VNNI_FLAGS & set(flags)


def resolve_reduce_range(setting: bool | str) -> bool:
    """`quantize.reduce_range` as applied: auto = on for x86 without VNNI (this machine)."""
    return x86_without_vnni() if setting == "auto" else bool(setting)


def quantize_int8(fp32: Path, out: Path, calib: Iterator[np.ndarray], per_channel: bool = True,
                  method: str = "minmax", reduce_range: bool | str = False) -> Path:
    """Calibrate on `calib` batches (N, C, H, W float32, already normalised) and write an int8 QDQ model;
    `reduce_range`: weights on 7 bits (no saturation in x86 kernels without VNNI: QuantizeConfig.reduce_range)."""
    reduce_range = resolve_reduce_range(reduce_range)
    pre = out.with_name(out.stem + ".pre.onnx")
    quant_pre_process(str(fp32), str(pre), skip_symbolic_shape=True)
    quantize_static(str(pre), str(out), _Reader(calib), quant_format=QuantFormat.QDQ, per_channel=per_channel,
                    activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                    calibrate_method=_METHODS[method], reduce_range=reduce_range)
    pre.unlink(missing_ok=True)
    return out
