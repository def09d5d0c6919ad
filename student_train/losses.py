"""Distillation losses as sums of named, registered terms (as torchdistill composes them).

A term is one registered function ``fn(logits, batch, **params) -> scalar`` with the parameters it owns (the KD
term owns its temperature T) and the batch entries it reads (`needs`); it reports itself as one loss part
(`kd_loss`, `task_loss`, ...). A loss is a weighted sum of terms and returns {"loss", <every registered part>}: a
part its terms do not use is reported as 0, so every student's metrics have the same columns. Adding a term is one
`@register_term` function and a test; a variant then names it in `loss: {<term>: {weight: w, <param>: value}}`.

Batch entries: ``label`` (N,) int64, -1 where unlabelled; ``weight`` (N,) float, 0 for padding rows that only keep
ranks in step; ``teacher_logp`` {T: (N, C)} the teacher's log-probabilities at each temperature the loss's terms ask
for (rebuilt from the cached top-k, or from the live teacher in mode online); ``teacher_top1`` (N,) int64;
``student_feat`` / ``teacher_feat`` (N, d) for feature KD (the student's penultimate features through its learned
projector, and the cached teacher embedding of the same view).

The modes are recipes of terms (`recipe`): soft/online = α·kd(T) + (1−α)·ce, hard = α·hard_kd + (1−α)·ce,
none = ce; + β·feat when beta > 0.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F

Batch = dict[str, Any]


@dataclass(frozen=True)
class TermSpec:
    """A registered term: its function, the part it reports, what it reads, the parameters it owns (defaults)."""

    name: str
    fn: Callable[..., torch.Tensor]
    part: str
    needs: tuple[str, ...]
    labelled_rows: bool  # its epoch mean is over labelled rows (the CE on true labels), not all rows
    params: dict[str, Any]


TERMS: dict[str, TermSpec] = {}


def register_term(name: str, part: str | None = None, needs: tuple[str, ...] = (),
                  labelled_rows: bool = False) -> Callable[[Callable[..., torch.Tensor]], Callable[..., torch.Tensor]]:
    """Register ``fn(logits, batch, **params)``; its keyword parameters (with defaults) are what the term owns."""

    def deco(fn: Callable[..., torch.Tensor]) -> Callable[..., torch.Tensor]:
        params = {p.name: p.default for p in list(inspect.signature(fn).parameters.values())[2:]}
        if name in TERMS:
            raise ValueError(f"loss term '{name}' is registered twice")
        TERMS[name] = TermSpec(name, fn, part or f"{name}_loss", tuple(needs), labelled_rows, params)
        return fn

    return deco


def _weighted_mean(per_sample: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    return (per_sample * weight).sum() / weight.sum().clamp_min(1e-8)


def task_ce(logits: torch.Tensor, batch: Batch) -> torch.Tensor:
    """Cross-entropy on the true labels; unlabelled (-1) and padding rows contribute nothing."""
    label = batch["label"]
    has = (label >= 0).float() * batch["weight"]
    ce = F.cross_entropy(logits.float(), label.clamp_min(0), reduction="none")
    return _weighted_mean(ce, has)


def kd_kl(logits: torch.Tensor, teacher_logp: torch.Tensor, temperature: float, weight: torch.Tensor) -> torch.Tensor:
    """T^2 * KL(teacher_T || student_T), per-sample then weighted mean (Hinton et al.)."""
    student_logp = F.log_softmax(logits.float() / temperature, dim=1)
    p = teacher_logp.exp()
    kl = (p * (teacher_logp - student_logp)).nan_to_num(0.0).sum(dim=1)  # 0 * log 0 terms are 0
    return _weighted_mean(kl, weight) * temperature**2


FEATURE_LOSSES = ("cosine", "mse")


def feature_distance(student: torch.Tensor, teacher: torch.Tensor, kind: str) -> torch.Tensor:
    """Per-sample distance: 1 - cosine similarity (scale-free), or the mean squared difference per dim."""
    s, t = student.float(), teacher.float()
    if kind == "cosine":
        return 1.0 - F.cosine_similarity(s, t, dim=1, eps=1e-8)
    if kind == "mse":
        return (s - t).pow(2).mean(dim=1)
    raise ValueError(f"unknown feature_loss '{kind}'; valid: {list(FEATURE_LOSSES)}")


@register_term("kd", needs=("teacher_logp",))
def kd_term(logits: torch.Tensor, batch: Batch, temperature: float = 4.0) -> torch.Tensor:
    """Soft-label KD at temperature T against the teacher rebuilt at that T."""
    return kd_kl(logits, batch["teacher_logp"][temperature], temperature, batch["weight"])


@register_term("hard_kd", part="kd_loss", needs=("teacher_top1",))
def hard_kd_term(logits: torch.Tensor, batch: Batch) -> torch.Tensor:
    """Hard-label KD: cross-entropy against the teacher's argmax."""
    ce = F.cross_entropy(logits.float(), batch["teacher_top1"], reduction="none")
    return _weighted_mean(ce, batch["weight"])


@register_term("ce", part="task_loss", needs=("label",), labelled_rows=True)
def ce_term(logits: torch.Tensor, batch: Batch) -> torch.Tensor:
    """Cross-entropy on the true labels (the task loss)."""
    return task_ce(logits, batch)


@register_term("feat", needs=("student_feat", "teacher_feat"))
def feat_term(logits: torch.Tensor, batch: Batch, distance: str = "cosine") -> torch.Tensor:
    """Feature KD: distance between the projected student features and the cached teacher embedding."""
    return _weighted_mean(feature_distance(batch["student_feat"], batch["teacher_feat"], distance), batch["weight"])


@register_term("dkd", part="kd_loss", needs=("teacher_logp", "teacher_top1"))
def dkd_term(logits: torch.Tensor, batch: Batch, temperature: float = 4.0, alpha: float = 1.0,
             beta: float = 8.0) -> torch.Tensor:
    """Decoupled KD (Zhao et al., CVPR 2022): alpha * TCKD + beta * NCKD at temperature T.

    TCKD is the binary KL of the target class's probability against the rest; NCKD the KL among the non-target
    classes alone. The target is the true label where there is one, else the teacher's top-1 (unlabelled rows).
    Both come from the teacher rebuilt at T from the cached top-k (tail spread uniformly: see topk.py)."""
    t_logp = batch["teacher_logp"][temperature]
    s_logp = F.log_softmax(logits.float() / temperature, dim=1)
    target = torch.where(batch["label"] >= 0, batch["label"], batch["teacher_top1"])
    gt = F.one_hot(target, logits.shape[1]).bool()
    t_gt = t_logp.masked_fill(~gt, float("-inf")).logsumexp(1)  # log p_target
    s_gt = s_logp.masked_fill(~gt, float("-inf")).logsumexp(1)
    t_bin = torch.stack([t_gt, torch.log1p(-t_gt.exp().clamp_max(1 - 1e-7))], 1)
    s_bin = torch.stack([s_gt, torch.log1p(-s_gt.exp().clamp_max(1 - 1e-7))], 1)
    tckd = (t_bin.exp() * (t_bin - s_bin)).sum(1)
    t_nt = F.log_softmax(t_logp.masked_fill(gt, float("-inf")), dim=1)  # renormalised over non-target classes
    s_nt = F.log_softmax(s_logp.masked_fill(gt, float("-inf")), dim=1)
    nckd = (t_nt.exp() * (t_nt - s_nt)).nan_to_num(0.0).sum(1)
    return _weighted_mean(alpha * tckd + beta * nckd, batch["weight"]) * temperature**2


def loss_parts() -> tuple[str, ...]:
    """"loss" and every registered term's part, in registration order: the columns of metrics.csv."""
    return ("loss", *dict.fromkeys(spec.part for spec in TERMS.values()))


def labelled_parts() -> set[str]:
    """Parts averaged over labelled rows in epoch means (the CE on true labels)."""
    return {spec.part for spec in TERMS.values() if spec.labelled_rows}


@dataclass(frozen=True)
class Term:
    """A registered term with its weight and its own parameters."""

    spec: TermSpec
    weight: float
    params: dict[str, Any] = field(default_factory=dict)

    def describe(self) -> str:
        args = ",".join(f"{k}={v:g}" if isinstance(v, float) else f"{k}={v}" for k, v in self.params.items())
        return f"{self.weight:g}*{self.spec.name}" + (f"({args})" if args else "")


def make_term(name: str, weight: float, **params: Any) -> Term:
    """A term by name; an unknown name or parameter is an error listing the valid ones."""
    if name not in TERMS:
        raise ValueError(f"unknown loss term '{name}'; valid: {sorted(TERMS)}")
    spec = TERMS[name]
    unknown = sorted(set(params) - set(spec.params))
    if unknown:
        raise ValueError(f"loss term '{name}' has no parameter {unknown}; it takes {sorted(spec.params) or 'none'} "
                         "and `weight`")
    if name == "feat" and params.get("distance", "cosine") not in FEATURE_LOSSES:
        raise ValueError(f"unknown feature_loss '{params['distance']}'; valid: {list(FEATURE_LOSSES)}")
    return Term(spec, float(weight), {**spec.params, **params})


class Loss:
    """A weighted sum of terms. Calling it returns {"loss", every registered part}; unused parts are 0 and terms of
    weight 0 are not computed."""

    def __init__(self, terms: list[Term]) -> None:
        self.terms = tuple(t for t in terms if t.weight != 0)
        self.parts = loss_parts()
        self.temperatures = sorted({float(t.params["temperature"]) for t in self.terms
                                    if "teacher_logp" in t.spec.needs})
        self.needs = {n for t in self.terms for n in t.spec.needs}

    def __call__(self, logits: torch.Tensor, batch: Batch) -> dict[str, torch.Tensor]:
        zero = torch.zeros((), device=logits.device)
        out = dict.fromkeys(self.parts[1:], zero)
        seen: set[str] = set()
        total: torch.Tensor | None = None
        for t in self.terms:
            value = t.spec.fn(logits, batch, **t.params)
            out[t.spec.part] = out[t.spec.part] + value if t.spec.part in seen else value
            seen.add(t.spec.part)
            total = t.weight * value if total is None else total + t.weight * value
        out["loss"] = total if total is not None else zero
        return out

    def describe(self) -> str:
        return " + ".join(t.describe() for t in self.terms) or "0"


MODES = ("soft", "hard", "none", "online")


def recipe(mode: str, alpha: float = 0.9, temperature: float = 4.0, beta: float = 0.0,
           feature_loss: str = "cosine") -> list[Term]:
    """The terms a mode stands for (the shorthand of every variant that gives no explicit `loss`)."""
    if mode not in MODES:
        raise ValueError(f"unknown distillation mode '{mode}'; valid: {sorted(MODES)}")
    if feature_loss not in FEATURE_LOSSES:
        raise ValueError(f"unknown feature_loss '{feature_loss}'; valid: {list(FEATURE_LOSSES)}")
    if mode == "none":
        terms = [make_term("ce", 1.0)]
    else:
        kd = make_term("hard_kd", alpha) if mode == "hard" else make_term("kd", alpha, temperature=temperature)
        terms = [kd, make_term("ce", 1 - alpha)]
    if beta > 0:
        terms.append(make_term("feat", beta, distance=feature_loss))
    return terms


def terms_from_config(loss: Mapping[str, Mapping[str, Any]]) -> list[Term]:
    """`loss: {kd: {weight: 0.5, temperature: 2}, ce: {weight: 0.5}}` as terms."""
    out = []
    for name, params in loss.items():
        params = dict(params)
        if "weight" not in params:
            raise ValueError(f"loss term '{name}' needs a `weight`")
        out.append(make_term(name, params.pop("weight"), **params))
    return out


def create_loss(mode: str = "soft", alpha: float = 0.9, temperature: float = 4.0, beta: float = 0.0,
                feature_loss: str = "cosine", terms: Mapping[str, Mapping[str, Any]] | None = None) -> Loss:
    """The loss of a mode's recipe, or of explicit `terms` (which replace the recipe)."""
    return Loss(terms_from_config(terms) if terms else recipe(mode, alpha, temperature, beta, feature_loss))
