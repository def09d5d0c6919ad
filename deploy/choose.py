"""Which compressed model a bundle ships: the smallest (or fastest) stage on the Pareto front within a floor.

Why a floor relative to the parent: a pruned student that lost 20 pt is smaller and faster, so a pure
size/speed pick would ship it. The floor (`deploy.max_top1_drop`) says how much val top-1 a stage may lose
against the student it was made from (its `baseline` row); stages below it are never bundled.
"""

from __future__ import annotations

from distill.compress.select import pareto_front
from distill.core.errors import InputError

# stage -> (fp32 ONNX file, int8 ONNX file or None); the fp32 file's TorchScript twin is <stem>.ts
STAGE_FILES: dict[str, tuple[str, str | None]] = {
    "baseline": ("baseline.onnx", None), "int8": ("baseline.onnx", "int8.onnx"),
    "pruned": ("pruned.onnx", None), "pruned+int8": ("pruned.onnx", "pruned_int8.onnx"),
    # quantization-aware distillation (compress/qad.py): the int8 model and its float twin (the QAD weights)
    "qad+int8": ("qad.onnx", "qad_int8.onnx"), "pruned+qad+int8": ("pruned_qad.onnx", "pruned_qad_int8.onnx")}


class FloorError(InputError):
    """A stage loses more val top-1 against its parent than `deploy.max_top1_drop` allows."""


def top1_drop(row: dict, parent: dict) -> float:
    return parent["val_top1"] - row["val_top1"]


def _floor_text(max_top1_drop: float | None) -> str:
    if max_top1_drop is None:
        return "deploy.max_top1_drop = none (no floor)"
    return f"deploy.max_top1_drop = {max_top1_drop:g} ({100 * max_top1_drop:.1f} pt)"


def within_floor(rows: list[dict], parent: dict, max_top1_drop: float | None) -> tuple[list[dict], list[str]]:
    """The rows within the accuracy floor below `parent` (None: no floor), and a note for each one refused."""
    limit = float("inf") if max_top1_drop is None else max_top1_drop + 1e-9
    ok = [r for r in rows if top1_drop(r, parent) <= limit]
    notes = [f"{r['stage']} refused: val top-1 {r['val_top1']:.4f} is {100 * top1_drop(r, parent):.1f} pt below "
             f"the parent's {parent['val_top1']:.4f}, beyond the floor {_floor_text(max_top1_drop)}"
             for r in rows if r not in ok]
    return ok, notes


def candidates(rows: list[dict], parent: dict, stage: str, max_top1_drop: float | None, pick_by: str = "size",
               what: str = "stage") -> tuple[list[dict], list[str]]:
    """The stages a bundle may take, best first, and a note for each one refused by the floor.

    `stage="auto"`: every stage within the floor, ranked (`rank_within_floor`). A named stage: just it, or
    ValueError when there is no such stage and FloorError (naming the floor) when it lies below the floor. The one
    rule for every kind of bundled model (the ONNX stage, the LiteRT model): `what` names the kind in errors.
    """
    ok, notes = within_floor(rows, parent, max_top1_drop)
    if stage == "auto":
        return rank_within_floor(ok, pick_by), notes
    row = next((r for r in rows if r["stage"] == stage), None)
    if row is None:
        raise ValueError(f"student '{parent['student']}' has no '{stage}' {what} in report.json; it has "
                         f"{[r['stage'] for r in rows]} (re-run `distill compress`, or use auto)")
    if row not in ok:
        raise FloorError(f"student '{parent['student']}' {what} '{stage}': val top-1 {row['val_top1']:.4f} is "
                         f"{100 * top1_drop(row, parent):.1f} pt below its parent's {parent['val_top1']:.4f}; "
                         f"the floor is {_floor_text(max_top1_drop)}. Choose a stage within it "
                         f"({[r['stage'] for r in ok]}, or auto) or raise the floor.")
    return [row], notes


def choose_stage(rows: list[dict], student: str, stage: str = "auto", max_top1_drop: float | None = 0.01,
                 pick_by: str = "size") -> tuple[dict, list[str]]:
    """(the chosen ONNX report row, notes on refused stages) for `student`: `candidates`' first."""
    mine = [r for r in rows if r["student"] == student]
    parent = next((r for r in mine if r["stage"] == "baseline"), None)
    if parent is None:
        raise ValueError(f"student '{student}' has no baseline row in report.json; re-run `distill compress`")
    ranked, notes = candidates(mine, parent, stage, max_top1_drop, pick_by)
    return ranked[0], notes


def rank_within_floor(ok: list[dict], pick_by: str = "size") -> list[dict]:
    """Stages within the floor, best first: the Pareto front by cost, then the rest (auto's fallbacks)."""
    keys = ("size_mb", "latency_b32_ms") if pick_by == "size" else ("latency_b32_ms", "size_mb")
    front = pareto_front(ok, cost=keys[0])
    order = sorted(front, key=lambda r: (r[keys[0]], r[keys[1]]))
    return order + sorted((r for r in ok if r not in order), key=lambda r: (r[keys[0]], r[keys[1]]))
