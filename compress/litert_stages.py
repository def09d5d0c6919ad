"""LiteRT targets of `distill compress`: each fp32 model (baseline, pruned) as an fp32 .tflite (litert-torch) and a
full-integer int8 .tflite (ai-edge-quantizer), measured in the LiteRT interpreter next to the ONNX stages.

Stages: `litert` / `litert+int8` from the baseline, `pruned+litert` / `pruned+litert+int8` from the pruned model,
`qad+litert+int8` / `pruned+qad+litert+int8` from the float twins of the QAD models (compress/qad.py: int8 only, their
fp32 .tflite is converted and checked but is no stage of its own). Each fp32 .tflite is checked against its PyTorch
model in the LiteRT interpreter here (recorded in `litert.json`) and again by deploy before it is bundled. Without
the extra, or when a model does not convert, the ONNX stages are unaffected and `litert.json` in the student's
directory says why (deploy puts that in the model card).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from distill.compress.litert_convert import LiteRTConversionError, convert_litert, quantize_litert_int8
from distill.compress.litert_run import LiteRTModel, litert_available
from distill.core.atomic_io import atomic_write

log = logging.getLogger(__name__)
STEMS = {"": "baseline", "pruned+": "pruned", "qad+": "qad", "pruned+qad+": "pruned_qad"}  # stage prefix -> file
# stem of the fp32 model it converts


def litert_files(stage: str) -> tuple[str, str | None, str]:
    """(fp32 .tflite, int8 .tflite or None, TorchScript twin of the PyTorch model) of a LiteRT stage."""
    prefix = stage.removesuffix("+int8").removesuffix("litert")
    stem = STEMS.get(prefix, prefix.rstrip("+"))
    int8 = ("int8.tflite" if stem == "baseline" else f"{stem}_int8.tflite") if stage.endswith("+int8") else None
    return f"{stem}.tflite", int8, f"{stem}.ts"



@dataclass
class Source:
    """One fp32 PyTorch model to convert: its stage prefix ('', 'pruned+', 'qad+', 'pruned+qad+') and costs;
    `fp32_row`: its fp32 .tflite is a stage of its own (a QAD twin's is not: only its int8 model is)."""

    prefix: str
    model: torch.nn.Module
    macs: int
    params: int
    fp32_row: bool = True

    @property
    def stem(self) -> str:
        """Its files' stem: baseline, pruned (compress's `litert.models` names these), qad, pruned_qad."""
        return litert_files(f"{self.prefix}litert")[0].removesuffix(".tflite")


def litert_parity(model: torch.nn.Module, tflite: Path, images: np.ndarray) -> dict:
    """PyTorch vs the fp32 .tflite in the LiteRT interpreter on real val images (no tolerance applied here)."""
    with torch.no_grad():
        ref = model.eval().float()(torch.from_numpy(images)).numpy()
    got = LiteRTModel(tflite)(images)
    return {"max_abs_logit_diff": float(np.abs(ref - got).max()),
            "top1_agreement": float((ref.argmax(1) == got.argmax(1)).mean()), "samples": len(images)}


def _one(src: Source, out: Path, measure: Callable[..., dict], calib: list[np.ndarray], images: np.ndarray,
         int8: bool, status: dict) -> list[dict]:
    """Convert, check and measure one source (and its int8 model); fills `status`."""
    fp32_name, int8_name, _ = litert_files(f"{src.prefix}litert+int8")
    _, channels, size, _ = images.shape
    fp32 = convert_litert(src.model, out / fp32_name, channels, size, name=f"{out.name} ({src.prefix}litert)")
    stage = f"{src.prefix}litert"
    status["parity"][stage] = litert_parity(src.model, fp32, images)
    rows = [measure(stage, fp32, src.macs, src.params)] if src.fp32_row else []
    status["io"][stage] = LiteRTModel(fp32).io_details()
    if int8 and int8_name:
        q, status["calibration"] = quantize_litert_int8(fp32, out / int8_name, calib)
        rows.append(measure(f"{stage}+int8", q, src.macs, src.params))
        status["io"][f"{stage}+int8"] = LiteRTModel(q).io_details()
    return rows


def litert_stages(sources: list[Source], out: Path, measure: Callable[..., dict], calib: list[np.ndarray],
                  images: np.ndarray, int8: bool = True) -> list[dict]:
    """Convert, quantize and measure every source; returns report rows and writes `<out>/litert.json`.

    `measure(stage, path, macs, params)` makes one report row (the caller's, so ONNX and LiteRT rows are
    measured alike). `images`: real val images (N, C, H, W) for the parity check; their shape is the input's.
    """
    status: dict = {"status": "done", "reason": None, "converter": "litert-torch", "parity": {}, "io": {}}
    missing = litert_available()
    rows: list[dict] = []
    if missing:
        log.warning("LiteRT targets skipped: %s", missing)
        status.update(status="skipped", reason=missing)
    for src in sources if not missing else []:
        try:
            rows += _one(src, out, measure, calib, images, int8, status)
        except LiteRTConversionError as exc:
            log.warning("LiteRT: %s", exc)
            status.update(status="failed", reason=str(exc))
            break
    status["calib_samples"] = sum(len(c) for c in calib)
    atomic_write(out / "litert.json", json.dumps(status, indent=1))
    return rows
