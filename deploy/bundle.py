"""`distill deploy`: a self-describing bundle (fp32 + int8 ONNX, a LiteRT model, preprocessing, classes, model card)."""

from __future__ import annotations

import json
import logging
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import yaml

from distill.compress.onnx_export import ParityError, check_parity, session
from distill.core.run_phase import begin_work
from distill.deploy import metrics
from distill.deploy.bundle_files import agreement_text, new_version, publish, seal, write_file
from distill.deploy.choose import STAGE_FILES, choose_stage, rank_within_floor, top1_drop
from distill.deploy.config import DeployConfig
from distill.deploy.litert_bundle import choose_litert, litert_card
from distill.deploy.sample import pick_sample

log = logging.getLogger(__name__)


@dataclass
class DeployResult:
    bundle: Path
    student: str
    parity: dict
    card: Path
    stage: str = "baseline"
    refused: list[str] = field(default_factory=list)
    litert: str | None = None  # the .tflite in the bundle
    litert_reason: str | None = None  # why there is none
    sample: str | None = None  # a held-out image in the bundle (sample.png): what the printed curl sends
    sample_label: str | None = None
    sample_content_type: str | None = None


def _pick(cfg: DeployConfig, rows: list[dict]) -> str:
    students = sorted({r["student"] for r in rows})
    if cfg.student:
        if cfg.student not in students:
            failed = Path(cfg.compress_dir) / "failures.json"
            why = [f["reason"] for f in (json.loads(failed.read_text()) if failed.exists() else [])
                   if f["student"] == cfg.student]
            raise ValueError(f"student '{cfg.student}' was not compressed in {cfg.compress_dir}"
                             + (f" (its compression failed: {why[0]})" if why else "")
                             + f"; choose one of {students}")
        return cfg.student
    base = [r for r in rows if r["stage"] == "baseline"]
    return max(base, key=lambda r: r["val_top1"])["student"]


def _classes(cfg: DeployConfig, train_cfg: dict, num_classes: int) -> list[str]:
    if isinstance(cfg.classes, list):
        names = cfg.classes
    else:
        candidates = [Path(cfg.classes)] if cfg.classes else [
            Path(p).parent / "classes.json" for p in train_cfg["data"]["train_shards"]]
        found = next((p for p in candidates if p.exists()), None)
        names = json.loads(found.read_text()) if found else [str(i) for i in range(num_classes)]
    if len(names) != num_classes:
        raise ValueError(f"{len(names)} class names for a {num_classes}-class model; fix `classes`")
    return list(names)


def _val_images(src: Path, n: int) -> np.ndarray:
    data = np.load(src / "val_images.npy")
    return data[:n]


def _choice_text(stage: str, chosen: dict, rows: list[dict], notes: list[str], floor: float | None) -> str:
    parent = next(r for r in rows if r["stage"] == "baseline")
    text = (f"Stage `{stage}`: val top-1 {chosen['val_top1']:.4f}, {100 * top1_drop(chosen, parent):.1f} pt below "
            f"its parent (`baseline`, {parent['val_top1']:.4f}); accuracy floor "
            f"{'none' if floor is None else f'{100 * floor:.1f} pt'} (`deploy.max_top1_drop`).")
    return "\n".join([text, *(f"- {n}" for n in notes)])


def model_card(student: str, rows: list[dict], lineage: dict, parity: dict, prep: dict) -> str:
    """Markdown: what the model is, where it came from, what was measured and how."""
    table = ["| stage | runtime | val top-1 | teacher agreement | size MB | latency b1 ms | latency b32 ms | MMACs |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        table.append(f"| {r['stage']} | {r.get('runtime', 'onnxruntime')} | {r['val_top1']:.4f} | "
                     f"{r['teacher_agreement']:.4f} | {r['size_mb']:.3f} | "
                     f"{r['latency_b1_ms']:.3f} | {r['latency_b32_ms']:.2f} | {r['macs'] / 1e6:.2f} |")
    t = lineage["teacher"]
    return "\n".join([
        f"# Model card: {student}",
        "",
        f"Built {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())} by `distill deploy`.",
        "",
        "## Files",
        "- `model.onnx`: fp32, dynamic batch, input `input` (N, C, H, W float32, normalised), output `logits`.",
        "- `model.int8.onnx` (int8 stages only; `distill serve` then serves it): int8 static quantization "
        "(ONNX Runtime QDQ, per-channel weights), calibrated on cached training views.",
        "- `model.tflite` or `model.int8.tflite` (when the LiteRT checks passed): the LiteRT model for phones and "
        "boards, NHWC; see \"LiteRT\" below.",
        "- `preprocessing.json`: decode -> channels -> centre crop (crop_pct of the shorter side) -> resize -> "
        "normalise (with `source_channels`: decode with that many channels, then replicate the grey channel to "
        "`channels`); `classes.json`: class names by index.",
        "",
        "## Preprocessing",
        f"```json\n{json.dumps(prep, indent=1)}\n```",
        "",
        "## Lineage",
        f"- Teacher: `{t.get('arch')}` ({t.get('source')}), weights sha256 `{t.get('weights_sha256')}`, "
        f"checkpoint `{t.get('checkpoint')}`",
        f"- Teacher cache: `{lineage['cache_dir']}` (fingerprint `{lineage['fingerprint']}`)",
        f"- Training run: `{lineage['train_run']}`, variant `{student}`:",
        f"```yaml\n{lineage['variant_yaml']}```",
        f"- Compression: {lineage['compression']}",
        "",
        "## Which model this bundle ships",
        lineage["choice"],
        "",
        "## Measured (CPU, val split; runtime: ONNX Runtime, or the LiteRT interpreter with XNNPACK)",
        *table,
        "",
        f"Parity (fp32 ONNX vs PyTorch, {parity['samples']} real val images): max |dlogit| "
        f"{parity['max_abs_logit_diff']:.2e}, top-1 agreement {parity['top1_agreement']:.4f}; "
        f"int8 vs fp32 top-1 agreement {agreement_text(parity['int8_agreement'])}.",
        "Latency: median of alternating timing rounds after warm-up, on the machine that ran `distill compress` "
        "(its report.txt gives each range and the machine's load); MMACs: convolutions and matrix products.",
        "",
    ])


def qad_card(src: Path, stages: list[str]) -> list[str]:
    """The card's QAD section when a bundled model comes from quantization-aware distillation (compress/qad.py):
    how it was trained and how closely its int8 models compute what the fake-quant model trained ('' otherwise)."""
    qad = [s for s in stages if "qad+" in s]
    path = src / "qad.json"
    if not qad or not path.exists():
        return []
    info = json.loads(path.read_text())
    lines = ["## Quantization-aware distillation",
             f"Stage(s) {', '.join(f'`{s}`' for s in qad)}: the student fine-tuned with simulated int8 "
             f"({info['recipe']}) "
             "on the cached teacher soft labels and views (no teacher in memory), then quantized by the same recipe "
             "as the post-training int8 stages. `model.onnx` is its float twin (the QAD weights, BatchNorm folded)."]
    for entry in info["stages"]:
        v = entry["variant"]
        lines.append(f"- `{entry['stage']}`: {v['epochs']} epoch(s), lr {v['lr']:g}, mode {v['mode']}, alpha "
                     f"{v['alpha']:g}, T {v['temperature']:g}; calibrated on {entry['calibration_views']} cached "
                     "views. "
                     + "; ".join(f"fake-quant vs {k.removeprefix('fake_quant_vs_').replace('_', ' ')}: top-1 "
                                 f"agreement {a['top1_agreement']:.4f}, max |dlogit| {a['max_abs_logit_diff']:.3g}"
                                 for k, a in entry.items() if k.startswith("fake_quant_vs_")) + ".")
    return [*lines, ""]


def _parity(cfg: DeployConfig, fp32: Path, int8: Path | None, images: torch.Tensor) -> dict:
    """fp32 ONNX vs its PyTorch twin, and int8 vs fp32 agreement; raises ParityError beyond tolerance."""
    model = torch.jit.load(str(fp32.with_suffix(".ts")), map_location="cpu")
    p = check_parity(model, fp32, images, atol=cfg.parity_atol)
    parity: dict[str, float | int | None] = {"max_abs_logit_diff": p.max_abs_logit_diff,
                                              "top1_agreement": p.top1_agreement, "samples": p.samples}
    if int8 is not None:
        a = session(fp32).run(None, {"input": images.numpy()})[0].argmax(1)
        b = session(int8).run(None, {"input": images.numpy()})[0].argmax(1)
        agreement = float((a == b).mean())
        parity["int8_agreement"] = agreement
        if agreement < cfg.int8_min_agreement:
            raise ParityError(f"{int8}: int8 agrees with fp32 on only {agreement:.3f} of "
                              f"{len(a)} val images (need {cfg.int8_min_agreement}); recalibrate or deploy fp32")
    else:
        parity["int8_agreement"] = None  # no int8 model (null in bundle.json: strict JSON has no NaN)
    return parity



def _choose_onnx(cfg: DeployConfig, student: str, onnx_rows: list[dict], src: Path,
                 images: torch.Tensor) -> tuple[dict, list[str], dict, Path, Path | None]:
    """The served ONNX stage: within the floor, passing parity; (row, notes, parity, fp32, int8 or None)."""
    chosen, notes = choose_stage(onnx_rows, student, cfg.stage, cfg.max_top1_drop, cfg.pick_by)
    for note in notes:
        log.warning("%s: %s", student, note)
    rows = [r for r in onnx_rows if r["student"] == student]
    refused = {n.split(" ", 1)[0] for n in notes}
    fallbacks = rank_within_floor([r for r in rows if r["stage"] not in refused], cfg.pick_by)
    for row in [chosen] if cfg.stage != "auto" else fallbacks:
        fp32_name, int8_name = STAGE_FILES[row["stage"]]
        fp32, int8 = src / fp32_name, (src / int8_name if int8_name else None)
        try:
            return row, notes, _parity(cfg, fp32, int8, images), fp32, int8
        except ParityError as exc:  # auto: an int8 stage that disagrees with its fp32 model -> next candidate
            if cfg.stage != "auto" or row is fallbacks[-1]:
                raise
            notes.append(f"{row['stage']} refused: {exc}")
            log.warning("%s: %s; trying the next stage within the floor", student, exc)
    raise AssertionError("unreachable: the loop returns or raises")


def _lineage(cfg: DeployConfig, student: str, src_root: Path, ccfg: dict, choice: str) -> dict:
    train_run = Path(ccfg["train_run"])
    arch = json.loads((train_run / student / "arch.json").read_text())
    cache_dir = Path(arch["cache_dir"])
    manifest = json.loads((cache_dir / "manifest.json").read_text())
    return {"teacher": manifest.get("teacher", {}), "cache_dir": str(cache_dir),
            "fingerprint": manifest.get("fingerprint"), "train_run": str(train_run),
            "variant_yaml": (train_run / student / "variant.yaml").read_text(),
            "compression": json.dumps({k: ccfg[k] for k in ("prune", "quantize", "litert", "qad") if k in ccfg}),
            "choice": choice}


def run(cfg: DeployConfig) -> DeployResult:
    """Choose, check and write one bundle version, then make it the current one in a single atomic step."""
    t0 = time.perf_counter()
    src_root = Path(cfg.compress_dir)
    report = src_root / "report.json"
    if not report.exists():
        raise FileNotFoundError(f"{report} not found: `compress_dir` must be the out_dir of `distill compress`")
    all_rows = json.loads(report.read_text())
    onnx_rows = [r for r in all_rows if r.get("runtime", "onnxruntime") == "onnxruntime"]
    student = _pick(cfg, onnx_rows)
    rows = [r for r in all_rows if r["student"] == student]
    src = src_root / student
    ccfg = yaml.safe_load((src_root / "compress_config.resolved.yaml").read_text())
    train_cfg = yaml.safe_load((Path(ccfg["train_run"]) / "train_config.resolved.yaml").read_text())
    prep = json.loads((src / "preprocessing.json").read_text())
    images = torch.from_numpy(_val_images(src, cfg.val_images))
    chosen, notes, parity, fp32, int8 = _choose_onnx(cfg, student, onnx_rows, src, images)
    stage = chosen["stage"]
    log.info("parity: %s", parity)
    lite = choose_litert(cfg, src, rows, images.numpy())
    if lite.row is None:
        log.warning("%s: the bundle has no LiteRT model: %s", student, lite.reason)
    out = Path(cfg.out_dir)
    begin_work()  # from here an error is "failed during the run" (exit 6), not "bad input" (core/run_phase.py)
    version = new_version(out)
    try:
        write_file(version / "model.onnx", fp32)
        if int8 is not None:
            write_file(version / "model.int8.onnx", int8)
        if lite.row is not None and lite.name is not None and lite.source is not None:
            write_file(version / lite.name, lite.source)
        num_classes = int(session(version / "model.onnx").get_outputs()[0].shape[1])
        classes = _classes(cfg, train_cfg, num_classes)
        write_file(version / "classes.json", json.dumps(classes))
        sample = pick_sample(train_cfg, classes)
        if sample is not None:  # listed in bundle.json like every file (serve checks it, ignores it otherwise)
            write_file(version / sample.name, sample.data)
        write_file(version / "preprocessing.json", json.dumps(prep, indent=1))
        lineage = _lineage(cfg, student, src_root, ccfg,
                           _choice_text(stage, chosen, [r for r in onnx_rows if r["student"] == student], notes,
                                        cfg.max_top1_drop))
        calib = ccfg.get("quantize", {}).get("calib_samples")
        qad = qad_card(src, [stage, (lite.row or {}).get("stage", "")])
        write_file(version / "model_card.md", model_card(student, rows, lineage, parity, prep)
                   + "\n".join(qad + litert_card(lite, prep, calib)))
        seal(version, {"student": student, "stage": stage, "max_top1_drop": cfg.max_top1_drop, "refused": notes,
                       "parity": parity, "litert": {"file": lite.name, "stage": (lite.row or {}).get("stage"),
                                                    "parity": lite.parity, "io": lite.io, "refused": lite.notes,
                                                    "reason": lite.reason},
                       "sample": None if sample is None else {"file": sample.name, "label": sample.label,
                                                              "content_type": sample.content_type,
                                                              "source": sample.source}})
        publish(out, version, cfg.keep_versions)  # the one step that makes the new bundle visible
    except BaseException:
        shutil.rmtree(version, ignore_errors=True)  # never published: nothing points at it
        raise
    log.info("bundle %s -> %s", out, version)
    metrics.DURATION.set(time.perf_counter() - t0)
    metrics.PARITY.set(parity["max_abs_logit_diff"])
    return DeployResult(bundle=out, student=student, parity=parity, card=out / "model_card.md", stage=stage,
                        refused=notes, litert=lite.name, litert_reason=lite.reason,
                        sample=sample.name if sample else None, sample_label=sample.label if sample else None,
                        sample_content_type=sample.content_type if sample else None)
