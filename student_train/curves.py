"""`curves.png` beside the leaderboard: the sweep at a glance.

Left: val top-1 per epoch for every student; right: its training loss. Each undistilled twin is dashed in the colour
of the student it is compared with, so the gap KD makes is the gap between a solid line and its dashed twin; the
teacher's val top-1 (from the cache) is a grey line, the ceiling a student can approach.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from distill.core.atomic_io import atomic_write
from distill.student_train.leaderboard import read_metrics


def _series(rows: list[dict[str, Any]], key: str) -> tuple[list[float], list[float]]:
    pts = [(r["epoch"], r[key]) for r in rows if r.get("epoch") is not None and r.get(key) is not None]
    return [p[0] for p in pts], [p[1] for p in pts]


def plot_curves(run_dir: Path, students: list[str], twins: dict[str, str], teacher_top1: float | None,
                out: Path | None = None) -> Path | None:
    """Write the figure (default `<run_dir>/curves.png`, atomically); None when no student has a metrics row."""
    import matplotlib.pyplot as plt

    fig = curves_figure(run_dir, students, twins, teacher_top1)
    if fig is None:
        return None
    path = out or Path(run_dir) / "curves.png"
    atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=110, format="png"))
    plt.close(fig)
    return path


def curves_figure(run_dir: Path, students: list[str], twins: dict[str, str], teacher_top1: float | None) -> Any:
    """The matplotlib figure. `twins` maps a distilled student to its twin; a twin is drawn dashed in its
    student's colour, a student without a twin and an unpaired twin in colours of their own."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metrics = {n: read_metrics(Path(run_dir) / n / "metrics.csv") for n in students}
    if not any(metrics.values()):
        return None
    fig, (top1, loss) = plt.subplots(1, 2, figsize=(12, 4.5))
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    twin_of = {t: s for s, t in twins.items()}
    colour: dict[str, str] = {}
    for name in [n for n in students if n not in twin_of] + [n for n in students if n in twin_of]:
        colour[name] = colour.get(twin_of.get(name, ""), colours[len(colour) % len(colours)])
        style = "--" if name in twin_of else "-"
        label = f"{name} (twin of {twin_of[name]})" if name in twin_of else name
        for ax, key in ((top1, "val_top1"), (loss, "train_loss")):
            xs, ys = _series(metrics[name], key)
            if xs:
                ax.plot(xs, [100 * y for y in ys] if key == "val_top1" else ys, style, color=colour[name],
                        marker="o", markersize=3, label=label)
    if teacher_top1 is not None:
        top1.axhline(100 * teacher_top1, color="grey", linewidth=1.2, label=f"teacher {100 * teacher_top1:.1f}%")
    top1.set(title="val top-1 (%) per epoch", xlabel="epoch", ylabel="val top-1 (%)")
    loss.set(title="training loss per epoch", xlabel="epoch", ylabel="train loss")
    top1.legend(fontsize=7, loc="lower right")
    for ax in (top1, loss):
        ax.grid(alpha=0.3)
    fig.tight_layout()
    return fig
