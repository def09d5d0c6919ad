"""The leaderboard's text: no α/T where the loss does not use them; the teacher's val top-1 and a warning when it
is below its students."""

from distill.student_train.config import VariantConfig
from distill.student_train.leaderboard import format_leaderboard, format_teacher_line, teacher_warning, variant_row
from distill.student_train.status import write_status
from distill.student_train.student_check import StudentCost


def test_mode_none_rows_show_no_alpha_or_temperature(tmp_path):
    for name in ("kd", "base", "argmax"):
        write_status(tmp_path, name, "done")
    rows = {name: variant_row(tmp_path, name, VariantConfig(mode=mode, arch_kwargs={"width": 4}, alpha=0.3,
                                                            temperature=5.0), StudentCost(100, 2000))
            for name, mode in (("kd", "soft"), ("base", "none"), ("argmax", "hard"))}
    assert (rows["kd"]["alpha"], rows["kd"]["temperature"]) == (0.3, 5.0)
    assert (rows["base"]["alpha"], rows["base"]["temperature"]) == (None, None)  # plain CE uses neither
    assert (rows["argmax"]["alpha"], rows["argmax"]["temperature"]) == (0.3, None)  # the argmax has no T
    lines = {ln.split()[0]: ln.split() for ln in format_leaderboard(list(rows.values())).splitlines()[2:]}
    assert lines["kd"][3:5] == ["0.30", "5.0"]
    assert lines["base"][3:5] == ["-", "-"]
    assert lines["argmax"][3:5] == ["0.30", "-"]


def _done(name, top1):
    return {"variant": name, "status": "done", "val_top1": top1}


def test_teacher_below_its_students_beyond_noise_is_warned_about():
    rows = [_done("kd", 0.90), _done("base", 0.93), {"variant": "x", "status": "failed", "val_top1": None}]
    warning = teacher_warning((0.42, 500), rows)  # the run in issue 21: a 42% teacher
    assert warning and "42.00% val top-1 on 500" in warning and "51.0 pt below its best student base" in warning
    assert "crop_pct" in warning
    assert teacher_warning((0.98, 500), rows) is None  # above its students
    assert teacher_warning((0.925, 500), rows) is None  # 0.5 pt below: within one standard error (1.2 pt)
    assert teacher_warning(None, rows) is None  # no cache, no labelled val rows
    assert teacher_warning((0.42, 500), rows[2:]) is None  # no student finished
    assert format_teacher_line((0.42, 500)) == "teacher: 42.00% val top-1 on 500 labelled val images (its cached " \
                                               "view 0)"
