"""Which LiteRT model a bundle carries (for phones and boards, next to the ONNX models it serves), and its card.

Rules: the smallest (pick_by) LiteRT stage within the accuracy floor against the parent student, whose fp32
.tflite agrees with the PyTorch model in the LiteRT interpreter (top-1 on >= litert_min_agreement of the val
images, max |dlogit| <= litert_parity_atol) and, for int8, whose int8 model agrees with that fp32 .tflite. A
named `litert_stage` that fails is refused with the reason (deploy fails); in auto mode the next candidate is
tried and, when none passes, the ONNX bundle ships without a LiteRT model and says why.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from distill.compress.litert_stages import litert_files
from distill.compress.litert_stages import litert_parity as measure_parity
from distill.compress.onnx_export import ParityError
from distill.deploy.bundle_files import agreement_text
from distill.deploy.choose import candidates
from distill.deploy.config import DeployConfig

log = logging.getLogger(__name__)


@dataclass
class LiteRTChoice:
    row: dict | None = None
    source: Path | None = None  # the .tflite to bundle
    name: str | None = None  # its name in the bundle
    parity: dict = field(default_factory=dict)
    io: dict = field(default_factory=dict)
    calibration: dict = field(default_factory=dict)  # how the int8 ranges were calibrated (litert.json)
    notes: list[str] = field(default_factory=list)
    reason: str | None = None  # why the bundle has no LiteRT model


def litert_parity(cfg: DeployConfig, src: Path, stage: str, images: np.ndarray) -> dict:
    """fp32 .tflite vs the PyTorch model (its TorchScript twin), then int8 vs fp32; ParityError beyond tolerance."""
    import torch

    from distill.compress.litert_run import LiteRTModel

    fp32_name, int8_name, ts = litert_files(stage)
    fp32 = src / fp32_name
    p = measure_parity(torch.jit.load(str(src / ts), map_location="cpu"), fp32, images)
    if p["max_abs_logit_diff"] > cfg.litert_parity_atol or p["top1_agreement"] < cfg.litert_min_agreement:
        raise ParityError(f"{fp32}: the LiteRT model differs from PyTorch on {p['samples']} real val images: max "
                          f"|dlogit| {p['max_abs_logit_diff']:.3g} (tolerance deploy.litert_parity_atol = "
                          f"{cfg.litert_parity_atol}), top-1 agreement {p['top1_agreement']:.4f} (need "
                          f"deploy.litert_min_agreement = {cfg.litert_min_agreement}); it is not bundled. Re-run "
                          "`distill compress`; if it persists, litert-torch converts an operator of this model wrongly "
                          "(report it upstream with the model)")
    p["int8_agreement"] = None  # no int8 model (null in bundle.json: strict JSON has no NaN)
    if int8_name:
        a = LiteRTModel(fp32)(images).argmax(1)
        b = LiteRTModel(src / int8_name)(images).argmax(1)
        p["int8_agreement"] = float((a == b).mean())
        if p["int8_agreement"] < cfg.int8_min_agreement:
            raise ParityError(f"{src / int8_name}: LiteRT int8 agrees with its fp32 model on only "
                              f"{p['int8_agreement']:.3f} of {len(a)} val images (need deploy.int8_min_agreement = "
                              f"{cfg.int8_min_agreement}); recalibrate or ship the fp32 LiteRT model")
    return p


def _candidates(cfg: DeployConfig, rows: list[dict], notes: list[str]) -> list[dict]:
    parent = next(r for r in rows if r["stage"] == "baseline")
    mine = [r for r in rows if r.get("runtime") == "litert"]
    ranked, refused = candidates(mine, parent, cfg.litert_stage, cfg.max_top1_drop, cfg.pick_by, "LiteRT stage")
    notes += refused
    return ranked


def choose_litert(cfg: DeployConfig, src: Path, rows: list[dict], images: np.ndarray) -> LiteRTChoice:
    """The LiteRT model to bundle for one student (rows: its report rows), or why there is none."""
    if cfg.litert_stage == "none":
        return LiteRTChoice(reason="deploy.litert_stage is none")
    status_file = src / "litert.json"
    status = json.loads(status_file.read_text()) if status_file.exists() else {}
    notes: list[str] = []
    candidates = _candidates(cfg, rows, notes)
    if not candidates:
        why = status.get("reason") or ("; ".join(notes) if notes else f"{status_file} missing: re-run `distill "
                                                                         "compress` with pip install -e '.[litert]'")
        return LiteRTChoice(notes=notes, reason=why)
    from distill.compress.litert_run import litert_available

    missing = litert_available()
    if missing:
        if cfg.litert_stage != "auto":
            raise ValueError(f"deploy.litert_stage '{cfg.litert_stage}' needs the LiteRT runtime to check parity: "
                             f"{missing}")
        return LiteRTChoice(notes=notes, reason=f"parity cannot be checked here: {missing}")
    for row in candidates:
        try:
            parity = litert_parity(cfg, src, row["stage"], images)
        except ParityError as exc:
            if cfg.litert_stage != "auto":
                raise
            notes.append(f"{row['stage']} refused: {exc}")
            log.warning("LiteRT %s", notes[-1])
            continue
        fp32_name, int8_name, _ = litert_files(row["stage"])
        name = "model.int8.tflite" if int8_name else "model.tflite"
        return LiteRTChoice(row=row, source=src / (int8_name or fp32_name), name=name, parity=parity,
                            io=status.get("io", {}).get(row["stage"], {}), notes=notes,
                            calibration=status.get("calibration") or {})
    return LiteRTChoice(notes=notes, reason="no LiteRT model passed parity: " + "; ".join(notes))


def _quantization(choice: LiteRTChoice, calib_samples: int | None) -> str:
    inp, out = choice.io.get("input", {}), choice.io.get("output", {})
    if inp.get("dtype") != "int8":
        return "none: float32 throughout."
    cal = choice.calibration
    views = cal.get("views", calib_samples)
    method = cal.get("method", "ai-edge-quantizer's moving average of per-call min/max (before issue 29)")
    return (f"full-integer int8 (ai-edge-quantizer: weights int8 per output channel; activations, input and output "
            f"int8). Ranges: {method}, on {views} cached training views. Input: q = clip(round(x / "
            f"{inp.get('scale'):.6g}) + ({inp.get('zero_point')}), -128, 127); output: logits = "
            f"{out.get('scale'):.6g} * (q - ({out.get('zero_point')})).")


def litert_card(choice: LiteRTChoice, prep: dict, calib_samples: int | None) -> list[str]:
    """The model card's LiteRT section: file, layout, dtype, quantization parameters, preprocessing, how to run."""
    if choice.row is None:
        return ["## LiteRT (phones, boards)", f"No LiteRT model in this bundle: {choice.reason}", ""]
    io, r, p = choice.io, choice.row, choice.parity
    inp, out = io.get("input", {}), io.get("output", {})
    int8 = inp.get("dtype") == "int8"
    size, ch = prep["input_size"], prep["channels"]
    batch = ("the batch can be resized" if io.get("batch_resizable", True)
             else "batch fixed at 1: the graph flattens the whole image, run one image per call")
    feed = ("s, z = inp['quantization']; x = np.clip(np.round(x / s) + z, -128, 127).astype(np.int8)\n"
            if int8 else "")
    read = ("s, z = out['quantization']; logits = s * (logits.astype(np.float32) - z)\n" if int8 else "")
    return [
        "## LiteRT (phones, boards)",
        f"- `{choice.name}`: stage `{r['stage']}`, {r['size_mb']:.3f} MB, val top-1 {r['val_top1']:.4f} in the "
        f"LiteRT interpreter, {r['latency_b1_ms']:.3f} ms at batch 1 (XNNPACK, CPU). Converted from PyTorch by "
        "litert-torch.",
        f"- Input `{inp.get('name')}`: **NHWC** ({', '.join(map(str, [1, size, size, ch]))}; {batch}), dtype "
        f"{inp.get('dtype', 'float32')}. Output `{out.get('name')}`: logits ({out.get('dtype', 'float32')}). "
        f"Signature `serving_default`: {json.dumps(io.get('signatures', {}).get('serving_default', {}))}.",
        f"- Quantization: {_quantization(choice, calib_samples)}",
        "- Preprocessing: exactly `preprocessing.json` (as for the ONNX models), then transpose (C, H, W) -> "
        "(H, W, C).",
        f"- Parity: fp32 LiteRT vs PyTorch on {p.get('samples')} real val images: max |dlogit| "
        f"{p.get('max_abs_logit_diff', float('nan')):.2e}, top-1 agreement {p.get('top1_agreement', float('nan')):.4f}"
        f"; int8 vs fp32 top-1 agreement {agreement_text(p.get('int8_agreement'))}.",
        "- Run it (Python; Android/iOS use the same tensors through the LiteRT Interpreter API):",
        "```python\nimport numpy as np\nfrom ai_edge_litert.interpreter import Interpreter\n"
        f"it = Interpreter(model_path='{choice.name}'); it.allocate_tensors()\n"
        "inp, out = it.get_input_details()[0], it.get_output_details()[0]\n"
        "x = preprocessed_chw.transpose(1, 2, 0)[None].astype(np.float32)  # NHWC\n"
        f"{feed}it.set_tensor(inp['index'], x); it.invoke(); logits = it.get_tensor(out['index'])\n{read}```",
        *(f"- {n}" for n in choice.notes),
        ""]
