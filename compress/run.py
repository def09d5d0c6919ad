"""`distill compress`: best students -> prune + KD fine-tune (same cache, same loop) -> int8 -> measure."""

from __future__ import annotations

import copy
import functools
import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml

from distill.compress import metrics
from distill.compress.config import CompressConfig
from distill.compress.finetune import finetune_dir, finetune_identity, prune_and_finetune
from distill.compress.litert_stages import Source, litert_stages
from distill.compress.measure import (
    accuracy,
    file_mb,
    machine_load,
    onnx_accuracy,
    random_input,
    speedup,
    timed_rounds,
)
from distill.compress.onnx_export import check_parity, export_onnx, save_torchscript, session
from distill.compress.plan import check_students
from distill.compress.prune import count_cost
from distill.compress.qad import finish_qad_json, qad_stages
from distill.compress.quantize import quantize_int8, resolve_reduce_range
from distill.compress.report import failure, format_failures, format_table, pareto_plot, verdicts
from distill.compress.select import select_students
from distill.compress.tracking import record_compress
from distill.core.errors import InputError
from distill.core.graceful_stop import raise_if_stopping
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
    failures: list[dict] = field(default_factory=list)  # {student, stage ("all" or "pruned"), reason}
    students: list[str] = field(default_factory=list)  # the students it was asked to compress

    @property
    def status(self) -> str:
        """success; partial (a student or its pruned stages failed, the rest is in the report); failure (none of
        the students has a measured row)."""
        if not self.failures:
            return "success"
        return "partial" if self.rows else "failure"


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
    ckpt = run_dir / name / "best.pt"
    try:
        state = torch.load(ckpt, map_location="cpu", weights_only=True)
    except Exception as exc:  # a damaged or cut-short file raises many types
        raise InputError(f"{ckpt} cannot be read ({exc.__class__.__name__}: {str(exc).splitlines()[0]}): delete "
                         f"{ckpt.parent} and re-run `distill train` to train this student again") from exc
    model.load_state_dict(state)
    return model.eval()


def _runner(path: Path, threads: int | None) -> Any:
    """NCHW float32 batch -> logits, in the runtime the file is for (.onnx: ONNX Runtime, .tflite: LiteRT)."""
    if path.suffix == ".tflite":
        from distill.compress.litert_run import LiteRTModel

        return LiteRTModel(path, threads)
    sess = session(path, threads)
    return lambda x: sess.run(None, {"input": x})[0]


def _measure(stage: str, name: str, path: Path, vb: list, prep: Preprocessing, cfg: CompressConfig, macs: int,
             params: int) -> dict:
    """One report row: accuracy and size in the runtime the file is for; latency comes later, from the student's
    alternating timing rounds (`_time_rows`)."""
    if path.suffix == ".tflite":
        runtime, acc = "litert", accuracy(_runner(path, cfg.latency.threads), vb)
    else:
        runtime, acc = "onnxruntime", onnx_accuracy(path, vb, cfg.latency.threads)
    row: dict[str, Any] = {"student": name, "stage": stage, "runtime": runtime, "file": str(path),
                           "size_mb": file_mb(path), "macs": macs, "params": params, **acc}
    metrics.VAL_TOP1.labels(name, stage).set(row["val_top1"])
    metrics.SIZE.labels(name, stage).set(row["size_mb"] * 1e6)
    log.info("%s %s: top1 %.4f, %.2f MB", name, stage, row["val_top1"], row["size_mb"])
    return row


def _pruned_stages(cfg: CompressConfig, job: JobSpec, run_dir: Path, name: str, v: VariantConfig,
                   model: torch.nn.Module, measure: Callable[[str, Path, int, int], dict], calib: list[np.ndarray],
                   images: torch.Tensor, out: Path) -> tuple[list[dict], Source]:
    """pruned (+ KD fine-tune from the cache) and pruned+int8: their rows and the pruned model for LiteRT."""
    prep = student_prep(v, job.teacher_prep)
    example = torch.zeros(1, prep.channels, prep.input_size, prep.input_size)
    pruned = copy.deepcopy(model)
    ident = finetune_identity(run_dir / name / "best.pt", (run_dir / name / "variant.yaml").read_text(),
                              cfg.prune, str(job.cache_dir))
    costs = prune_and_finetune(pruned, example, cfg.prune, v, job, finetune_dir(out, ident))
    log.info("%s pruned: MACs %d -> %d, params %d -> %d", name, costs["macs_before"], costs["macs_after"],
             costs["params_before"], costs["params_after"])
    p_path = export_onnx(pruned, out / "pruned.onnx", prep.channels, prep.input_size)
    save_torchscript(pruned, out / "pruned.ts", prep.channels, prep.input_size)
    check_parity(pruned, p_path, images)
    rows = [measure("pruned", p_path, costs["macs_after"], costs["params_after"])]
    if cfg.quantize.enabled:
        pq_path = quantize_int8(p_path, out / "pruned_int8.onnx", iter(calib), cfg.quantize.per_channel,
                                cfg.quantize.method, cfg.quantize.reduce_range)
        rows.append(measure("pruned+int8", pq_path, costs["macs_after"], costs["params_after"]))
    return rows, Source("pruned+", pruned, costs["macs_after"], costs["params_after"])


def _time_rows(rows: list[dict], prep: Preprocessing, cfg: CompressConfig) -> None:
    """Latency of every stage of one student at batch 1 and 32, in alternating rounds (compress/measure.py):
    each row gets the median, the range of the round medians, the machine's load, and its speed-up over the
    baseline with a verdict that is "faster"/"slower" only outside that range."""
    lat = cfg.latency
    runners = {r["stage"]: _runner(Path(r["file"]), lat.threads) for r in rows}
    before = machine_load()
    spreads = {}
    for batch, calls in ((1, lat.repeats_b1), (32, lat.repeats_b32)):
        x = random_input(batch, prep.channels, prep.input_size)
        spreads[batch] = timed_rounds({s: functools.partial(f, x) for s, f in runners.items()}, lat.rounds, calls,
                                      lat.warmup)
    after = machine_load()
    for r in rows:
        for batch in (1, 32):
            t = spreads[batch][r["stage"]]
            r.update({f"latency_b{batch}_ms": 1e3 * t.median, f"latency_b{batch}_ms_min": 1e3 * t.low,
                      f"latency_b{batch}_ms_max": 1e3 * t.high})
            metrics.LATENCY.labels(r["student"], r["stage"], str(batch)).set(t.median)
        if "baseline" in runners and r["stage"] != "baseline":
            r["speedup_b32"], r["speedup_b32_verdict"] = speedup(spreads[32]["baseline"], spreads[32][r["stage"]])
        r.update(latency_rounds=lat.rounds, load_1m_before=before["load_1m"], load_1m_after=after["load_1m"],
                 cpus=after["cpus"])
        log.info("%s %s: %.3f ms @1 (%.3f-%.3f), %.2f ms @32 (%.2f-%.2f)", r["student"], r["stage"],
                 r["latency_b1_ms"], r["latency_b1_ms_min"], r["latency_b1_ms_max"], r["latency_b32_ms"],
                 r["latency_b32_ms_min"], r["latency_b32_ms_max"])


def compress_one(cfg: CompressConfig, job: JobSpec, run_dir: Path, name: str, failures: list[dict]) -> list[dict]:
    """Every stage of one student. The pruned stages may fail alone (an architecture Torch-Pruning cannot follow):
    that is added to `failures` and the baseline's stages stand; any other error fails the student (raises)."""
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

    def measure(stage: str, path: Path, m: int, p: int) -> dict:
        return _measure(stage, name, path, vb, prep, cfg, m, p)

    rows = [measure("baseline", base, macs, params)]
    sources = [Source("", model, macs, params)]
    calib = calibration(job, v, cfg.quantize.calib_samples) if cfg.quantize.enabled else []
    if cfg.quantize.enabled:
        q = quantize_int8(base, out / "int8.onnx", iter(calib), cfg.quantize.per_channel, cfg.quantize.method,
                          cfg.quantize.reduce_range)
        rows.append(measure("int8", q, macs, params))
    if cfg.prune.enabled:
        try:
            p_rows, p_source = _pruned_stages(cfg, job, run_dir, name, v, model, measure, calib, images, out)
            rows, sources = rows + p_rows, sources + [p_source]
        except Exception as exc:  # the baseline's stages stand; the reason goes into the report
            raise_if_stopping()
            log.exception("%s: the pruned stages failed", name)
            failures.append(failure(name, "pruned", exc))
    qad = qad_stages(cfg, job, v, sources, calib, all_pixels[:256], out, measure,
                     lambda exc: failures.append(failure(name, "qad", exc))) if cfg.qad.enabled else []
    rows += [r for o in qad for r in o.rows]
    if cfg.litert.enabled:  # the QAD twins give their int8 .tflite (their fp32 one is checked, no stage)
        rows += litert_stages([s for s in sources if s.stem in cfg.litert.models] + [o.twin for o in qad], out,
                              measure, calib if cfg.quantize.enabled else [], all_pixels[:256], cfg.quantize.enabled)
    finish_qad_json(out, qad, all_pixels[:256])
    _time_rows(rows, prep, cfg)  # every stage in the same alternating rounds, once all of them exist
    (out / "preprocessing.json").write_text(json.dumps(prep.as_dict(), indent=1))
    return rows


def run(cfg: CompressConfig) -> CompressResult:
    t0 = time.perf_counter()
    rr = resolve_reduce_range(cfg.quantize.reduce_range)  # decided once, recorded in compress_config.resolved.yaml
    if cfg.quantize.enabled and cfg.quantize.reduce_range == "auto":
        log.info("quantize.reduce_range: auto -> %s (%s)", rr, "x86 without VNNI: 7-bit ONNX Runtime int8 weights"
                 if rr else "8-bit ONNX Runtime int8 weights")
    cfg = cfg.model_copy(update={"quantize": cfg.quantize.model_copy(update={"reduce_range": rr})})
    run_dir = Path(cfg.train_run).resolve()
    resolved = run_dir / "train_config.resolved.yaml"
    if not resolved.exists():
        raise FileNotFoundError(f"{resolved} not found: `train_run` must be the run_dir of a `distill train`")
    train_cfg = TrainConfig.model_validate(yaml.safe_load(resolved.read_text()))
    job = plan_job(train_cfg)
    if job.cache_dir is None:
        raise ValueError(f"{run_dir}: trained without a teacher cache; compress fine-tunes from the cache")
    selected = select_students(run_dir, cfg.select.top_n, cfg.select.by, cfg.select.students)
    check_students(cfg, job, run_dir, [r["variant"] for r in selected])  # exit 2 here, before any work
    begin_work()  # from here an error is "failed during the run" (exit 6), not "bad input" (core/run_phase.py)
    rows: list[dict] = []
    failures: list[dict] = []
    for r in selected:  # one student that cannot be compressed is reported; the others go on
        try:
            rows.extend(compress_one(cfg, job, run_dir, r["variant"], failures))
        except Exception as exc:
            raise_if_stopping()
            log.exception("%s: compression failed", r["variant"])
            failures.append(failure(r["variant"], "all", exc))
    out = Path(cfg.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    table = "\n\n".join(part for part in (
        format_table(rows), "\n".join(verdicts(rows, cfg.max_top1_drop, cfg.min_smaller, cfg.min_speedup)),
        format_failures(failures)) if part)
    (out / "report.txt").write_text(table + "\n")
    (out / "report.json").write_text(json.dumps(rows, indent=1))
    (out / "failures.json").write_text(json.dumps(failures, indent=1))
    (out / "compress_config.resolved.yaml").write_text(yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False))
    import pyarrow.parquet as pq

    trained = pq.read_table(run_dir / "leaderboard.parquet").to_pylist()
    plot = pareto_plot(trained, rows, out / "pareto.png")
    record_compress(cfg, rows, [plot, out / "report.txt", out / "report.json"])  # MLflow; never fails compress
    metrics.DURATION.set(time.perf_counter() - t0)
    log.info("compress done in %.1f s", time.perf_counter() - t0)
    return CompressResult(out_dir=out, rows=rows, table=table, plot=plot, failures=failures,
                          students=[r["variant"] for r in selected])
