"""Training state files: atomic writes, damaged status.json, trial end states, variant config errors, resources."""

import json

import pytest

from distill.cluster.config_loading import ConfigError, load_config
from distill.core.atomic_io import atomic_write
from distill.core.ray_cluster import InfeasibleResourcesError, check_fits
from distill.student_train.config import TrainConfig
from distill.student_train.status import finished, read_status, settle_trials, write_status


def test_atomic_write_keeps_old_content_when_the_write_fails(tmp_path, monkeypatch):
    import os

    f = tmp_path / "status.json"
    atomic_write(f, '{"status": "done"}')

    def full_disk(fd: int) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "fsync", full_disk)  # the write of the new content fails, as on a full disk
    with pytest.raises(OSError, match="No space left"):
        atomic_write(f, '{"status": "running"}')
    monkeypatch.undo()
    assert json.loads(f.read_text()) == {"status": "done"}
    assert [p.name for p in tmp_path.iterdir()] == ["status.json"]  # no temp file left behind


@pytest.mark.parametrize("content", ["", '{"stat', "[]", '{"reason": "x"}'])
def test_damaged_status_is_reported_and_not_finished(tmp_path, caplog, content):
    (tmp_path / "v").mkdir()
    (tmp_path / "v" / "status.json").write_text(content)
    assert not finished(tmp_path, "v")  # trained (or resumed) again, not a crash on every later run
    assert read_status(tmp_path, "v")["status"] == "unknown"
    assert "status.json is damaged" in caplog.text and "v" in caplog.text


def test_stopped_is_final_interrupted_is_not(tmp_path):
    write_status(tmp_path, "a", "stopped", "stopped early by ASHA after 1 epoch(s)")
    write_status(tmp_path, "b", "interrupted", "worker died")
    write_status(tmp_path, "c", "done")
    assert finished(tmp_path, "a") and finished(tmp_path, "c")
    assert not finished(tmp_path, "b")


def test_settle_trials_only_marks_complete_trials_done(tmp_path):
    for name, rows in (("complete", 3), ("cut", 1), ("never", 0)):
        write_status(tmp_path, name, "running")
        if rows:
            (tmp_path / name / "metrics.csv").write_text("epoch,train_loss\n" + "".join(
                f"{e},0.5\n" for e in range(1, rows + 1)))
    write_status(tmp_path, "asha", "stopped", "stopped early by ASHA after 1 epoch(s)")
    write_status(tmp_path, "broken", "failed", "ValueError: x")
    settle_trials(tmp_path, [(n, 3) for n in ("complete", "cut", "never", "asha", "broken")],
                  {"cut": "RayActorError: the actor died"})
    st = {n: read_status(tmp_path, n) for n in ("complete", "cut", "never", "asha", "broken")}
    assert st["complete"]["status"] == "done"
    assert st["cut"]["status"] == "interrupted" and "RayActorError" in st["cut"]["reason"]
    assert "after 1 epoch(s)" in st["cut"]["reason"]
    assert st["never"]["status"] == "interrupted"  # no scheduler stopped it: it must resume, not count as done
    assert st["asha"]["status"] == "stopped" and st["broken"]["status"] == "failed"
    assert not finished(tmp_path, "cut") and not finished(tmp_path, "never")


def test_every_variant_problem_listed_with_its_path(tmp_path):
    f = tmp_path / "t.yaml"
    f.write_text("run_dir: r\ndata: {train_shards: [x.tar], cache_root: c}\n"
                 "variants:\n  - {name: a, lr: -1}\n  - {name: b, batch_size: 0, epochs: 0}\n  - {name: c}\n"
                 "grid: {temperature: [1.0, -2.0]}\n")
    with pytest.raises(ConfigError) as exc:
        load_config(TrainConfig, f, [], "train")
    msg = str(exc.value)
    assert msg.startswith("4 problem(s)"), msg
    for path in ("train.variants.0.lr:", "train.variants.1.batch_size:", "train.variants.1.epochs:",
                 "train.grid.temperature:"):
        assert path in msg, msg
    assert "train.lr" not in msg and "train.batch_size" not in msg


def test_keep_checkpoints_is_validated():
    cfg = {"run_dir": "r", "data": {"train_shards": ["x.tar"], "cache_root": "c"}}
    assert TrainConfig.model_validate(cfg).keep_checkpoints == 2
    with pytest.raises(ValueError, match="keep_checkpoints"):
        TrainConfig.model_validate({**cfg, "keep_checkpoints": 0})


def test_resource_check_names_what_the_cluster_has():
    nodes = [{"CPU": 2.0, "memory": 1e9}, {"CPU": 4.0, "GPU": 1.0}]
    check_fits([{"CPU": 1.0, "GPU": 1.0}], "a teacher actor", nodes)  # fits on the second node
    with pytest.raises(InfeasibleResourcesError, match=r"a teacher actor needs CPU=1, GPU=2 on one node, but the "
                       r"Ray cluster has CPU=6, GPU=1 in total over 2 node\(s\), at most CPU=4, GPU=1 on one node"):
        check_fits([{"CPU": 1.0, "GPU": 2.0}], "a teacher actor", nodes)
    with pytest.raises(InfeasibleResourcesError, match="variant v needs CPU=8.05 at once"):
        check_fits([{"CPU": 0.05}] + [{"CPU": 4.0}] * 2, "variant v", nodes)


def test_leaderboard_row_survives_a_damaged_status(tmp_path):
    from distill.student_train.config import VariantConfig
    from distill.student_train.leaderboard import variant_row

    (tmp_path / "v").mkdir()
    (tmp_path / "v" / "status.json").write_text("")
    row = variant_row(tmp_path, "v", VariantConfig(arch_kwargs={"width": 4}), None)
    assert row["status"] == "unknown" and "damaged" in row["reason"]
