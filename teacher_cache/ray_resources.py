"""Fail in seconds when a Ray request can never be placed, instead of waiting for it forever.

Ray keeps an infeasible actor or trial pending without end (and the cache run holds its lock meanwhile). Check
the request against the cluster's nodes up front: every bundle must fit on one alive node, and all of them
together in the cluster's total.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence

SKIP_ENV = "DISTILL_SKIP_RESOURCE_CHECK"  # autoscaling clusters: nodes that do not exist yet may come


class InfeasibleResourcesError(ValueError):
    """The request exceeds what the Ray cluster has; a bad config for this cluster (exit 2)."""


def _fmt(res: Mapping[str, float]) -> str:
    return ", ".join(f"{k}={v:g}" for k, v in sorted(res.items()) if k in ("CPU", "GPU") or v) or "nothing"


def check_fits(bundles: Sequence[Mapping[str, float]], what: str,
               nodes: Sequence[Mapping[str, float]] | None = None) -> None:
    """Raise InfeasibleResourcesError naming `what`, the request and the cluster, if `bundles` cannot be placed.

    `nodes`: each alive node's total resources (default: asked from the connected Ray cluster).
    """
    if os.environ.get(SKIP_ENV) == "1":
        return
    if nodes is None:
        import ray

        nodes = [n["Resources"] for n in ray.nodes() if n.get("Alive")]
    total: dict[str, float] = {}
    for n in nodes:
        for k, v in n.items():
            total[k] = total.get(k, 0.0) + v
    need: dict[str, float] = {}
    for b in bundles:
        for k, v in b.items():
            need[k] = need.get(k, 0.0) + v
    biggest = {k: max((n.get(k, 0.0) for n in nodes), default=0.0) for k in ("CPU", "GPU")}
    cluster = f"the Ray cluster has {_fmt({k: total.get(k, 0.0) for k in ('CPU', 'GPU')})} in total over " \
              f"{len(nodes)} node(s), at most {_fmt(biggest)} on one node"
    hint = f"lower the request or add nodes (autoscaling cluster: set {SKIP_ENV}=1)"
    for b in bundles:
        want = {k: v for k, v in b.items() if v > 0}
        if not any(all(n.get(k, 0.0) >= v - 1e-9 for k, v in want.items()) for n in nodes):
            raise InfeasibleResourcesError(f"{what} needs {_fmt(want)} on one node, but {cluster}; {hint}")
    short = {k: v for k, v in need.items() if v > 0 and total.get(k, 0.0) < v - 1e-9}
    if short:
        raise InfeasibleResourcesError(f"{what} needs {_fmt(need)} at once, but {cluster}; {hint}")
