"""ONNX export with a dynamic batch axis, and the parity check against PyTorch on real images."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch
from torch import nn

from distill.core.errors import DistillError


class ParityError(DistillError, RuntimeError):
    """The exported model does not compute what the PyTorch model computes."""

    user_input = True


def export_onnx(model: nn.Module, path: Path, channels: int, size: int, opset: int = 17) -> Path:
    model = model.eval().float()
    example = torch.zeros(2, channels, size, size)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.onnx.export(model, (example,), str(path), input_names=["input"], output_names=["logits"],
                      dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}}, opset_version=opset,
                      dynamo=False)
    return path


def save_torchscript(model: nn.Module, path: Path, channels: int, size: int) -> Path:
    """The exact PyTorch model behind an ONNX file (pruned shapes included); loads without pickle."""
    traced = torch.jit.trace(model.eval().float(), torch.zeros(1, channels, size, size))
    traced.save(str(path))
    return path


def session(path: Path, threads: int | None = None) -> ort.InferenceSession:
    opts = ort.SessionOptions()
    if threads:
        opts.intra_op_num_threads = threads
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


@dataclass
class Parity:
    max_abs_logit_diff: float
    top1_agreement: float
    samples: int


def check_parity(model: nn.Module, onnx_path: Path, images: torch.Tensor, atol: float = 1e-3,
                 min_agreement: float = 1.0) -> Parity:
    """Compare logits on real images; raise ParityError beyond tolerance (the message says by how much)."""
    with torch.no_grad():
        ref = model.eval().float()(images).numpy()
    got = session(onnx_path).run(None, {"input": images.numpy().astype(np.float32)})[0]
    diff = float(np.abs(ref - got).max())
    agree = float((ref.argmax(1) == got.argmax(1)).mean())
    result = Parity(diff, agree, len(images))
    if diff > atol or agree < min_agreement:
        raise ParityError(f"{onnx_path}: ONNX differs from PyTorch on {len(images)} real images: "
                          f"max |dlogit| {diff:.3g} (tolerance {atol}), top-1 agreement {agree:.4f} "
                          f"(need {min_agreement})")
    return result
