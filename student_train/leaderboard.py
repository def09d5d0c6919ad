"""The leaderboard of a training run: one row per variant, from the files each variant wrote."""

from __future__ import annotations

import csv
import math
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from distill.student_train.config import VariantConfig
from distill.student_train.status import read_status
from distill.student_train.student_check import StudentCost
from distill.student_train.test_split import read_test
from distill.teacher_cache.contract import CacheReader


def read_metrics(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    with open(path) as f:
        return [{k: (float(v) if v not in ("", None) else None) for k, v in row.items()} for row in csv.DictReader(f)]


def variant_row(run_dir: Path, name: str, v: VariantConfig, cost: StudentCost | None,
                per_epoch: tuple[int, int] = (0, 0)) -> dict:
    """One leaderboard row from the files the variant wrote (any status: a failed variant gets its row with the
    reason); `cost` was measured at planning (student_check), `per_epoch` = (labelled, unlabelled) rows this
    variant trains on per epoch."""
    out = Path(run_dir) / name
    status = read_status(run_dir, name) or {"status": "not run"}  # a damaged file is reported, not a crash
    rows = read_metrics(out / "metrics.csv")
    best = max(rows, key=lambda r: (r.get("val_top1") or -1, r.get("val_teacher_agreement") or -1), default={})
    params, macs = (cost.params, cost.macs) if cost is not None else (None, None)
    test = read_test(out) if status["status"] == "done" else {}
    return {"variant": name, "status": status["status"], "group": status.get("group"), "arch": v.arch,
            "init_checkpoint": str(v.init_checkpoint) if v.init_checkpoint else None,
            "mode": v.mode, "loss": v.make_loss().describe(),
            "alpha": v.alpha if v.mode != "none" and v.loss is None else None,  # null where the loss does not use it
            "temperature": v.temperature if v.mode not in ("none", "hard") and v.loss is None else None,
            "epochs": len(rows), "val_top1": best.get("val_top1"),
            "val_top5": best.get("val_top5"), "val_teacher_agreement": best.get("val_teacher_agreement"),
            "val_samples": int(best["val_samples"]) if best.get("val_samples") else None,
            "test_top1": test.get("test_top1"), "test_top5": test.get("test_top5"),
            "test_samples": int(test["test_samples"]) if test.get("test_samples") else None,
            "compared_on": None, "twin": None, "delta_top1_vs_twin": None, "labelled_samples": per_epoch[0] * len(rows),
            "unlabelled_samples": per_epoch[1] * len(rows), "params": params, "macs": macs,
            "samples_per_s": (sum(r["samples_per_s"] for r in rows) / len(rows)) if rows else None,
            "wall_seconds": rows[-1].get("wall_seconds") if rows else None, "reason": status.get("reason", "")}


def comparison_split(r: dict, twin: dict) -> str:
    """Where a student is compared with its twin: the held-out test split when both were scored on it, else val
    (the split that chose both best epochs: a flattering maximum, said in the output)."""
    return "test" if r.get("test_top1") is not None and twin.get("test_top1") is not None else "val"


def add_twin_deltas(rows: list[dict], twins: dict[str, str]) -> list[dict]:
    """Fill `twin`, `compared_on` and `delta_top1_vs_twin` (points of top-1 on that split, distilled minus twin)
    of distilled rows."""
    by_name = {r["variant"]: r for r in rows}
    out = []
    for r in rows:
        r = dict(r)
        twin = by_name.get(twins.get(r["variant"], ""))
        if twin is not None:
            split = comparison_split(r, twin)
            key = f"{split}_top1"
            r["twin"], r["compared_on"] = twin["variant"], split
            both = r["status"] == twin["status"] == "done" and None not in (r[key], twin[key])
            r["delta_top1_vs_twin"] = round(100 * (r[key] - twin[key]), 4) if both else None
        out.append(r)
    return out


def twin_pairs(rows: list[dict]) -> list[dict]:
    """Distilled variants with a twin, best distilled student (by val: the selection split) first; pairs without a
    delta last. `top1`/`twin_top1`/`samples` are on the split they are compared on (`compared_on`)."""
    by_name = {r["variant"]: r for r in rows}
    pairs = []
    for r in rows:
        twin = by_name.get(r.get("twin") or "")
        if twin is None:
            continue
        split = r.get("compared_on") or "val"
        pairs.append({"variant": r["variant"], "val_top1": r["val_top1"], "twin": r["twin"],
                      "twin_val_top1": twin["val_top1"], "delta_top1_vs_twin": r["delta_top1_vs_twin"],
                      "val_samples": twin.get("val_samples"), "compared_on": split,
                      "test_top1": r.get("test_top1"), "twin_test_top1": twin.get("test_top1"),
                      "top1": r.get(f"{split}_top1"), "twin_top1": twin.get(f"{split}_top1"),
                      "samples": twin.get(f"{split}_samples")})
    return sorted(pairs, key=lambda p: (p["delta_top1_vs_twin"] is None, -(p["val_top1"] or -1)))


def noise_pt(top1: float | None, n: int | None) -> float | None:
    """One binomial standard error of a val top-1 measured on n images, in points (None when n is unknown)."""
    if top1 is None or not n:
        return None
    return 100 * math.sqrt(top1 * (1 - top1) / n)


def twin_verdict(d: float | None, noise: float | None) -> str:
    """Words for a Δ top-1 (points) against the twin; a |Δ| within one standard error of the twin's top-1 on the
    compared split is called noise, not a win: one seed on 500 digits at 96% moves by ±0.9 pt."""
    if d is None:
        return "n/a (not both done)"
    if d == 0:
        return "tie"
    if noise is not None and abs(d) <= noise:
        side = "distilled" if d > 0 else "twin"
        return f"{side} ahead within noise (±{noise:.1f} pt on one seed: compare over seeds)"
    return "distillation wins" if d > 0 else "twin wins: KD did not pay"


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.2f}%"


def format_twin_comparison(pairs: list[dict]) -> str:
    """One line per distilled variant against its undistilled twin (input: `twin_pairs`), on the held-out test
    split when there is one (the verdict and its noise band too), with the val top-1 (best epoch) beside it."""
    if not pairs:
        return "no distilled variant with an undistilled twin (train.twins: false, or no distilled variant)"
    on_test = all(p.get("compared_on") == "test" for p in pairs)
    where = ("top-1 on the held-out test split (best.pt chosen on val; val in brackets)" if on_test else
             "val top-1 at each best epoch: the split that chose them (no test split: data.test_shards)")
    lines = [f"distilled student vs its undistilled twin (same arch, epochs, optimizer, schedule, views, seed), "
             f"{where}:"]
    for p in pairs:
        d = p["delta_top1_vs_twin"]
        split = p.get("compared_on") or "val"
        top, ttop = p["top1"], p["twin_top1"]
        verdict = twin_verdict(d, noise_pt(ttop, p["samples"]))
        delta = "" if d is None else f"  {d:+.2f} pt"
        val = f"  (val {_pct(p['val_top1'])} vs {_pct(p['twin_val_top1'])})" if split == "test" else ""
        lines.append(f"  {p['variant']:28s} {_pct(top):>7s}  vs {p['twin']:22s} {_pct(ttop):>7s}{delta}  "
                     f"{verdict}{val}")
    return "\n".join(lines)


def teacher_val_top1(cache_dir: Path | None, val_stems: list[str]) -> tuple[float, int] | None:
    """(top-1, labelled rows) of the cached teacher on the val shards: its view-0 top-1 class against the label.
    None without a cache or without labelled val rows."""
    if cache_dir is None or not val_stems:
        return None
    reader = CacheReader(cache_dir, verify=False)  # checked once already by the join check of this run
    n = correct = 0
    for stem in val_stems:
        a = reader.arrays(stem)
        has = a.labels >= 0
        n += int(has.sum())
        correct += int((a.topk_ids[has, 0, 0] == a.labels[has]).sum())
    return (correct / n, n) if n else None


def format_teacher_line(teacher: tuple[float, int] | None, test: tuple[float, int] | None = None) -> str:
    if teacher is None:
        return "teacher: val top-1 n/a (no teacher cache, or no labelled val shards in it)"
    line = f"teacher: {100 * teacher[0]:.2f}% val top-1 on {teacher[1]} labelled val images"
    if test is not None:
        line += f", {100 * test[0]:.2f}% test top-1 on {test[1]} labelled test images"
    return line + " (its cached view 0)"


def teacher_warning(teacher: tuple[float, int] | None, rows: list[dict]) -> str | None:
    """A warning when the teacher's val top-1 is below the best student's by more than one standard error: its soft
    labels then teach its mistakes, and no distilled student can be expected to gain from it."""
    done = [r for r in rows if r["status"] == "done" and r["val_top1"] is not None]
    if teacher is None or not done:
        return None
    best = max(done, key=lambda r: r["val_top1"])
    gap = 100 * (best["val_top1"] - teacher[0])
    if gap <= (noise_pt(teacher[0], teacher[1]) or 0.0):
        return None
    return (f"warning: the teacher ({100 * teacher[0]:.2f}% val top-1 on {teacher[1]} labelled val images) is "
            f"{gap:.1f} pt below its best student {best['variant']} ({100 * best['val_top1']:.2f}%): distilling "
            "from it teaches its mistakes. Check the teacher (its training and checkpoint, and for a foreign "
            "teacher teacher.preprocessing.crop_pct, which decides its evaluation view) before trusting KD here.")


def write_leaderboard(run_dir: Path, rows: list[dict]) -> Path:
    rows = sorted(rows, key=lambda r: (r["status"] != "done", -(r["val_top1"] or -1)))
    table = pa.Table.from_pylist(rows, schema=pa.schema([
        ("variant", pa.string()), ("status", pa.string()), ("group", pa.string()), ("arch", pa.string()),
        ("init_checkpoint", pa.string()), ("mode", pa.string()),
        ("alpha", pa.float64()), ("temperature", pa.float64()), ("epochs", pa.int64()), ("val_top1", pa.float64()),
        ("val_top5", pa.float64()), ("val_samples", pa.int64()), ("val_teacher_agreement", pa.float64()),
        ("test_top1", pa.float64()), ("test_top5", pa.float64()), ("test_samples", pa.int64()),
        ("compared_on", pa.string()), ("twin", pa.string()),
        ("delta_top1_vs_twin", pa.float64()), ("labelled_samples", pa.int64()), ("unlabelled_samples", pa.int64()),
        ("params", pa.int64()),
        ("macs", pa.int64()), ("samples_per_s", pa.float64()), ("wall_seconds", pa.float64()),
        ("reason", pa.string())]))
    path = Path(run_dir) / "leaderboard.parquet"
    pq.write_table(table, path)
    return path


def format_leaderboard(rows: list[dict]) -> str:
    def f(x: Any, fmt: str) -> str:
        return "-" if x is None else format(x, fmt)

    head = f"{'variant':40s} {'status':8s} {'mode':6s} {'a':>4s} {'T':>4s} {'top1':>6s} {'top5':>6s} {'test1':>6s} " \
           f"{'agree':>6s} {'twin':22s} {'vs twin':>7s} {'labelled':>9s} {'unlab.':>8s} " \
           f"{'params':>8s} {'MMACs':>7s} {'samp/s':>7s} {'wall s':>7s} {'group':5s}"
    lines = [head, "-" * len(head)]
    for r in sorted(rows, key=lambda r: (r["status"] != "done", -(r["val_top1"] or -1))):
        lines.append(f"{r['variant'][:40]:40s} {r['status'][:8]:8s} {r['mode']:6s} {f(r['alpha'], '4.2f'):>4s} "
                     f"{f(r['temperature'], '4.1f'):>4s} {f(r['val_top1'], '6.4f'):>6s} {f(r['val_top5'], '6.4f'):>6s} "
                     f"{f(r.get('test_top1'), '6.4f'):>6s} "
                     f"{f(r['val_teacher_agreement'], '6.4f'):>6s} {(r.get('twin') or '-')[:22]:22s} "
                     f"{f(r.get('delta_top1_vs_twin'), '+7.2f'):>7s} {f(r.get('labelled_samples'), '9d'):>9s} "
                     f"{f(r.get('unlabelled_samples'), '8d'):>8s} {f(r['params'], '8d'):>8s} "
                     f"{f(r['macs'] and r['macs'] / 1e6, '7.2f'):>7s} "
                     f"{f(r['samples_per_s'], '7.1f'):>7s} {f(r['wall_seconds'], '7.1f'):>7s} "
                     f"{(r.get('group') or '-')[:5]:5s}")
        if r["reason"]:
            lines.append(f"    reason: {r['reason']}")
        if r.get("init_checkpoint"):
            lines.append(f"    started from: {r['init_checkpoint']}")
    return "\n".join(lines)
