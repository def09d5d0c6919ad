"""Load a teacher once (arch + checkpoint, or TorchScript / torch.export) and resolve its preprocessing."""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from distill.core.atomic_io import atomic_write, file_sha256
from distill.core.errors import InputError
from distill.core.models import create_model
from distill.images.preprocessing import IMAGENET_MEAN, IMAGENET_STD, Preprocessing
from distill.teacher.config import TeacherConfig


class TeacherLoadError(InputError):
    """The teacher cannot be built from the config (missing file, wrong checkpoint, unknown name)."""


@dataclass
class LoadedTeacher:
    model: nn.Module
    num_classes: int
    preprocessing: Preprocessing
    info: dict[str, Any]  # arch/source/weights hash: recorded in every cache file and the model card


def load_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """A plain state dict (or one nested under 'state_dict'/'model'/'module'), loaded with weights_only=True."""
    if not path.is_file():
        raise TeacherLoadError(f"checkpoint not found: {path}; set teacher.checkpoint to an existing file")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises many types for a bad file; report them all as one message
        raise TeacherLoadError(f"cannot read checkpoint {path}: {exc.__class__.__name__}: {exc}".splitlines()[0]) \
            from exc
    for nest in ("state_dict", "model", "module"):
        if isinstance(obj, dict) and nest in obj and isinstance(obj[nest], dict):
            obj = obj[nest]
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise TeacherLoadError(f"{path} is not a state dict of tensors; save it with torch.save(model.state_dict())")
    return {k.removeprefix("module."): v for k, v in obj.items()}


def _infer_head(sd: dict[str, torch.Tensor]) -> tuple[int, int]:
    """(num_classes, in_chans) from a state dict: last 2-D weight is the classifier, first 4-D is the stem."""
    mats = [v for k, v in sd.items() if k.endswith("weight") and v.ndim == 2]
    convs = [v for k, v in sd.items() if k.endswith("weight") and v.ndim == 4]
    if not mats:
        raise TeacherLoadError("cannot infer the number of classes from the checkpoint; set teacher.num_classes")
    return int(mats[-1].shape[0]), int(convs[0].shape[1]) if convs else 3


def _build_from_arch(cfg: TeacherConfig) -> tuple[nn.Module, dict[str, Any]]:
    assert cfg.arch is not None
    sd = load_state_dict(cfg.checkpoint) if cfg.checkpoint is not None else None
    num_classes, in_chans = _infer_head(sd) if sd is not None else (cfg.num_classes or 1000, 3)
    num_classes = cfg.num_classes or num_classes
    if cfg.preprocessing.channels is not None and sd is None:
        in_chans = cfg.preprocessing.channels
    kwargs = dict(cfg.arch_kwargs)
    if cfg.pretrained:
        kwargs["pretrained"] = True
    model = create_model(cfg.arch, num_classes=num_classes, in_chans=in_chans, **kwargs)
    if sd is not None:
        try:
            model.load_state_dict(sd, strict=True)
        except RuntimeError as exc:
            detail = " ".join(str(exc).split())[:400]
            raise TeacherLoadError(f"checkpoint {cfg.checkpoint} does not fit arch '{cfg.arch}' "
                                   f"{cfg.arch_kwargs or ''}: {detail}") from exc
    weights = weights_sha256(cfg.checkpoint) if cfg.checkpoint is not None else _state_hash(model)
    return model, {"source": "arch", "arch": cfg.arch, "arch_kwargs": cfg.arch_kwargs,
                   "checkpoint": str(cfg.checkpoint) if cfg.checkpoint else None, "weights_sha256": weights,
                   "in_chans": in_chans}


def weights_sha256(path: Path) -> str:
    """Content hash of a weights file, remembered per (path, size, mtime, ctime, inode): a nightly no-op stays
    cheap, and a retrained file copied with its mtime kept still moves ctime or inode, so it is hashed again."""
    st = path.stat()
    index_path = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "distill" / "weights_sha256.json"
    ident = f"{path.resolve()}|{st.st_size}|{st.st_mtime_ns}|{st.st_ctime_ns}|{st.st_ino}"
    try:
        index = json.loads(index_path.read_text())
    except (OSError, ValueError):
        index = {}
    if ident in index:
        return index[ident]
    digest = file_sha256(path)
    index[ident] = digest
    try:
        index_path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(index_path, json.dumps(index))
    except OSError:
        pass  # a read-only home only costs a re-hash next time
    return digest


def _state_hash(model: nn.Module) -> str:
    h = hashlib.sha256()
    for name, t in sorted(model.state_dict().items()):
        h.update(name.encode())
        h.update(t.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def _build_scripted(cfg: TeacherConfig) -> tuple[nn.Module, dict[str, Any]]:
    assert cfg.scripted is not None
    path = cfg.scripted
    if not path.is_file():
        raise TeacherLoadError(f"scripted teacher not found: {path}; set teacher.scripted to an existing file")
    try:
        if path.suffix == ".pt2":
            model = torch.export.load(str(path)).module()
            kind = "torch.export"
        else:
            model = torch.jit.load(str(path), map_location="cpu")
            kind = "torchscript"
    except Exception as exc:  # many loader error types; one clear line
        raise TeacherLoadError(f"cannot load {path} as TorchScript/torch.export: {exc}".splitlines()[0]) from exc
    return model, {"source": kind, "arch": path.name, "checkpoint": str(path), "weights_sha256": weights_sha256(path),
                   "in_chans": cfg.preprocessing.channels or 3}


def resolve_preprocessing(model: nn.Module, cfg: TeacherConfig, in_chans: int) -> Preprocessing:
    """Config values win, then the model's pretrained config (timm), then ImageNet defaults."""
    pre = getattr(model, "pretrained_cfg", None) or {}
    p = cfg.preprocessing
    size = p.input_size or int(pre.get("input_size", (3, 224, 224))[-1])
    return Preprocessing(
        input_size=size,
        crop_pct=p.crop_pct or float(pre.get("crop_pct", 0.875)),
        mean=tuple(p.mean or pre.get("mean", IMAGENET_MEAN)),
        std=tuple(p.std or pre.get("std", IMAGENET_STD)),
        interpolation=p.interpolation or str(pre.get("interpolation", "bilinear")),
        channels=p.channels or in_chans,
    )


def load_teacher(cfg: TeacherConfig) -> LoadedTeacher:
    """Build the teacher in eval mode on the CPU; find its class count with one dummy forward."""
    model, info = _build_from_arch(cfg) if cfg.arch is not None else _build_scripted(cfg)
    if info["source"] != "torch.export":  # an exported program is frozen in the mode it was exported in
        model.eval()
    prep = resolve_preprocessing(model, cfg, int(info["in_chans"]))
    if len(prep.mean) != prep.channels or len(prep.std) != prep.channels:
        raise TeacherLoadError(f"preprocessing mean/std have {len(prep.mean)}/{len(prep.std)} values but the "
                               f"teacher takes {prep.channels} channels; give one value per channel")
    with torch.inference_mode():
        try:
            out = model(torch.zeros(1, prep.channels, prep.input_size, prep.input_size))
        except Exception as exc:  # a model that cannot run on its own declared input is a config error
            raise TeacherLoadError(f"teacher fails on a {prep.channels}x{prep.input_size}x{prep.input_size} "
                                   f"input: {exc}".splitlines()[0]) from exc
    if not isinstance(out, torch.Tensor) or out.ndim != 2:
        raise TeacherLoadError("teacher must return logits of shape (N, num_classes)")
    info = {**info, "num_classes": int(out.shape[1])}
    return LoadedTeacher(model=model, num_classes=int(out.shape[1]), preprocessing=prep, info=info)
