"""Structured channel pruning with Torch-Pruning's dependency graph (residual and depthwise models stay valid)."""

from __future__ import annotations

import torch
import torch_pruning as tp
from torch import nn

from distill.core.errors import InputError
from distill.core.models import count_macs, count_params


class PruningError(InputError):
    """The model cannot be pruned as asked; names the layer when one is to blame."""


def _classifier(model: nn.Module) -> list[nn.Module]:
    linears: list[nn.Module] = [m for m in model.modules() if isinstance(m, nn.Linear)]
    return linears[-1:]  # the head keeps its class count


def count_cost(model: nn.Module, example: torch.Tensor) -> tuple[int, int]:
    """(MACs, parameters) per image, by the project's one MAC count (core.models.count_macs): the leaderboard's."""
    return count_macs(model, example), count_params(model)


def _pruner(model: nn.Module, example: torch.Tensor, ratio: float, steps: int, round_to: int) -> tp.pruner.MetaPruner:
    try:
        return tp.pruner.MetaPruner(model, example, importance=tp.importance.GroupMagnitudeImportance(p=2),
                                    pruning_ratio=ratio, iterative_steps=steps, ignored_layers=_classifier(model),
                                    round_to=round_to, global_pruning=False)
    except Exception as exc:  # Torch-Pruning raises many types while tracing; name the culprit if it does
        raise PruningError(f"cannot build a dependency graph for this model: {exc}".splitlines()[0]) from exc


def probe_prune(model: nn.Module, example: torch.Tensor, keep: float, round_to: int = 8) -> None:
    """What planning checks, in one step and on the model given (a throwaway copy): Torch-Pruning can group its
    layers, cut them to about `keep` of the cost and leave a model that still runs and keeps its classes."""
    model.eval()
    pruner = _pruner(model, example, min(max(1 - keep ** 0.5, 0.1), 0.9), 1, round_to)
    try:
        pruner.step()
        with torch.no_grad():
            out = model(example)
    except Exception as exc:  # a reshape of pruned channels (attention heads) fails here, as in the real stage
        raise PruningError(_culprit(model, exc)) from exc
    if not _classifier(model) or out.shape[-1] != _classifier(model)[0].out_features:
        raise PruningError("pruning changed the output shape; the classifier head must be the last Linear layer")


def prune_to_target(model: nn.Module, example: torch.Tensor, keep: float, target: str = "macs",
                    round_to: int = 8, steps: int = 40) -> dict[str, int]:
    """Prune in place, step by step, until MACs (or params) <= keep x the original; returns before/after costs."""
    model.eval()
    macs0, params0 = count_cost(model, example)
    pruner = _pruner(model, example, 0.95, steps, round_to)
    macs, params = macs0, params0
    goal = keep * (macs0 if target == "macs" else params0)
    for _ in range(steps):
        if (macs if target == "macs" else params) <= goal:
            break
        try:
            pruner.step()
        except Exception as exc:  # an op Torch-Pruning cannot follow; report which layer
            raise PruningError(_culprit(model, exc)) from exc
        macs, params = _cost_after_step(model, example)
    reached = (macs if target == "macs" else params) <= goal
    if not reached:
        import logging

        logging.getLogger(__name__).warning(
            "pruning stopped at %.0f%% of the original %s, above the %.0f%% target: layers are at their minimum "
            "width for round_to=%d; lower round_to or the target", 100 * (macs / macs0 if target == "macs" else
                                                                        params / params0), target, 100 * keep,
            round_to)
    with torch.no_grad():
        out = model(example)
    if out.shape[-1] != _classifier(model)[0].out_features:
        raise PruningError("pruning changed the output shape; the classifier head must be the last Linear layer")
    return {"macs_before": macs0, "params_before": params0, "macs_after": macs, "params_after": params,
            "target_reached": reached}


def _cost_after_step(model: nn.Module, example: torch.Tensor) -> tuple[int, int]:
    """(MACs, params) of the model a pruning step left; it must still run."""
    try:
        return count_cost(model, example)
    except Exception as exc:  # Torch-Pruning cut channels this architecture ties together (e.g. attention heads)
        raise PruningError(f"the pruned model no longer runs ({exc.__class__.__name__}: {str(exc).splitlines()[0]}): "
                           "Torch-Pruning does not follow this architecture; compress it without pruning "
                           "(prune.enabled: false, or the others by name: --student)") from exc


def _culprit(model: nn.Module, exc: Exception) -> str:
    text = str(exc).splitlines()[0] if str(exc) else exc.__class__.__name__
    for name, mod in model.named_modules():
        if name and (name in text or mod.__class__.__name__ in text):
            return f"cannot prune layer '{name}' ({mod.__class__.__name__}): {text}"
    return f"cannot prune this model: {text}"
