"""The end of `distill pipeline`: the short summary in a fixed order (twins, winner, artefacts, how to query), the
stage JSON only on request, and a curl that sends the bundle's own sample image."""

import json
import shlex
from pathlib import Path

import yaml
from click.testing import CliRunner

from distill.cluster.cmd_pipeline import curl_command, summary_text
from distill.cluster.pipeline import PipelineConfig
from distill.student_train.leaderboard import add_twin_deltas, twin_pairs

DEMO = Path(__file__).resolve().parents[2] / "examples" / "demo.yaml"


def _results():
    rows = add_twin_deltas([{"variant": "kd", "status": "done", "mode": "soft", "val_top1": 0.976, "val_samples": 250,
                             "test_top1": 0.972, "test_samples": 250, "twin": None, "delta_top1_vs_twin": None},
                            {"variant": "kd-noKD", "status": "done", "mode": "none", "val_top1": 0.94,
                             "val_samples": 250, "test_top1": 0.932, "test_samples": 250, "twin": None,
                             "delta_top1_vs_twin": None}], {"kd": "kd-noKD"})
    return [{"stage": "shards", "skipped": True},
            {"stage": "train", "best": "kd", "best_val_top1": 0.976, "best_test_top1": 0.972, "best_mode": "soft",
             "twins": twin_pairs(rows)},
            {"stage": "deploy", "bundle": "runs/demo/bundle", "files": ["bundle.json", "classes.json",
                                                                        "model.int8.tflite", "model.onnx",
                                                                        "sample.png"],
             "sample": "sample.png", "sample_label": "7", "sample_content_type": "image/png"}]


def test_the_summary_ends_on_how_to_query_the_model_in_a_fixed_order():
    cfg = PipelineConfig.model_validate(yaml.safe_load(DEMO.read_text()))
    text = summary_text(cfg, _results())
    order = ["distilled student vs its undistilled twin", "winner: kd", "artifacts:", "  bundle ",
             "query the served model", "distill serve --bundle runs/demo/bundle", "curl "]
    where = [text.index(s) for s in order]
    assert where == sorted(where), where
    assert "on the held-out test split" in text and "97.20%  vs kd-noKD" in text
    assert "winner: kd (97.60% val top-1, chosen on val, 97.20% test top-1; distilled, +4.00 pt over its twin " \
           "kd-noKD on test)" in text
    bundle_line = next(ln for ln in text.splitlines() if ln.startswith("  bundle "))
    assert "model.int8.tflite" in bundle_line and "sample.png" in bundle_line and "bundle.json" not in bundle_line
    assert "runs/demo/pipeline.json" in text  # where the stage JSON went
    last = text.splitlines()[-1].strip()
    assert last.startswith("curl ") and "@runs/demo/bundle/sample.png" in last and "'Content-Type: image/png'" in last
    assert "{" not in text  # no JSON dump on the screen


def test_the_curl_command_is_one_shell_command_naming_the_file():
    cmd = curl_command("my runs/bundle/sample.jpg", "image/jpeg")
    argv = shlex.split(cmd)
    assert argv[0] == "curl" and argv[argv.index("--data-binary") + 1] == "@my runs/bundle/sample.jpg"
    assert argv[argv.index("-H") + 1] == "Content-Type: image/jpeg" and argv[-1] == "http://127.0.0.1:8000/predict"
    assert "--retry-all-errors" in argv  # pasted right after `distill serve ... &`, it waits for the server


def test_json_only_on_request(tmp_path, monkeypatch):
    # a pipeline with only its shards stage: the CLI's real path, in-process
    from distill.cluster.cli import cli

    monkeypatch.chdir(tmp_path)
    cfg = {"shards": {"source": "digits", "out_dir": "shards", "limit": 40, "val_fraction": 0.1,
                      "test_fraction": 0.1}, "summary_json": "out/pipeline.json", "metrics": {"enabled": False}}
    (tmp_path / "p.yaml").write_text(yaml.safe_dump(cfg))
    plain = CliRunner().invoke(cli, ["pipeline", "-c", "p.yaml"])
    assert plain.exit_code == 0, plain.output
    assert "stages:" not in plain.output and "{" not in plain.output
    assert "test-*.tar" in plain.output and "stage summaries out/pipeline.json" in plain.output
    saved = json.loads((tmp_path / "out" / "pipeline.json").read_text())
    assert saved[0]["stage"] == "shards" and saved[0]["test"].endswith("test-000000.tar")
    as_json = CliRunner().invoke(cli, ["pipeline", "-c", "p.yaml", "--json"])
    assert as_json.exit_code == 0 and json.loads(as_json.output)[0]["stage"] == "shards"
