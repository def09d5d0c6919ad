"""Check the data against the cache and the variants before any training, and build the shared JobSpec."""

from __future__ import annotations

import json
import logging
from dataclasses import replace
from pathlib import Path

from distill.core.storage import read_sibling
from distill.images.preprocessing import Preprocessing
from distill.images.shards import expand_shard_patterns, shard_stem
from distill.student_train.config import TrainConfig
from distill.student_train.data import DataJoinError, ShardPair, count_samples, resolve_split
from distill.student_train.feature_kd import cache_feature_dim
from distill.student_train.job import AshaRule, JobSpec
from distill.student_train.unlabelled import train_pairs
from distill.teacher.config import TeacherConfig
from distill.teacher.load import weights_sha256
from distill.teacher_cache.contract import COL_LABEL, CacheError, CacheReader, find_cache, teachers_newest_first

log = logging.getLogger(__name__)


def teacher_identity(teacher: TeacherConfig) -> dict[str, str]:
    """What a cache manifest must say about its teacher for this config's teacher (no model load needed)."""
    path = teacher.checkpoint or teacher.scripted
    if path is None:
        return {"arch": str(teacher.arch)}
    if not Path(path).is_file():
        raise FileNotFoundError(f"teacher file not found: {path}; fix `teacher.checkpoint` / `teacher.scripted`")
    return {"arch": str(teacher.arch or Path(path).name), "weights_sha256": weights_sha256(Path(path))}


def find_teacher_cache(cfg: TrainConfig) -> tuple[Path, str]:
    """The cache to train from: the named fingerprint, else the newest one written by our teacher. Returns the
    local directory to read (for object storage, a verified mirror of the current manifest version) and the
    fingerprint directory's location in its store (what a worker on another machine mirrors the same version
    from)."""
    root = cfg.data.cache_root
    if root is None:
        raise ValueError("data.cache_root is not set: distilled variants need the teacher cache")
    if cfg.data.fingerprint or cfg.teacher is None:
        return find_cache(root, cfg.data.fingerprint)
    want = teacher_identity(cfg.teacher)
    found = []
    for fp, teacher in teachers_newest_first(root):
        if all(teacher.get(k) == val for k, val in want.items()):
            return find_cache(root, fp)
        found.append(f"{fp} ({teacher.get('arch')}, weights {str(teacher.get('weights_sha256'))[:12]})")
    raise CacheError(f"{root}: no cache written by the configured teacher ({want['arch']}, weights "
                     f"{want.get('weights_sha256', '?')[:12]}); found: {', '.join(found) or 'none'}. "
                     "Run `distill cache` with this teacher, or set data.fingerprint")


def _uncached_split(patterns: list[str]) -> tuple[list[ShardPair], int]:
    pairs, labelled = [], 0
    for path in expand_shard_patterns(patterns):
        images, with_label = count_samples(path)
        pairs.append(ShardPair(shard_stem(path), path, images, labelled=with_label))
        labelled += with_label
    return pairs, labelled


def _with_label_counts(reader: CacheReader, pairs: list[ShardPair]) -> list[ShardPair]:
    """Labelled rows per shard: from the manifest (no file read), or from the label column of shards cached by
    builds that did not count them."""
    def count(p: ShardPair) -> int:
        n = reader.manifest.shards[p.stem].labelled
        return n if n is not None else p.rows - int(reader.table(p.stem, columns=[COL_LABEL]).column(0).null_count)

    return [replace(p, labelled=count(p)) for p in pairs]


def _unlabelled_pool(cfg: TrainConfig, reader: CacheReader, train: list[ShardPair]) -> list[ShardPair]:
    """The unlabelled pool's shards, checked against the cache and kept apart from the labelled train shards."""
    pool = resolve_split(cfg.data.unlabelled_shards, reader, "unlabelled")
    both = sorted({p.stem for p in pool} & {p.stem for p in train})
    if both:
        raise ValueError(f"shards {both} are in both data.train_shards and data.unlabelled_shards; "
                         "list each shard in one of them")
    return [replace(p, labelled=0, unlabelled=True) for p in pool]


def _num_classes(cfg: TrainConfig) -> int:
    if cfg.data.num_classes:
        return cfg.data.num_classes
    for path in expand_shard_patterns(cfg.data.train_shards)[:1]:
        if (raw := read_sibling(path, "classes.json")) is not None:
            return len(json.loads(raw))
    raise ValueError("cannot tell the number of classes without a cache: set data.num_classes "
                     "(or keep the classes.json that `distill shards` writes beside the shards)")


def _check_held_out(train: list[ShardPair], val: list[ShardPair], test: list[ShardPair]) -> None:
    """A test shard that also trains or selects is no held-out split: refuse it before any work."""
    for name, other in (("train", train), ("val", val)):
        both = sorted({p.stem for p in test} & {p.stem for p in other})
        if both:
            raise ValueError(f"shards {both} are in both data.test_shards and data.{name}_shards (or the pool): the "
                             "test split must be held out; list each shard in one split")


def plan_job(cfg: TrainConfig) -> JobSpec:
    """Resolve shards and cache, check they line up and suit every variant's mode; raise before training."""
    variants = cfg.expand()
    needs_cache = any(v.mode != "none" for _, v in variants)
    if cfg.data.cache_root is None:
        if needs_cache:
            raise ValueError("data.cache_root is required: variants with mode soft/hard/online read the teacher "
                             "cache (only mode: none trains without one)")
        if cfg.data.unlabelled_shards:
            raise ValueError("data.unlabelled_shards needs the teacher cache (data.cache_root): only distilled "
                             "variants learn from unlabelled rows")
        train, labelled = _uncached_split(cfg.data.train_shards)
        val = _uncached_split(cfg.data.val_shards)[0] if cfg.data.val_shards else []
        test = _uncached_split(cfg.data.test_shards)[0] if cfg.data.test_shards else []
        p = cfg.data.preprocessing
        prep = Preprocessing(input_size=p.input_size or 224, crop_pct=p.crop_pct or 0.875,
                             mean=tuple(p.mean or (0.485, 0.456, 0.406)), std=tuple(p.std or (0.229, 0.224, 0.225)),
                             interpolation=p.interpolation or "bilinear", channels=p.channels or 3)
        cache_dir, cache_location, num_classes, num_views, feature_dim = None, None, _num_classes(cfg), 1, None
    else:
        cache_dir, cache_location = find_teacher_cache(cfg)
        reader = CacheReader(cache_dir, expect_fingerprint=cfg.data.fingerprint)
        train = resolve_split(cfg.data.train_shards, reader, "train")
        val = resolve_split(cfg.data.val_shards, reader, "val") if cfg.data.val_shards else []
        test = resolve_split(cfg.data.test_shards, reader, "test") if cfg.data.test_shards else []
        meta = reader.meta(train[0].stem)
        prep, num_classes, num_views = Preprocessing.from_dict(meta.preprocessing), meta.num_classes, meta.num_views
        train = _with_label_counts(reader, train)
        labelled = sum(p.labelled or 0 for p in train)  # every count is known after _with_label_counts
        if cfg.data.unlabelled_shards:
            train += _unlabelled_pool(cfg, reader, train)
        feature_kd = [name for name, v in variants if v.feature_kd]
        feature_dim = cache_feature_dim(reader, [p.stem for p in train], feature_kd) if feature_kd else None
    if not train:
        raise DataJoinError("no train shards")
    _check_held_out(train, val, test)
    for name, v in variants:
        wants_labels = "label" in v.make_loss().needs
        if wants_labels and labelled == 0:
            raise ValueError(f"variant {name}: the train shards have no labels, so only pure distillation works; "
                             "set alpha: 1 (mode soft/hard/online)")
        if v.num_workers > len(train_pairs(train, v.mode)):
            raise ValueError(f"variant {name}: {v.num_workers} workers but only {len(train_pairs(train, v.mode))} "
                             "train shards (mode none skips the unlabelled pool); "
                             "each rank needs at least one shard (write smaller shards or use fewer workers)")
    if labelled < sum(p.rows for p in train):
        log.info("%d of %d train samples are labelled", labelled, sum(p.rows for p in train))
    return JobSpec(run_dir=Path(cfg.run_dir).resolve(), cache_dir=cache_dir.resolve() if cache_dir else None,
                   cache_location=cache_location, fingerprint=reader.fingerprint if cache_dir else None,
                   train=train, val=val, test=test, num_classes=num_classes,
                   num_views=num_views, teacher_prep=prep, teacher=cfg.teacher,
                   shuffle_buffer=cfg.data.shuffle_buffer,
                   interleave_shards=cfg.data.interleave_shards or (4 if cfg.data.unlabelled_shards else 1),
                   loader_workers=cfg.data.loader_workers,
                   labelled_passes=cfg.data.labelled_passes,
                   log_every=cfg.log_every, metrics_port=cfg.metrics_port, metrics_host=cfg.metrics_host,
                   keep_checkpoints=cfg.keep_checkpoints,
                   metrics_targets_dir=Path(cfg.metrics_targets_dir or Path(cfg.run_dir) / "metrics_targets").resolve(),
                   train_crop_scale=cfg.data.train_crop_scale,
                   train_crop_ratio=cfg.data.train_crop_ratio, train_flip=cfg.data.train_flip,
                   train_rotate=cfg.data.train_rotate,
                   feature_dim=feature_dim,
                   asha=AshaRule(max(v.epochs for _, v in variants), cfg.tune.asha_grace_epochs,
                                 cfg.tune.asha_reduction_factor) if cfg.tune.asha else None)

