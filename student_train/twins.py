"""Undistilled twins: every distilled variant is compared with the same recipe trained without a teacher.

A twin has every training field of its distilled variant (arch, arch_kwargs, epochs, views, seed, optimizer,
lr, schedule, batch, precision, ...) and mode `none`; only the distillation fields differ. Several distilled
variants of one recipe (e.g. an alpha/T grid) share one twin, and an explicit mode-none variant with that
recipe *is* the twin (nothing is added for it).

Naming rule for added twins: ``<arch>-noKD``; when several added twins share an arch, the fields that tell them
apart are appended, e.g. ``cnn_small-noKD-seed=1`` or ``cnn_small-noKD-width=16``; a clash with an existing
name appends ``-twin``.
"""

from __future__ import annotations

from typing import Any

from distill.student_train.variant import VariantConfig

DISTILLED_MODES = ("soft", "hard", "online")
# Fields that only shape the distillation (or only place the job): they never make two recipes different.
NOT_RECIPE = {"name", "mode", "alpha", "temperature", "beta", "feature_loss", "loss", "feature_dim",
              "cpus_per_worker", "gpus_per_worker", "device"}


def recipe_key(v: VariantConfig) -> str:
    """What must be equal for two variants to be twins: every training field except the KD-only ones."""
    fields = {k: val for k, val in v.model_dump(mode="json").items() if k not in NOT_RECIPE}
    return repr(sorted(fields.items(), key=lambda kv: kv[0]))


def _differing(twins: list[VariantConfig]) -> list[dict[str, Any]]:
    """Per twin, the recipe fields (arch_kwargs flattened) whose values differ among these twins."""
    flat = []
    for t in twins:
        d = {k: val for k, val in t.model_dump(mode="json").items() if k not in NOT_RECIPE | {"arch_kwargs"}}
        d.update(t.arch_kwargs)
        flat.append(d)
    keys = sorted({k for d in flat for k in d})
    varying = [k for k in keys if len({repr(d.get(k)) for d in flat}) > 1]
    return [{k: d.get(k) for k in varying} for d in flat]


def _twin_names(twins: list[VariantConfig], taken: set[str]) -> list[str]:
    names: list[str] = [""] * len(twins)
    for arch in {t.arch for t in twins}:
        idx = [i for i, t in enumerate(twins) if t.arch == arch]
        parts = _differing([twins[i] for i in idx])
        for i, diff in zip(idx, parts, strict=True):
            name = "-".join([f"{arch}-noKD", *(f"{k}={val}" for k, val in diff.items())])
            names[i] = name + "-twin" if name in taken else name
    return names


def add_twins(variants: list[tuple[str, VariantConfig]]) -> list[tuple[str, VariantConfig]]:
    """The variants plus one mode-none twin per distinct distilled recipe that has none yet (added at the end)."""
    have = {recipe_key(v) for _, v in variants if v.mode == "none"}
    new: dict[str, VariantConfig] = {}
    for _, v in variants:
        key = recipe_key(v)
        if v.mode in DISTILLED_MODES and key not in have and key not in new:
            # no teacher term at all: no KD, no feature KD
            new[key] = v.model_copy(update={"mode": "none", "name": None, "beta": 0.0, "loss": None})
    twins = list(new.values())
    names = _twin_names(twins, {n for n, _ in variants})
    return variants + [(n, t.model_copy(update={"name": n})) for n, t in zip(names, twins, strict=True)]


def pair_twins(variants: list[tuple[str, VariantConfig]]) -> dict[str, str]:
    """Distilled variant name -> the name of its twin (the first mode-none variant with the same recipe)."""
    twin_of: dict[str, str] = {}
    for name, v in variants:
        if v.mode == "none":
            twin_of.setdefault(recipe_key(v), name)
    return {name: twin_of[recipe_key(v)] for name, v in variants
            if v.mode in DISTILLED_MODES and recipe_key(v) in twin_of}
