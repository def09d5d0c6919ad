"""LiteRT targets of `distill compress`: each fp32 model (baseline, pruned) as an fp32 .tflite and a full-integer
int8 .tflite, measured in the LiteRT interpreter next to the ONNX stages.

Stages: `litert` / `litert+int8` from the baseline, `pruned+litert` / `pruned+litert+int8` from the pruned model.
Without the extra, or when an operator does not convert, the ONNX stages are unaffected and `litert.json` in the
student's directory says why (deploy puts that in the model card).
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from distill.compress.litert_export import LiteRTConversionError, export_litert
from distill.compress.litert_run import LiteRTModel, litert_available, quantize_litert_int8
from distill.core.atomic_io import atomic_write

log = logging.getLogger(__name__)

# stage -> (fp32 .tflite, int8 .tflite or None, TorchScript twin of the PyTorch model it was made from)
LITERT_FILES: dict[str, tuple[str, str | None, str]] = {
    "litert": ("baseline.tflite", None, "baseline.ts"),
    "litert+int8": ("baseline.tflite", "int8.tflite", "baseline.ts"),
    "pruned+litert": ("pruned.tflite", None, "pruned.ts"),
    "pruned+litert+int8": ("pruned.tflite", "pruned_int8.tflite", "pruned.ts")}


@dataclass
class Source:
    """One fp32 model to convert: its stage prefix ('' or 'pruned+'), ONNX file, PyTorch model and costs."""

    prefix: str
    onnx: Path
    model: torch.nn.Module
    macs: int
    params: int


def litert_parity(model: torch.nn.Module, tflite: Path, images: np.ndarray) -> dict:
    """PyTorch vs the fp32 .tflite in the LiteRT interpreter on real val images (no tolerance applied here)."""
    with torch.no_grad():
        ref = model.eval().float()(torch.from_numpy(images)).numpy()
    got = LiteRTModel(tflite)(images)
    return {"max_abs_logit_diff": float(np.abs(ref - got).max()),
            "top1_agreement": float((ref.argmax(1) == got.argmax(1)).mean()), "samples": len(images)}


def litert_stages(sources: list[Source], out: Path, measure: object, calib: list[np.ndarray],
                  images: np.ndarray, int8: bool = True) -> list[dict]:
    """Convert, quantize and measure every source; returns report rows and writes `<out>/litert.json`.

    `measure(stage, path, macs, params)` makes one report row (the caller's, so ONNX and LiteRT rows are
    measured alike).
    """
    status: dict = {"status": "done", "reason": None, "parity": {}, "io": {}}
    missing = litert_available()
    rows: list[dict] = []
    if missing:
        log.warning("LiteRT targets skipped: %s", missing)
        status.update(status="skipped", reason=missing)
    for src in sources if not missing else []:
        fp32_name, int8_name, _ = LITERT_FILES[f"{src.prefix}litert+int8"]
        try:
            fp32 = export_litert(src.onnx, out / fp32_name)
        except LiteRTConversionError as exc:
            log.warning("LiteRT: %s", exc)
            status.update(status="failed", reason=str(exc))
            break
        status["parity"][f"{src.prefix}litert"] = litert_parity(src.model, fp32, images)
        rows.append(measure(f"{src.prefix}litert", fp32, src.macs, src.params))
        status["io"][f"{src.prefix}litert"] = LiteRTModel(fp32).io_details()
        if int8:
            q = quantize_litert_int8(fp32, out / int8_name, calib)
            rows.append(measure(f"{src.prefix}litert+int8", q, src.macs, src.params))
            status["io"][f"{src.prefix}litert+int8"] = LiteRTModel(q).io_details()
    status["calib_samples"] = sum(len(c) for c in calib)
    atomic_write(out / "litert.json", json.dumps(status, indent=1))
    return rows
