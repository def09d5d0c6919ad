"""The compression report: a table (baseline -> pruned -> int8) and a Pareto plot of every model."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.axes import Axes  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402
from matplotlib.lines import Line2D  # noqa: E402
from matplotlib.text import Annotation, Text  # noqa: E402
from matplotlib.transforms import Bbox  # noqa: E402


def _ms(r: dict, batch: int, digits: int) -> str:
    """Median latency with the range of the round medians: `0.047 (0.045-0.050)`."""
    key = f"latency_b{batch}_ms"
    if f"{key}_min" not in r:
        return f"{r[key]:.{digits}f}"
    return f"{r[key]:.{digits}f} ({r[key + '_min']:.{digits}f}-{r[key + '_max']:.{digits}f})"


def _speed(r: dict) -> str:
    """The batch-32 speed-up over the baseline; `~` when it lies within the spread of the rounds (not claimed)."""
    ratio = r.get("speedup_b32")
    if ratio is None:
        return "-"
    return f"{'~' if r.get('speedup_b32_verdict') == 'within spread' else ''}{ratio:.2f}x"


def format_table(rows: list[dict]) -> str:
    head = (f"{'student':28s} {'stage':18s} {'runtime':11s} {'top1':>7s} {'d top1':>7s} {'agree':>6s} {'size MB':>8s} "
            f"{'x smaller':>9s} {'ms @1 (range)':>21s} {'ms @32 (range)':>20s} {'speed-up':>8s} {'MMACs':>7s}")
    lines = [head, "-" * len(head)]
    base: dict[str, dict] = {}
    for r in rows:
        b = base.setdefault(r["student"], r)
        lines.append(f"{r['student'][:28]:28s} {r['stage']:18s} {r.get('runtime', 'onnxruntime'):11s} "
                     f"{r['val_top1']:7.4f} "
                     f"{100 * (r['val_top1'] - b['val_top1']):+6.2f}pt {r['teacher_agreement']:6.3f} "
                     f"{r['size_mb']:8.3f} {b['size_mb'] / r['size_mb']:8.2f}x {_ms(r, 1, 3):>21s} "
                     f"{_ms(r, 32, 2):>20s} {_speed(r):>8s} {r['macs'] / 1e6:7.2f}")
    return "\n".join(lines + [timing_note(rows)])


def failure(student: str, stage: str, exc: BaseException) -> dict:
    """One failure of the report: which student, which stages ("all": it has no row; "pruned": its pruned stages),
    and the error in one line."""
    reason = f"{exc.__class__.__name__}: {exc}".splitlines()[0][:400]
    return {"student": student, "stage": stage, "reason": reason}


def format_failures(failures: list[dict]) -> str:
    """The report's failure lines ('' when none): the other students' results above them stand."""
    lines = [f"FAILED {f['student']}: " + ("not compressed (no stage measured)" if f["stage"] == "all" else
                                          f"its {f['stage']} stages (the others are above)") + f": {f['reason']}"
             for f in failures]
    return "\n".join(lines)


def timing_note(rows: list[dict]) -> str:
    """How the latencies were taken and how busy the machine was: a reader can tell a quiet run from a loaded one."""
    r = rows[0] if rows else {}
    if "latency_rounds" not in r:
        return ""
    return (f"latency: median of {r['latency_rounds']} rounds, the stages' order alternating each round (range of "
            f"the round medians in brackets); ~ marks a speed-up within that range: not claimed. Machine load "
            f"(1-min average) {r['load_1m_before']:.2f} before timing, {r['load_1m_after']:.2f} after, "
            f"{r['cpus']} CPUs (load above the CPUs: the timings are not the machine's).")


def _gains(r: dict, base: dict) -> tuple[float, float, float, str]:
    """(top-1 drop in points, x smaller, x faster at batch 32, speed verdict) against the parent (baseline) row."""
    verdict = r.get("speedup_b32_verdict", "faster" if r["latency_b32_ms"] < base["latency_b32_ms"] else "slower")
    return (100 * (base["val_top1"] - r["val_top1"]), base["size_mb"] / r["size_mb"],
            base["latency_b32_ms"] / r["latency_b32_ms"], verdict)


def _describe(stage: str, d: float, x: float, f: float, verdict: str) -> str:
    speed = (f"{f:.2f}x faster" if verdict == "faster" else f"{1 / f:.2f}x slower" if verdict == "slower"
             else f"no measurable speed-up ({f:.2f}x, within the spread of the timing rounds)")
    return f"{stage} {-d:+.1f} pt, {x:.2f}x smaller, {speed}"


def verdicts(rows: list[dict], max_top1_drop: float, min_smaller: float, min_speedup: float) -> list[str]:
    """One sentence per student: which stage meets the goals, or, in words, why compression does not pay. A stage
    meets the speed goal only when its speed-up is outside the spread of the timing rounds."""
    out = []
    floor = f"floor {100 * max_top1_drop:.1f} pt, goals >= {min_smaller:g}x smaller and >= {min_speedup:g}x faster"
    for student in dict.fromkeys(r["student"] for r in rows):
        mine = [r for r in rows if r["student"] == student]
        base = next((r for r in mine if r["stage"] == "baseline"), mine[0])
        stats = {r["stage"]: _gains(r, base) for r in mine if r is not base}
        desc = {s: _describe(s, *g) for s, g in stats.items()}
        pays = [s for s, (d, x, f, v) in stats.items() if d <= 100 * max_top1_drop + 1e-9 and x >= min_smaller
                and f >= min_speedup and v == "faster"]
        if pays:
            out.append(f"{student}: compression pays ({floor}): " + "; ".join(desc[s] for s in pays) + ".")
            continue
        within = [s for s, (d, _, _, _) in stats.items() if d <= 100 * max_top1_drop + 1e-9]
        lost = [s for s in stats if s not in within]
        words = [f"{student}: compression does not pay ({floor})."]
        if lost:
            words.append("Below the floor: " + "; ".join(desc[s] for s in lost) + ".")
        if within:
            words.append("Within the floor but short of the size/speed goals: "
                         + "; ".join(desc[s] for s in within) + ".")
        if any(s.startswith("pruned") for s in lost):
            words.append("Pruning does not pay at this ratio and schedule: prune less (prune.ratio), in more "
                         "steps (prune.steps) or fine-tune longer (prune.finetune_epochs).")
        out.append(" ".join(words))
    return out


MARKERS = {"baseline": "o", "int8": "s", "pruned": "^", "pruned+int8": "*", "litert": "D", "litert+int8": "P",
           "pruned+litert": "v", "pruned+litert+int8": "X", "qad+int8": "p", "qad+litert+int8": "h",
           "pruned+qad+int8": "<", "pruned+qad+litert+int8": ">"}


def _dodge(stages: list[str], step: float) -> dict[str, float]:
    """Horizontal offsets (data units) for the stages that share one MAC count, so no marker hides another."""
    return {s: (i - (len(stages) - 1) / 2) * step for i, s in enumerate(stages)}


def _place_labels(fig: Figure, ax: Axes, texts: list[tuple[float, float, str]]) -> list[Annotation]:
    """Annotations at (x, y), each moved up or down (alternately, further each try) until its box overlaps no
    marker and no label placed before it; a thin line leads back to its point when it had to move."""
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()  # type: ignore[attr-defined]
    half = 5 * fig.dpi / 72  # a marker's half width (points -> pixels)
    placed: list[Bbox] = [Bbox.from_extents(px - half, py - half, px + half, py + half)
                          for px, py in ax.transData.transform([(x, y) for x, y, _ in texts])]
    out: list[Annotation] = []
    for x, y, text in texts:
        for attempt in range(200):
            dy = 8.0 * ((attempt + 1) // 2) * (-1 if attempt % 2 else 1)
            a = ax.annotate(text, (x, y), xytext=(7, dy - 3), textcoords="offset points", fontsize=6,
                            arrowprops={"arrowstyle": "-", "lw": 0.4, "color": "0.5"} if dy else None)
            a.update_positions(renderer)
            box = Text.get_window_extent(a, renderer)  # the text alone, not its leader line
            if not any(box.overlaps(b) for b in placed):
                break
            a.remove()
        placed.append(box)
        out.append(a)
    return out


def pareto_figure(trained: list[dict], compressed: list[dict]) -> Figure:
    """Val top-1 against MACs: every trained student, and each compression stage of each compressed student, one
    marker per stage (stages that share a MAC count sit side by side), labels that never overprint."""
    fig, ax = plt.subplots(figsize=(9.5, 5))
    done = [r for r in trained if r.get("val_top1") is not None and r.get("macs") is not None]
    xs = [r["macs"] / 1e6 for r in done + compressed] or [1.0]
    step = 0.015 * max(max(xs) - min(xs), 0.2 * max(xs))  # a marker's width apart, whatever the axis spans
    ax.scatter([r["macs"] / 1e6 for r in done], [r["val_top1"] for r in done], c="tab:blue", s=25, zorder=2)
    labels: list[tuple[float, float, str]] = [(r["macs"] / 1e6, r["val_top1"], r["variant"]) for r in done]
    colors = {s: f"C{i % 10}" for i, s in enumerate(MARKERS)}
    for student in dict.fromkeys(r["student"] for r in compressed):
        mine = [r for r in compressed if r["student"] == student]
        for macs in dict.fromkeys(r["macs"] for r in mine):
            same = [r for r in mine if r["macs"] == macs]
            offsets = _dodge([r["stage"] for r in same], step)
            for r in same:
                x = macs / 1e6 + offsets[r["stage"]]
                ax.scatter([x], [r["val_top1"]], marker=MARKERS.get(r["stage"], "o"), s=60, zorder=3,
                           color=colors.get(r["stage"], "C9"), edgecolors="k", linewidths=0.5)
                labels.append((x, r["val_top1"], f"{r['stage']}: {r['latency_b1_ms']:.3f} ms"))
    handles = [Line2D([], [], marker="o", ls="", color="tab:blue", label="trained students")]
    handles += [Line2D([], [], marker=MARKERS[s], ls="", color=colors[s], markeredgecolor="k",
                       label=f"{s} ({'LiteRT' if 'litert' in s else 'ONNX Runtime'})")
                for s in MARKERS if any(r["stage"] == s for r in compressed)]
    ax.set_xlabel("MMACs per image (convolutions + matrix products)")
    ax.set_ylabel("val top-1")
    ax.set_title("accuracy vs cost (labels: stage, median batch-1 latency)")
    ax.legend(handles=handles, fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))  # outside: hides no point
    ax.grid(alpha=0.3)
    ax.margins(x=0.3, y=0.25)
    fig.tight_layout()
    _place_labels(fig, ax, labels)
    return fig


def pareto_plot(trained: list[dict], compressed: list[dict], path: Path) -> Path:
    """pareto.png: `pareto_figure` written at 120 dpi."""
    fig = pareto_figure(trained, compressed)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
