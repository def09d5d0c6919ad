"""Labelled shards plus an unlabelled pool: which rows a variant trains on, and how many of each it saw.

Distilled variants (soft/hard/online) train on every row: the KD term applies to all of them, the CE term only
to labelled ones (label -1 has zero CE weight in losses.py). Mode none has nothing to learn from an unlabelled
row, so the pool's shards are left out of its epochs; instead each of its epochs makes several passes over the
labelled rows (round(all rows / labelled rows), or `data.labelled_passes`), so that an undistilled twin takes as
many optimizer steps as the distilled variants that also read the pool. Without that the twin of a 10%-labelled
sweep would train ten times fewer steps, and the Δ against it would measure the step budget, not the teacher.
"""

from __future__ import annotations

from distill.student_train.data import ShardPair


def train_pairs(pairs: list[ShardPair], mode: str) -> list[ShardPair]:
    """The train shards a variant of this mode reads: all of them, or (mode none) all but the unlabelled pool."""
    if mode != "none":
        return list(pairs)
    return [p for p in pairs if not p.unlabelled]


def labelled_passes(pairs: list[ShardPair], mode: str, fixed: int | None = None) -> int:
    """Passes over the train shards per epoch: 1, except for mode none beside an unlabelled pool, which makes
    `fixed` passes or, by default, round(all rows / rows of the labelled shards): equal optimizer steps."""
    if mode != "none" or not any(p.unlabelled for p in pairs):
        return 1
    if fixed is not None:
        return fixed
    own = sum(p.rows for p in pairs if not p.unlabelled)
    return max(1, round(sum(p.rows for p in pairs) / max(1, own)))


def samples_per_epoch(pairs: list[ShardPair], mode: str, fixed_passes: int | None = None) -> tuple[int, int]:
    """(labelled, unlabelled) rows that reach the loss in one epoch; mode none counts no unlabelled rows, and each
    of its labelled rows once per pass."""
    used = train_pairs(pairs, mode)
    labelled = sum(0 if p.unlabelled else (p.rows if p.labelled is None else p.labelled) for p in used)
    unlabelled = 0 if mode == "none" else sum(p.rows for p in used) - labelled
    return labelled * labelled_passes(pairs, mode, fixed_passes), unlabelled
