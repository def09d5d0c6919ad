"""Run and measure LiteRT models in the LiteRT interpreter (ai-edge-litert, XNNPACK on CPU).

The models take NHWC input (compress/litert_convert.py); callers pass the same NCHW float32 batches the ONNX
models get and this module transposes, quantizes (int8 models take and return int8) and dequantizes, so every
number in the report comes from the same pixels. A model whose graph fixes the batch at 1 (a flatten of the whole
image: litert-torch writes its reshape with a literal batch of 1) runs image by image; `io_details` says so.
"""

from __future__ import annotations

import importlib.util
import logging
import os
from pathlib import Path

import numpy as np

from distill.compress.measure import median_latency, random_input

log = logging.getLogger(__name__)
EXTRA_HINT = "pip install -e '.[litert]' (litert-torch, ai-edge-litert, ai-edge-quantizer)"


def litert_available() -> str | None:
    """None when the LiteRT extra is installed, else why not (said in the report and the model card)."""
    missing = [m for m in ("litert_torch", "ai_edge_litert", "ai_edge_quantizer")
               if importlib.util.find_spec(m) is None]
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
        self.resizable = self._resize(2)  # False: the graph fixes the batch at 1 (run image by image)

    def io_details(self) -> dict:
        """Input/output dtype, shape and quantization (scale, zero point): what the model card states."""
        def one(d: dict) -> dict:
            scale, zero = d["quantization"]
            return {"name": d["name"], "dtype": np.dtype(d["dtype"]).name, "shape": [int(s) for s in d["shape"]],
                    "scale": float(scale), "zero_point": int(zero)}
        return {"input": one(self.inp), "output": one(self.out), "batch_resizable": self.resizable,
                "signatures": {k: {"inputs": list(v["inputs"]), "outputs": list(v["outputs"])}
                               for k, v in self.interp.get_signature_list().items()}}

    def _resize(self, batch: int) -> bool:
        shape = [batch, *(int(s) for s in self.inp["shape"][1:])]
        try:
            self.interp.resize_tensor_input(self.inp["index"], shape)
            self.interp.allocate_tensors()
        except (RuntimeError, ValueError):
            self.interp.resize_tensor_input(self.inp["index"], [1, *shape[1:]])
            self.interp.allocate_tensors()
            self.batch = 1
            return False
        self.batch = batch
        return True

    def __call__(self, x_nchw: np.ndarray) -> np.ndarray:
        if not self.resizable and len(x_nchw) != 1:
            return np.concatenate([self(x_nchw[i:i + 1]) for i in range(len(x_nchw))])
        x = np.ascontiguousarray(np.asarray(x_nchw, np.float32).transpose(0, 2, 3, 1))
        if len(x) != self.batch:
            self._resize(len(x))
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
