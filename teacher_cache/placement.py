"""Where the labellers run, decided once on the driver: device, forward precision and decode backend.

`precision: auto` changes the cached numbers (it is in the fingerprint), so it must be resolved where the work
runs, not where the driver runs: a CPU head with GPU actors labels in bf16. The driver cannot ask the actors
(they start after the fingerprint names the cache directory), so it decides from what it asks Ray for: an
actor that reserves GPUs (`ray.gpus_per_actor > 0`) runs on CUDA; one that reserves none sees no GPU (Ray sets
its `CUDA_VISIBLE_DEVICES` to empty). Without Ray the labeller runs in this process. The resolved values are
passed down in the config, recorded in every cache file, and checked by each actor (`device: cuda` on a node
whose torch sees no GPU fails that actor's start with the reason).
"""

from __future__ import annotations

from typing import Literal

from distill.core.devices import resolve_device
from distill.core.errors import InputError
from distill.teacher_cache.config import CacheConfig


class PlacementError(InputError):
    """The config asks for a device or decode backend that the labellers cannot have."""


def labeller_device(cfg: CacheConfig, in_this_process: bool) -> Literal["cpu", "cuda"]:
    """The device the labellers run on: this process's, or (Ray) the one the actors' reservation gives them."""
    if cfg.device == "cpu":
        return "cpu"
    if cfg.ray.enabled and not in_this_process:
        if cfg.ray.gpus_per_actor > 0:
            return "cuda"
        if cfg.device == "cuda":
            raise PlacementError("device: cuda, but ray.gpus_per_actor is 0: Ray hides the GPUs from actors that "
                                 "reserve none; set ray.gpus_per_actor: 1 (or 0.5 for two actors per GPU)")
        return "cpu"
    return "cuda" if resolve_device(cfg.device).type == "cuda" else "cpu"


def resolve_placement(cfg: CacheConfig, in_this_process: bool = False) -> CacheConfig:
    """A copy of `cfg` with `device`, `precision` and `decode_backend` resolved (no `auto` left).

    Idempotent, so a labeller given a resolved config keeps the driver's decision. ``in_this_process``: the
    labeller runs here whatever `ray.enabled` says (a labeller resolving for itself, or `--no-ray`).
    """
    device = labeller_device(cfg, in_this_process)
    precision = cfg.precision if cfg.precision != "auto" else ("bf16" if device == "cuda" else "fp32")
    backend = cfg.decode_backend if cfg.decode_backend != "auto" else ("gpu" if device == "cuda" else "cpu")
    if backend == "gpu" and device != "cuda":
        raise PlacementError("decode_backend: gpu needs the teacher on CUDA (device: cuda or auto on a GPU host, "
                             "and ray.gpus_per_actor > 0 with Ray); set decode_backend: auto or cpu")
    return cfg.model_copy(update={"device": device, "precision": precision, "decode_backend": backend})
