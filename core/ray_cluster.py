"""Joining a Ray cluster, and failing in seconds when a request can never be placed on it.

`connect_ray` joins `--address` / RAY_ADDRESS or starts a local cluster whose listeners stay on 127.0.0.1; an
address that cannot be reached, or a cluster that refuses us, fails in seconds with one line saying what to check.

`check_fits`: Ray keeps an infeasible actor or trial pending without end (and the cache run holds its lock
meanwhile). Check the request against the cluster's nodes up front: every bundle must fit on one alive node, and
all of them together in the cluster's total.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence

from distill.core.errors import DistillError, InputError
from distill.core.graceful_stop import reclaim_sigterm

SKIP_ENV = "DISTILL_SKIP_RESOURCE_CHECK"  # autoscaling clusters: nodes that do not exist yet may come


class InfeasibleResourcesError(InputError):
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


class ClusterConnectionError(DistillError, ConnectionError):
    """The Ray cluster named by --address / RAY_ADDRESS cannot be reached or refuses us."""

    user_input = True


_HINT = ("check --address / RAY_ADDRESS (host:port of the GCS, or ray://host:10001); with Ray's token auth set "
         "RAY_AUTH_MODE=token and put the cluster's token in ~/.ray/auth_token")


def check_address(address: str, timeout: float = 3.0) -> None:
    """Fail in seconds, not minutes: ray.init retries an unreachable GCS for a long time."""
    import socket

    if address == "auto":
        return
    hostport = address.split("://", 1)[-1].rstrip("/")
    host, _, port = hostport.rpartition(":")
    if not host or not port.isdigit():
        raise ClusterConnectionError(f"Ray address '{address}' is not host:port or ray://host:port; {_HINT}")
    try:
        with socket.create_connection((host, int(port)), timeout=timeout):
            pass
    except OSError as exc:
        raise ClusterConnectionError(f"cannot reach the Ray cluster at {address} ({exc.strerror or exc}); "
                                     f"{_HINT}") from None


def connect_ray(address: str | None, num_cpus: int | None = None) -> bool:
    """Connect to `address` / RAY_ADDRESS, or start a local cluster bound to 127.0.0.1. True if we started it."""
    import ray

    if ray.is_initialized():
        return False
    address = address or os.environ.get("RAY_ADDRESS")
    if address:
        check_address(address)
        try:
            ray.init(address=address, log_to_driver=True)
        except (ConnectionError, RuntimeError, ValueError, PermissionError) as exc:
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else exc.__class__.__name__
            raise ClusterConnectionError(f"cannot join the Ray cluster at {address}: {first}; {_HINT}") from None
        reclaim_sigterm()
        return True
    keep_ray_on_loopback()
    ray.init(address="local", num_cpus=num_cpus, include_dashboard=False, _node_ip_address="127.0.0.1",
             log_to_driver=True)
    reclaim_sigterm()
    return True


def keep_ray_on_loopback() -> None:
    """A local cluster must not listen on routable addresses (tests, demo, laptops).

    Ray reads RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER once, at import; with it off, every listener binds 127.0.0.1.
    Set it for the processes Ray spawns and for this already-imported process.
    """
    os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
    from ray._private import ray_constants

    ray_constants.ENABLE_RAY_CLUSTER = False
