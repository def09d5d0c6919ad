"""`distill compress`: prune + KD fine-tune + int8 the best students of a training run, and measure them."""

from __future__ import annotations

import sys
from pathlib import Path

import click

from distill.cluster.cli_common import STATUS_EXIT, config_options
from distill.cluster.config_loading import load_config


@click.command()
@config_options
@click.option("--student", "students", multiple=True, metavar="NAME",
              help="Compress this student (a variant of the training run; repeatable) instead of the best "
                   "select.top_n: the same as select.students.")
def compress(config_path: Path | None, overrides: tuple[str, ...], students: tuple[str, ...]) -> None:
    """Select the best students (or the accuracy/MACs Pareto front), prune, fine-tune from the cache, quantize.

    \b
    Stages per student: baseline -> int8 -> pruned (Torch-Pruning to a MACs/params ratio in prune.steps
    steps, channels rounded, each step followed by a KD fine-tune from the SAME teacher cache with the
    training loop and its own lr/warm-up) -> pruned+int8 (ONNX Runtime static QDQ, per-channel, calibrated on
    cached training views). With the `litert` extra, also LiteRT targets (litert.models; converted by litert-torch,
    full-integer int8 by ai-edge-quantizer on the global min/max of the calibration views), measured in the
    LiteRT interpreter. Every stage is measured in its runtime: val top-1/top-5, teacher agreement, file
    size, median latency at batch 1 and 32. The report ends with a verdict in words per student: which stage
    meets max_top1_drop / min_smaller / min_speedup, or why compression does not pay.
    Before any work each selected student's architecture is checked against every stage it will run (builds,
    prunes, exports to ONNX, is captured for LiteRT); one a stage cannot take is refused with its name, the
    stage and the reason (exit 2). A fine-tune resumes only its own interrupted run
    (<out_dir>/<student>/finetune-<key>, keyed by the parent's best.pt sha256 and the prune settings).
    Students: the best select.top_n by val top-1 (or the Pareto front: select.by), or by name (--student NAME,
    select.students); variants that failed in training are never picked. A student that fails during the run (its
    pruned stages alone, or all of it) is reported with the reason (report.txt, failures.json) and the others are
    compressed and written as usual.
    Output: <out_dir>/<student>/*.onnx (*.tflite), report.txt, report.json, failures.json, pareto.png.
    Exit: 0 every student compressed, 3 some failed (the rest is in the report; deploy takes it), 4 none could
    be, 2 bad config/input (found before any work), 6 failed during the run.
    Example: distill compress --config examples/demo.yaml --set prune.ratio=0.7 --set prune.steps=2
    """
    from distill.compress.config import CompressConfig
    from distill.compress.run import run

    cfg = load_config(CompressConfig, config_path, list(overrides), "compress")
    if students:
        cfg.select.students = list(students)
    result = run(cfg)
    click.echo(result.table)
    click.echo(f"\nreport: {result.out_dir / 'report.txt'}\nplot:   {result.plot}")
    sys.exit(STATUS_EXIT[result.status])
