"""What `distill compress` checks before any work: each selected student's architecture through the structural
part of every stage it will run, on an untrained copy, so an architecture a stage cannot take is refused with
its name and the reason (exit 2) before anything is pruned, fine-tuned or written.

Checked per student: the model builds and maps (1, C, S, S) to its classes; pruning (when on) can copy it, group
its layers with Torch-Pruning, cut them and still run with the same classes (one step to about the target: ViTs
and MobileViTs fail here, their attention reshapes pruned channels); ONNX export traces it; LiteRT (when on and
installed) can capture it with torch.export, litert-torch's first step (data-dependent control flow fails here);
QAD (when on and installed) can capture it with a dynamic batch and insert its fake-quant nodes.
Not checked: an operator litert-torch captures but cannot lower (e.g. a 2-D FFT) fails in the stage itself; the
ONNX stages and bundle are unaffected and litert.json says why.
"""

from __future__ import annotations

import copy
import json
import logging
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch
import yaml
from torch import nn

from distill.compress.config import CompressConfig
from distill.core.errors import InputError
from distill.core.models import create_model
from distill.student_train.config import VariantConfig
from distill.student_train.train_loop import JobSpec, student_prep

log = logging.getLogger(__name__)


Probe = Callable[[nn.Module, torch.Tensor, int], None]  # (untrained model, example, num_classes); raises if not


class UnsupportedArchitectureError(InputError):
    """A selected student's architecture cannot go through a compress stage; names it, the stage and why."""


def _first_line(exc: BaseException) -> str:
    text = next((line.strip() for line in str(exc).splitlines() if line.strip()), "")
    return f"{exc.__class__.__name__}: {text[:300]}" if text else exc.__class__.__name__


def _forward(model: nn.Module, example: torch.Tensor, num_classes: int) -> None:
    with torch.no_grad():
        out = model(example)
    if tuple(out.shape) != (1, num_classes):
        raise ValueError(f"returns shape {tuple(out.shape)} for one image, not (1, {num_classes})")


def _prune(cfg: CompressConfig) -> Probe:
    def probe(model: nn.Module, example: torch.Tensor, num_classes: int) -> None:
        from distill.compress.prune import probe_prune

        if not any(isinstance(m, nn.Linear) for m in model.modules()):
            raise ValueError("no nn.Linear classifier head (pruning keeps the last Linear layer's class count)")
        probe_prune(copy.deepcopy(model), example, cfg.prune.ratio, cfg.prune.round_to)
    return probe


def _onnx(model: nn.Module, example: torch.Tensor, num_classes: int) -> None:
    from distill.compress.onnx_export import export_onnx

    with tempfile.TemporaryDirectory() as tmp:
        export_onnx(model, Path(tmp) / "probe.onnx", example.shape[1], example.shape[2])


def _litert(model: nn.Module, example: torch.Tensor, num_classes: int) -> None:
    from distill.compress.litert_convert import NHWC

    torch.export.export(NHWC(model).eval(), (example.permute(0, 2, 3, 1).contiguous(),))


def _qad(model: nn.Module, example: torch.Tensor, num_classes: int) -> None:
    from distill.compress.qad_model import fake_quant_model

    graph = fake_quant_model(model, example.shape[1], example.shape[2])
    with torch.no_grad():
        graph(example)
        graph(torch.cat([example, example]))  # any batch: the training loop's last batch may be short


def _probes(cfg: CompressConfig) -> list[tuple[str, Probe]]:
    from distill.compress.litert_run import litert_available
    from distill.compress.qad_model import qad_available

    probes: list[tuple[str, Probe]] = [("forward", _forward)]
    if cfg.prune.enabled:
        probes.append(("prune (Torch-Pruning)", _prune(cfg)))
    probes.append(("ONNX export", _onnx))
    if cfg.litert.enabled and litert_available() is None:
        probes.append(("LiteRT (litert-torch's torch.export capture)", _litert))
    if cfg.qad.enabled and qad_available() is None:
        probes.append(("QAD (the fake-quant graph: torch.export with any batch size, PT2E)", _qad))
    return probes


def _fix(stage: str) -> str:
    if stage.startswith("prune"):
        return "set prune.enabled: false to compress it without pruning, or train another student"
    if stage.startswith("LiteRT"):
        return "set litert.enabled: false to compress it for ONNX only"
    if stage.startswith("QAD"):
        return "set qad.enabled: false to compress it with post-training int8 only"
    return "train another student"


def check_students(cfg: CompressConfig, job: JobSpec, run_dir: Path, names: list[str]) -> None:
    """Raise UnsupportedArchitectureError listing every (student, architecture, stage, reason) that fails."""
    problems: list[str] = []
    probes = _probes(cfg)
    for name in names:
        info = json.loads((run_dir / name / "arch.json").read_text())
        v = VariantConfig.model_validate(yaml.safe_load((run_dir / name / "variant.yaml").read_text()))
        size, arch = student_prep(v, job.teacher_prep).input_size, info["arch"]
        t0 = time.perf_counter()
        try:
            model = create_model(arch, info["num_classes"], info["in_chans"], **info["arch_kwargs"]).eval()
        except (ValueError, TypeError, RuntimeError) as exc:
            problems.append(f"student '{name}' ({arch}): cannot be built: {_first_line(exc)}")
            continue
        example = torch.zeros(1, info["in_chans"], size, size)
        for stage, probe in probes:
            try:
                probe(model, example, info["num_classes"])
            except Exception as exc:  # each library raises its own types; the reason is what matters here
                problems.append(f"student '{name}' ({arch}): {stage}: {_first_line(exc)}; {_fix(stage)}")
                break
        log.info("planning: %s (%s) checked for %s in %.1f s", name, arch, ", ".join(s for s, _ in probes),
                 time.perf_counter() - t0)
    if problems:
        raise UnsupportedArchitectureError(f"{run_dir}: {len(problems)} selected student(s) cannot be compressed as "
                                           "configured; nothing was done:\n  " + "\n  ".join(problems))
