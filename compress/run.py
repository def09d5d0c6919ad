"""`distill compress`: best students -> prune + KD fine-tune (same cache, same loop) -> int8 -> measure."""

from __future__ import annotations

import copy
import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml

from distill.compress import metrics
from distill.compress.config import CompressConfig
from distill.compress.finetune import finetune_dir, finetune_identity, prune_and_finetune
from distill.compress.litert_stages import Source, litert_stages
from distill.compress.measure import accuracy, file_mb, onnx_accuracy, onnx_latency
from distill.compress.onnx_export import check_parity, export_onnx, save_torchscript
from distill.compress.plan import check_students
from distill.compress.prune import count_cost
from distill.compress.quantize import quantize_int8
from distill.compress.report import format_table, pareto_plot, verdicts
from distill.compress.select import select_students
from distill.core.models import create_model
from distill.core.run_phase import begin_work
from distill.images.preprocessing import Preprocessing
from distill.student_train.config import TrainConfig, VariantConfig
from distill.student_train.data import JoinedStream, StreamSpec
from distill.student_train.job_plan import plan_job
from distill.student_train.train_loop import JobSpec, student_prep

log = logging.getLogger(__name__)


@dataclass
class CompressResult:
    out_dir: Path
    rows: list[dict]
    table: str
    plot: Path


def _stream(job: JobSpec, v: VariantConfig, train: bool, batch: int) -> JoinedStream:
    pairs = job.train if train else job.val
    spec = StreamSpec(cache_dir=job.cache_dir, cache_location=job.cache_location, pairs=pairs,
                      student=student_prep(v, job.teacher_prep), teacher=None,
                      num_classes=job.num_classes, views=job.num_views if train else 1,
                      train=train, batch_size=batch, shuffle_buffer=1, seed=0, epoch=0, rank=0, world=1,
                      loader_workers=1)
    return JoinedStream(spec)


def val_batches(job: JobSpec, v: VariantConfig, limit: int | None) -> list[dict[str, np.ndarray]]:
    out, n = [], 0
    for b in _stream(job, v, False, 64):
        out.append({"pixels": b["pixels"].numpy(), "label": b["label"].numpy(),
                    "teacher_top1": b["teacher_top1_view0"].numpy()})
        n += len(b["label"])
        if limit and n >= limit:
            break
    return out


def calibration(job: JobSpec, v: VariantConfig, samples: int) -> list[np.ndarray]:
    """Cached training samples through their replayed (augmented) views: what the model sees in production."""
    out, n = [], 0
    for b in _stream(job, v, True, 32):
        out.append(b["pixels"].numpy())
        n += len(out[-1])
        if n >= samples:
            break
    return out


def load_student(run_dir: Path, name: str, v: VariantConfig) -> torch.nn.Module:
    info = json.loads((run_dir / name / "arch.json").read_text())
    model = create_model(info["arch"], info["num_classes"], info["in_chans"], **info["arch_kwargs"])
    model.load_state_dict(torch.load(run_dir / name / "best.pt", map_location="cpu", weights_only=True))
    return model.eval()


def _measure(stage: str, name: str, path: Path, vb: list, prep: Preprocessing, cfg: CompressConfig, macs: int,
             params: int) -> dict:
    """One report row: accuracy, size and latency @1/@32 in the runtime the file is for (.onnx: ONNX Runtime,
    .tflite: the LiteRT interpreter)."""
    lat = cfg.latency
    if path.suffix == ".tflite":
        from distill.compress.litert_run import LiteRTModel, litert_latency

        runtime, acc, latency = "litert", accuracy(LiteRTModel(path, lat.threads), vb), litert_latency
    else:
        runtime, acc, latency = "onnxruntime", onnx_accuracy(path, vb, lat.threads), onnx_latency
    row: dict[str, Any] = {"student": name, "stage": stage, "runtime": runtime, "file": str(path),
                           "size_mb": file_mb(path), "macs": macs, "params": params, **acc}
    row["latency_b1_ms"] = 1e3 * latency(path, prep.channels, prep.input_size, 1, lat.repeats_b1, lat.warmup,
                                         lat.threads)
    row["latency_b32_ms"] = 1e3 * latency(path, prep.channels, prep.input_size, 32, lat.repeats_b32, lat.warmup,
                                          lat.threads)
    metrics.VAL_TOP1.labels(name, stage).set(row["val_top1"])
    metrics.SIZE.labels(name, stage).set(row["size_mb"] * 1e6)
    metrics.LATENCY.labels(name, stage, "1").set(row["latency_b1_ms"] / 1e3)
    metrics.LATENCY.labels(name, stage, "32").set(row["latency_b32_ms"] / 1e3)
    log.info("%s %s: top1 %.4f, %.2f MB, %.2f ms @1, %.2f ms @32", name, stage, row["val_top1"], row["size_mb"],
             row["latency_b1_ms"], row["latency_b32_ms"])
    return row


def compress_one(cfg: CompressConfig, job: JobSpec, run_dir: Path, name: str) -> list[dict]:
    v = VariantConfig.model_validate(yaml.safe_load((run_dir / name / "variant.yaml").read_text()))
    prep = student_prep(v, job.teacher_prep)
    out = Path(cfg.out_dir).resolve() / name
    out.mkdir(parents=True, exist_ok=True)
    vb = val_batches(job, v, cfg.val_limit)
    all_pixels = np.concatenate([b["pixels"] for b in vb])
    np.save(out / "val_images.npy", all_pixels[:256])  # real val inputs for deploy's parity check
    images = torch.from_numpy(all_pixels[:64])
    example = torch.zeros(1, prep.channels, prep.input_size, prep.input_size)
    model = load_student(run_dir, name, v)
    macs, params = count_cost(model, example)
    base = export_onnx(model, out / "baseline.onnx", prep.channels, prep.input_size)
    save_torchscript(model, out / "baseline.ts", prep.channels, prep.input_size)
    check_parity(model, base, images)
    rows = [_measure("baseline", name, base, vb, prep, cfg, macs, params)]
    sources = [Source("", model, macs, params)]
    calib = calibration(job, v, cfg.quantize.calib_samples) if cfg.quantize.enabled else []
    if cfg.quantize.enabled:
        q = quantize_int8(base, out / "int8.onnx", iter(calib), cfg.quantize.per_channel, cfg.quantize.method)
        rows.append(_measure("int8", name, q, vb, prep, cfg, macs, params))
    if cfg.prune.enabled:
        pruned = copy.deepcopy(model)
        ident = finetune_identity(run_dir / name / "best.pt", (run_dir / name / "variant.yaml").read_text(),
                                  cfg.prune, str(job.cache_dir))
        costs = prune_and_finetune(pruned, example, cfg.prune, v, job, finetune_dir(out, ident))
        log.info("%s pruned: MACs %d -> %d, params %d -> %d", name, costs["macs_before"], costs["macs_after"],
                 costs["params_before"], costs["params_after"])
        p_path = export_onnx(pruned, out / "pruned.onnx", prep.channels, prep.input_size)
        save_torchscript(pruned, out / "pruned.ts", prep.channels, prep.input_size)
        check_parity(pruned, p_path, images)
        rows.append(_measure("pruned", name, p_path, vb, prep, cfg, costs["macs_after"], costs["params_after"]))
        sources.append(Source("pruned+", pruned, costs["macs_after"], costs["params_after"]))
        if cfg.quantize.enabled:
            pq_path = quantize_int8(p_path, out / "pruned_int8.onnx", iter(calib), cfg.quantize.per_channel,
                                    cfg.quantize.method)
            rows.append(_measure("pruned+int8", name, pq_path, vb, prep, cfg, costs["macs_after"],
                                 costs["params_after"]))
    if cfg.litert.enabled:
        rows += litert_stages([s for s in sources if s.stem in cfg.litert.models], out,
                              lambda stage, path, m, p: _measure(stage, name, path, vb, prep, cfg, m, p),
                              calib if cfg.quantize.enabled else [], all_pixels[:256], cfg.quantize.enabled)
    (out / "preprocessing.json").write_text(json.dumps(prep.as_dict(), indent=1))
    return rows


def run(cfg: CompressConfig) -> CompressResult:
    t0 = time.perf_counter()
    run_dir = Path(cfg.train_run).resolve()
    resolved = run_dir / "train_config.resolved.yaml"
    if not resolved.exists():
        raise FileNotFoundError(f"{resolved} not found: `train_run` must be the run_dir of a `distill train`")
    train_cfg = TrainConfig.model_validate(yaml.safe_load(resolved.read_text()))
    job = plan_job(train_cfg)
    if job.cache_dir is None:
        raise ValueError(f"{run_dir}: trained without a teacher cache; compress fine-tunes from the cache")
    selected = select_students(run_dir, cfg.select.top_n, cfg.select.by)
    check_students(cfg, job, run_dir, [r["variant"] for r in selected])  # exit 2 here, before any work
    begin_work()  # from here an error is "failed during the run" (exit 6), not "bad input" (core/run_phase.py)
    rows: list[dict] = []
    for r in selected:
        rows.extend(compress_one(cfg, job, run_dir, r["variant"]))
    out = Path(cfg.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    table = format_table(rows) + "\n\n" + "\n".join(verdicts(rows, cfg.max_top1_drop, cfg.min_smaller,
                                                            cfg.min_speedup))
    (out / "report.txt").write_text(table + "\n")
    (out / "report.json").write_text(json.dumps(rows, indent=1))
    (out / "compress_config.resolved.yaml").write_text(yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False))
    import pyarrow.parquet as pq

    trained = pq.read_table(run_dir / "leaderboard.parquet").to_pylist()
    plot = pareto_plot(trained, rows, out / "pareto.png")
    metrics.DURATION.set(time.perf_counter() - t0)
    log.info("compress done in %.1f s", time.perf_counter() - t0)
    return CompressResult(out_dir=out, rows=rows, table=table, plot=plot)
