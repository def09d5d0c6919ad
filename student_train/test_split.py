"""The held-out test split: each finished student's best.pt scored once on shards nothing selects on.

Val picks each student's best epoch (best.pt) and the best student, so a val top-1 is the maximum over epochs of
a noisy score: it flatters, and a twin comparison made on it compares two maxima. The test shards are read only
here, after training, through the same loader and the same `evaluate` as val (view 0, the evaluation view), and
the result goes to `<variant>/test.json` with the SHA-256 of the best.pt it scored: a re-run scores only a best.pt
that changed. Nothing reads test.json to choose anything; the leaderboard reports it and the twin verdict uses it.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import torch

from distill.core.atomic_io import atomic_write, file_sha256
from distill.core.models import create_model
from distill.student_train.data import JoinedStream, StreamSpec
from distill.student_train.evaluate import evaluate
from distill.student_train.job import JobSpec, student_prep
from distill.student_train.status import read_status
from distill.student_train.variant import VariantConfig

log = logging.getLogger(__name__)
TEST_FILE = "test.json"


def load_best(variant_dir: Path) -> torch.nn.Module:
    """The plain student of best.pt (rebuilt from arch.json; weights_only: a planted pickle is refused)."""
    info = json.loads((variant_dir / "arch.json").read_text())
    model = create_model(info["arch"], info["num_classes"], info["in_chans"], **info["arch_kwargs"])
    model.load_state_dict(torch.load(variant_dir / "best.pt", map_location="cpu", weights_only=True))
    return model.eval()


def read_test(variant_dir: Path) -> dict[str, Any]:
    """The variant's test scores ({} when it has none: no test split, not finished, or scored on another best.pt)."""
    path = variant_dir / TEST_FILE
    best = variant_dir / "best.pt"
    if not path.exists() or not best.exists():
        return {}
    try:
        data = json.loads(path.read_text())
    except ValueError:
        return {}
    return data if data.get("best_sha256") == file_sha256(best) else {}


def score_on_test(job: JobSpec, name: str, v: VariantConfig, device: torch.device) -> dict[str, Any]:
    """Score `name`'s best.pt on the test shards (world size 1, this process) and write <variant>/test.json."""
    out = job.run_dir / name
    digest = file_sha256(out / "best.pt")
    model = load_best(out).to(device)
    spec = StreamSpec(cache_dir=job.cache_dir, cache_location=job.cache_location, pairs=job.test,
                      student=student_prep(v, job.teacher_prep), teacher=None, num_classes=job.num_classes, views=1,
                      train=False, batch_size=v.batch_size, shuffle_buffer=1, seed=0, epoch=0, rank=0, world=1,
                      loader_workers=0)
    scores = evaluate(model, iter(JoinedStream(spec)), device, torch.float32)
    arch = json.loads((out / "arch.json").read_text())
    result: dict[str, Any] = {k.replace("val_", "test_", 1): val for k, val in scores.items()}
    result.update(best_sha256=digest, best_epoch=arch.get("epoch"), best_by=arch.get("best_by"),
                  shards=[p.stem for p in job.test])
    atomic_write(out / TEST_FILE, json.dumps(result, indent=1))
    return result


def score_students_on_test(job: JobSpec, variants: list[tuple[str, VariantConfig]], device: torch.device) -> int:
    """Every finished student whose best.pt has no current test score gets one; returns how many were scored."""
    if not job.test:
        return 0
    scored = 0
    for name, v in variants:
        out = job.run_dir / name
        if read_status(job.run_dir, name).get("status") != "done" or not (out / "best.pt").exists():
            continue
        if read_test(out):
            continue
        r = score_on_test(job, name, v, device)
        scored += 1
        log.info("%s: test top-1 %s on %d held-out images (best.pt of epoch %s, chosen on val)", name,
                 "n/a" if r["test_top1"] is None else f"{100 * r['test_top1']:.2f}%", int(r["test_samples"]),
                 r["best_epoch"])
    return scored
