"""Quantization-aware distillation (QAD) from the teacher cache: the int8 stages `qad+int8` (ONNX Runtime) and
`qad+litert+int8` (LiteRT), and their `pruned+` counterparts.

NVIDIA's Model Optimizer recovers quantization loss by distilling into the fake-quant model with the teacher in
memory. Here the teacher's soft labels and views are already cached, so QAD costs only the student: the fake-quant
graph (compress/qad_model.py) trains through student_train's loop on the same cache as every other fine-tune, in
mode soft (hard for a hard-label student), never online. Then its ranges are measured again on the calibration
views, the fake-quant nodes are removed (the float twin: `qad.onnx`, `qad.ts`, `qad.tflite`) and the twin is
quantized by the unchanged deployed recipe (ONNX Runtime minmax QDQ, ai-edge-quantizer min/max): the recipe the
fake-quant graph simulates, so the int8 models compute what QAD trained (`qad.json` records how closely).
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
import yaml
from torch import nn

from distill.compress.config import CompressConfig, QADConfig
from distill.compress.finetune import keyed_dir
from distill.compress.litert_stages import Source
from distill.compress.onnx_export import check_parity, export_onnx, save_torchscript, session
from distill.compress.qad_model import RECIPE, calibrate_ranges, fake_quant_model, float_twin, qad_available
from distill.compress.quantize import quantize_int8
from distill.core.atomic_io import atomic_write
from distill.core.graceful_stop import raise_if_stopping
from distill.student_train.config import VariantConfig
from distill.student_train.train_loop import JobSpec, WorkerContext, student_prep, train_variant

log = logging.getLogger(__name__)


def qad_variant(v: VariantConfig, q: QADConfig) -> VariantConfig:
    """The student's own KD recipe from the cache with QAD's schedule: mode soft (hard stays hard: both read the
    cache; online would load the teacher), no feature KD (the fake-quant graph has no named penultimate layer) and
    no explicit loss terms (they may read features)."""
    alpha = q.alpha if q.alpha is not None else (0.5 if v.mode == "none" else v.alpha)
    return v.model_copy(update={
        "epochs": q.epochs, "lr": q.lr, "warmup_epochs": q.warmup_epochs, "min_lr_ratio": q.min_lr_ratio,
        "num_workers": 1, "zero_stage": 0, "precision": "fp32", "mode": "hard" if v.mode == "hard" else "soft",
        "alpha": alpha, "temperature": q.temperature or v.temperature, "beta": 0.0, "loss": None})


def qad_names(src: Source) -> tuple[str, str]:
    """(stage prefix, file stem) of the QAD copy of `src`: ('qad+', 'qad') or ('pruned+qad+', 'pruned_qad')."""
    return f"{src.prefix}qad+", f"{src.prefix.rstrip('+')}_qad" if src.prefix else "qad"


def _state_sha256(model: nn.Module) -> str:
    h = hashlib.sha256()
    for k, t in model.state_dict().items():
        h.update(k.encode())
        h.update(t.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def qad_dir(out: Path, stem: str, src: Source, variant: VariantConfig, q: QADConfig, cache_dir: str,
            calib_samples: int) -> Path:
    """`<out>/<stem>-<key>`, keyed by the source weights, the QAD variant, the cache and the calibration: the same
    inputs resume their own interrupted run; QAD runs of other inputs are removed."""
    ident = {"source_sha256": _state_sha256(src.model), "variant": variant.model_dump(mode="json"),
             "qad": q.model_dump(mode="json"), "cache_dir": cache_dir, "calib_samples": calib_samples}
    ident["key"] = hashlib.sha256(json.dumps(ident, sort_keys=True).encode()).hexdigest()[:16]
    return keyed_dir(out, stem, ident, "a QAD run of other weights or settings")


def train_qad(graph: nn.Module, v: VariantConfig, job: JobSpec, root: Path) -> dict:
    """Train a copy of the fake-quant graph through the training loop (the cache's soft labels and views; no
    teacher: mode soft/hard and job.teacher None) and load its best epoch back into `graph`; its last row."""
    qjob = replace(job, run_dir=root, teacher=None, asha=None)
    (root / "qad").mkdir(parents=True, exist_ok=True)  # what was trained, readable beside its metrics
    (root / "qad" / "variant.yaml").write_text(yaml.safe_dump(v.model_dump(mode="json"), sort_keys=False))
    row = train_variant("qad", v, qjob, WorkerContext(), model=copy.deepcopy(graph))
    graph.load_state_dict(torch.load(root / "qad" / "best.pt", map_location="cpu", weights_only=True))
    return row


def agreement(a: np.ndarray, b: np.ndarray) -> dict:
    """How closely two models' logits agree on the same images: what `qad.json` records."""
    return {"max_abs_logit_diff": float(np.abs(a - b).max()), "mean_abs_logit_diff": float(np.abs(a - b).mean()),
            "top1_agreement": float((a.argmax(1) == b.argmax(1)).mean()), "samples": len(a)}


def fake_quant_logits(graph: nn.Module, images: np.ndarray) -> np.ndarray:
    graph.eval()
    with torch.no_grad():
        return graph(torch.from_numpy(np.asarray(images, np.float32))).numpy()


@dataclass
class QADOutcome:
    """One QAD copy: its `qad+int8` row, its float twin (LiteRT converts it), its fake-quant graph, its qad.json
    entry."""

    rows: list[dict]
    twin: Source
    graph: nn.Module
    info: dict


def qad_stage(cfg: CompressConfig, job: JobSpec, v: VariantConfig, src: Source, calib: list[np.ndarray],
              images: np.ndarray, out: Path, measure: Callable[[str, Path, int, int], dict]) -> QADOutcome:
    """QAD of one fp32 model `src`: fake-quant graph, calibrated, trained from the cache, re-calibrated, exported."""
    prep = student_prep(v, job.teacher_prep)
    prefix, stem = qad_names(src)
    qv = qad_variant(v, cfg.qad)
    graph = fake_quant_model(src.model, prep.channels, prep.input_size)
    calibrate_ranges(graph, calib)
    before = fake_quant_logits(graph, images)  # the fake-quant model before QAD: post-training int8, simulated
    root = qad_dir(out, stem, src, qv, cfg.qad, str(job.cache_dir), cfg.quantize.calib_samples)
    last = train_qad(graph, qv, job, root)
    views = calibrate_ranges(graph, calib)  # the final weights' ranges: what the deployed recipe will measure
    twin = float_twin(graph)
    fp32 = export_onnx(twin, out / f"{stem}.onnx", prep.channels, prep.input_size)
    save_torchscript(twin, out / f"{stem}.ts", prep.channels, prep.input_size)
    check_parity(twin, fp32, torch.from_numpy(images[:64]))
    # the fake-quant graph simulates per-channel weights and min/max ranges: its int8 model takes exactly those
    int8 = quantize_int8(fp32, out / f"{stem}_int8.onnx", iter(calib), per_channel=True, method="minmax")
    rows = [measure(f"{prefix}int8", int8, src.macs, src.params)]
    fq = fake_quant_logits(graph, images)
    with torch.no_grad():
        parent = src.model.eval()(torch.from_numpy(images)).numpy()
    info = {"stage": f"{prefix}int8", "variant": qv.model_dump(mode="json"), "run_dir": str(root),
            "calibration_views": views,
            "last_epoch": {k: val for k, val in last.items() if isinstance(val, (int, float))},
            "fake_quant_before_qad_vs_parent": agreement(before, parent),
            "fake_quant_vs_parent": agreement(fq, parent),
            "fake_quant_vs_onnx_int8": agreement(fq, session(int8).run(None, {"input": images})[0])}
    log.info("%s %s: fake-quant vs ONNX int8 %s", out.name, prefix, info["fake_quant_vs_onnx_int8"])
    return QADOutcome(rows, Source(prefix, twin, src.macs, src.params, fp32_row=False), graph, info)


def qad_stages(cfg: CompressConfig, job: JobSpec, v: VariantConfig, sources: list[Source], calib: list[np.ndarray],
               images: np.ndarray, out: Path, measure: Callable[[str, Path, int, int], dict],
               failed: Callable[[Exception], None]) -> list[QADOutcome]:
    """QAD of each source in `qad.models`; one that fails is passed to `failed` and the others go on. Writes
    `<out>/qad.json` (completed by `finish_qad_json` once the LiteRT int8 models exist)."""
    missing = qad_available()
    if missing:
        log.warning("QAD skipped: %s", missing)
        write_qad_json(out, "skipped", missing, [])
        return []
    done: list[QADOutcome] = []
    for src in (s for s in sources if s.stem in cfg.qad.models):
        try:
            done.append(qad_stage(cfg, job, v, src, calib, images, out, measure))
        except Exception as exc:  # the other stages stand; the reason goes into the report
            raise_if_stopping()
            log.exception("%s: QAD of %s failed", out.name, src.stem)
            failed(exc)
    write_qad_json(out, "done", None, [o.info for o in done])
    return done


def finish_qad_json(out: Path, done: list[QADOutcome], images: np.ndarray) -> None:
    """Add each fake-quant graph's agreement with its LiteRT int8 model (when one was made) to qad.json."""
    from distill.compress.litert_stages import litert_files

    for o in done:
        _, int8_name, _ = litert_files(f"{o.twin.prefix}litert+int8")
        if int8_name and (out / int8_name).exists():
            from distill.compress.litert_run import LiteRTModel

            o.info["fake_quant_vs_litert_int8"] = agreement(fake_quant_logits(o.graph, images),
                                                            LiteRTModel(out / int8_name)(images))
    if done:
        write_qad_json(out, "done", None, [o.info for o in done])


def write_qad_json(out: Path, status: str, reason: str | None, entries: list[dict]) -> None:
    atomic_write(out / "qad.json", json.dumps({"status": status, "reason": reason, "recipe": RECIPE,
                                               "stages": entries}, indent=1))
