"""Run, measure and int8-quantize LiteRT models in the LiteRT interpreter (ai-edge-litert, XNNPACK on CPU).

The models take NHWC input (compress/litert_export.py); callers pass the same NCHW float32 batches the ONNX
models get and this module transposes, quantizes (int8 models take and return int8) and dequantizes, so every
number in the report comes from the same pixels.
"""

from __future__ import annotations

import importlib.util
import logging
import os
from collections.abc import Iterable
from pathlib import Path

import numpy as np

from distill.compress.litert_export import SIGNATURE
from distill.compress.measure import median_latency, random_input

log = logging.getLogger(__name__)
EXTRA_HINT = "pip install -e '.[litert]' (ai-edge-litert, ai-edge-quantizer)"


def litert_available() -> str | None:
    """None when the LiteRT extra is installed, else why not (said in the report and the model card)."""
    missing = [m for m in ("ai_edge_litert", "ai_edge_quantizer") if importlib.util.find_spec(m) is None]
    return f"{', '.join(missing)} not installed: {EXTRA_HINT}" if missing else None


class LiteRTModel:
    """One .tflite in the LiteRT interpreter (XNNPACK delegate on CPU), fed NCHW float32 batches."""

    def __init__(self, path: Path, threads: int | None = None) -> None:
        from ai_edge_litert.interpreter import Interpreter

        self.path = Path(path)
        self.interp = Interpreter(model_path=str(path), num_threads=threads or os.cpu_count() or 1)
        self.inp = self.interp.get_input_details()[0]
        self.out = self.interp.get_output_details()[0]
        self.batch = 0

    def io_details(self) -> dict:
        """Input/output dtype, shape and quantization (scale, zero point): what the model card states."""
        def one(d: dict) -> dict:
            scale, zero = d["quantization"]
            return {"name": d["name"], "dtype": np.dtype(d["dtype"]).name, "shape": [int(s) for s in d["shape"]],
                    "scale": float(scale), "zero_point": int(zero)}
        return {"input": one(self.inp), "output": one(self.out)}

    def __call__(self, x_nchw: np.ndarray) -> np.ndarray:
        x = np.ascontiguousarray(np.asarray(x_nchw, np.float32).transpose(0, 2, 3, 1))
        if len(x) != self.batch:
            self.interp.resize_tensor_input(self.inp["index"], list(x.shape))
            self.interp.allocate_tensors()
            self.batch = len(x)
        scale, zero = self.inp["quantization"]
        if self.inp["dtype"] == np.int8:
            x = np.clip(np.round(x / scale) + zero, -128, 127).astype(np.int8)
        self.interp.set_tensor(self.inp["index"], x)
        self.interp.invoke()
        y = self.interp.get_tensor(self.out["index"])
        if self.out["dtype"] == np.int8:
            scale, zero = self.out["quantization"]
            y = (y.astype(np.float32) - zero) * scale
        return np.asarray(y, np.float32)


def litert_latency(path: Path, channels: int, size: int, batch: int, repeats: int, warmup: int,
                   threads: int | None = None) -> float:
    """Median seconds per call at this batch size (warm-up excluded), input conversion included."""
    return median_latency(LiteRTModel(path, threads), random_input(batch, channels, size), repeats, warmup)


def quantize_litert_int8(fp32: Path, out: Path, calib: Iterable[np.ndarray]) -> Path:
    """Full-integer int8 (weights per channel, activations and I/O int8) with ai-edge-quantizer's static
    min/max recipe, calibrated on `calib` batches (N, C, H, W float32: the cached training views)."""
    from ai_edge_quantizer import qtyping, quantizer

    from distill.core.atomic_io import atomic_write

    q = quantizer.Quantizer(str(fp32))
    q.add_static_config(regex=".*", operation_name=qtyping.TFLOperationName.ALL_SUPPORTED, activation_num_bits=8,
                        weight_num_bits=8, weight_granularity=qtyping.QuantGranularity.CHANNELWISE)
    samples = [{"input": np.ascontiguousarray(x[None].transpose(0, 2, 3, 1), np.float32)}
               for batch in calib for x in batch]  # one image per call: the float model has batch 1
    result = q.quantize(q.calibrate({SIGNATURE: samples}), enable_progress_bar=False, enable_progress_report=False)
    atomic_write(out, bytes(result.quantized_model))
    return out
