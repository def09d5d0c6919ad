"""Labelled shards plus an unlabelled pool: which rows a variant trains on, and how many of each it saw.

Distilled variants (soft/hard/online) train on every row: the KD term applies to all of them, the CE term only
to labelled ones (label -1 has zero CE weight in losses.py). Mode none has nothing to learn from an unlabelled
row, so the pool's shards are left out of its epochs (fewer steps, same recipe otherwise).
"""

from __future__ import annotations

from student_train.data import ShardPair


def train_pairs(pairs: list[ShardPair], mode: str) -> list[ShardPair]:
    """The train shards a variant of this mode reads: all of them, or (mode none) all but the unlabelled pool."""
    if mode != "none":
        return list(pairs)
    return [p for p in pairs if not p.unlabelled]


def samples_per_epoch(pairs: list[ShardPair], mode: str) -> tuple[int, int]:
    """(labelled, unlabelled) rows that reach the loss in one epoch; mode none counts no unlabelled rows."""
    used = train_pairs(pairs, mode)
    labelled = sum(0 if p.unlabelled else (p.rows if p.labelled is None else p.labelled) for p in used)
    unlabelled = 0 if mode == "none" else sum(p.rows for p in used) - labelled
    return labelled, unlabelled
