"""curves.png: every student's val top-1 and training loss per epoch, each twin dashed in its student's colour, the
teacher as a line."""

import csv

from PIL import Image

from distill.student_train.curves import curves_figure, plot_curves


def _metrics(run_dir, name, top1, loss):
    (run_dir / name).mkdir(parents=True)
    with open(run_dir / name / "metrics.csv", "w", newline="") as f:
        w = csv.DictWriter(f, ["epoch", "train_loss", "val_top1"])
        w.writeheader()
        for e, (a, b) in enumerate(zip(top1, loss, strict=True), 1):
            w.writerow({"epoch": e, "train_loss": b, "val_top1": a})


def test_twins_are_dashed_in_their_students_colour_and_the_teacher_is_a_line(tmp_path):
    _metrics(tmp_path, "kd", [0.5, 0.7, 0.8], [2.0, 1.2, 0.9])
    _metrics(tmp_path, "kd-noKD", [0.4, 0.55, 0.6], [2.1, 1.5, 1.3])
    _metrics(tmp_path, "other", [0.3, 0.4, 0.45], [2.2, 1.9, 1.8])
    fig = curves_figure(tmp_path, ["kd", "kd-noKD", "other"], {"kd": "kd-noKD"}, 0.9)
    top1, loss = fig.axes
    lines = {ln.get_label(): ln for ln in top1.get_lines()}
    assert lines["kd"].get_linestyle() == "-" and lines["kd-noKD (twin of kd)"].get_linestyle() == "--"
    assert lines["kd"].get_color() == lines["kd-noKD (twin of kd)"].get_color() != lines["other"].get_color()
    assert list(lines["kd"].get_ydata()) == [50.0, 70.0, 80.0]  # percent, per epoch
    assert list(lines["teacher 90.0%"].get_ydata()) == [90.0, 90.0]  # a horizontal line
    assert [list(ln.get_ydata()) for ln in loss.get_lines()][0] == [2.0, 1.2, 0.9]
    path = plot_curves(tmp_path, ["kd", "kd-noKD", "other"], {"kd": "kd-noKD"}, 0.9)
    with Image.open(path) as im:
        assert im.format == "PNG" and len(set(im.convert("L").getdata())) > 10  # not blank


def test_no_metrics_yet_means_no_figure(tmp_path):
    (tmp_path / "a").mkdir()
    assert plot_curves(tmp_path, ["a"], {}, None) is None and not (tmp_path / "curves.png").exists()
