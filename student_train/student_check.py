"""Every student checked against the job before any work, and its cost measured once.

What the config alone decides (the architecture and its arguments, its input channels against the cache's, its
input size, its init checkpoint) fails here, for every student at once, as bad input (exit 2) with the fix,
instead of one trial failing after the others trained. The leaderboard then takes each student's parameters and
MACs from here and never builds a model itself, so a student that failed in the run still gets its row.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from distill.core.errors import InputError
from distill.core.models import InputChannelsError, count_macs, count_params
from distill.images.preprocessing import Preprocessing
from distill.student_train.job import JobSpec, student_prep
from distill.student_train.student_model import InitCheckpointError, build_student
from distill.student_train.variant import VariantConfig


class StudentSetupError(InputError):
    """Students that cannot train on this job's data, each with what to change."""


@dataclass(frozen=True)
class StudentCost:
    params: int
    macs: int  # multiply-accumulates per image at the student's input size


def _channel_problem(v: VariantConfig, cache: Preprocessing, prep: Preprocessing) -> str | None:
    if v.channels is not None and v.channels != cache.channels and cache.channels != 1:
        return (f"channels {v.channels} from a cache of {cache.channels}-channel views: only a grey (1-channel) "
                f"cache can be replicated to 3 channels; leave `channels` empty (the cache's {cache.channels})")
    for what, values in (("mean", v.mean), ("std", v.std)):
        if values is not None and len(values) not in (1, prep.channels):
            return (f"{what} has {len(values)} values for {prep.channels} input channels; give 1 or "
                    f"{prep.channels}")
    return None


def _measure(v: VariantConfig, num_classes: int, prep: Preprocessing) -> StudentCost:
    """Build the student as training will (init checkpoint included) and run one image through it."""
    model, _ = build_student(v, num_classes, prep.channels)
    model.eval()
    example = torch.zeros(1, prep.channels, prep.input_size, prep.input_size)
    with torch.no_grad():
        out = model(example)
    if tuple(out.shape) != (1, num_classes):
        raise InputError(f"its output is {tuple(out.shape)} for one image, not (1, {num_classes}) class logits")
    return StudentCost(count_params(model), count_macs(model, example))  # the project's one MAC count


def _reason(exc: Exception, v: VariantConfig, cache: Preprocessing, prep: Preprocessing) -> str:
    text = f"{exc}".splitlines()[0][:300] if str(exc) else exc.__class__.__name__
    if isinstance(exc, InputChannelsError):
        return (f"{v.arch} takes 3 input channels and this student gets {prep.channels}: set `channels: 3` in the "
                "variant (a grey cache's pixels are replicated to 3 channels), or use a timm or registered "
                "architecture (they take any in_chans)")
    if isinstance(exc, (InitCheckpointError, InputError)):
        return text
    return (f"{v.arch} (arch_kwargs {v.arch_kwargs}) fails on a {prep.channels}x{prep.input_size}x"
            f"{prep.input_size} input: {exc.__class__.__name__}: {text}; check arch_kwargs, or raise input_size "
            f"(the cache's views are {cache.input_size}px)")


def check_students(variants: list[tuple[str, VariantConfig]], job: JobSpec) -> dict[str, StudentCost]:
    """Each student's cost; raises StudentSetupError listing every student that cannot train here."""
    costs: dict[str, StudentCost] = {}
    seen: dict[str, StudentCost | str] = {}
    problems = []
    for name, v in variants:
        prep = student_prep(v, job.teacher_prep)
        problem = _channel_problem(v, job.teacher_prep, prep)
        key = repr((v.arch, sorted(v.arch_kwargs.items()), prep.channels, prep.input_size, str(v.init_checkpoint)))
        if problem is None and key not in seen:
            try:
                seen[key] = _measure(v, job.num_classes, prep)
            except Exception as exc:  # whatever the architecture raises, reported with the variant's name
                seen[key] = _reason(exc, v, job.teacher_prep, prep)
        found = problem if problem is not None else seen[key]
        if isinstance(found, str):
            problems.append(f"variant {name}: {found}")
        else:
            costs[name] = found
    if problems:
        raise StudentSetupError(f"{len(problems)} student(s) cannot train on this cache (nothing was trained): "
                                + " | ".join(problems))
    return costs
