"""Which students share a data stream: the groups of a run, planned before training and printed.

Students whose stream is the same (train shards and pool as their mode reads them, passes per epoch, views, batch
size, epochs, data seed, input preprocessing, ranks, online teacher or not) train in one group: one loader decodes,
replays and joins each batch once and every student of the group steps on it. Everything else stays per student
(optimizer, schedule, loss, checkpoints, files; train_loop.py). Inside a group, students of one architecture and
training set-up can also be fused into one batched model (`train.horizontal`, fused.py).

`train.fuse`: auto = every student in the group of its stream; off = each student alone (one loader each, as
before groups); N = groups of at most N students.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from distill.student_train.job import JobSpec, data_seed, student_prep
from distill.student_train.unlabelled import labelled_passes, train_pairs
from distill.student_train.variant import VariantConfig
from distill.teacher_cache.contract import views_to_use

FUSE_FIELDS = ("arch", "arch_kwargs", "precision", "zero_stage", "optimizer", "grad_accum", "feature_kd")


@dataclass
class Group:
    id: str
    members: list[tuple[str, VariantConfig]]
    fused: list[list[str]] = field(default_factory=list)  # sets of members trained as one fused model

    @property
    def names(self) -> list[str]:
        return [n for n, _ in self.members]

    def resources(self) -> dict[str, float]:
        """What one rank of the group needs: the most any member asks for (they run in one process per rank)."""
        cpus = max(v.cpus_per_worker for _, v in self.members)
        gpus = max(v.gpus_per_worker for _, v in self.members)
        return {"CPU": cpus} | ({"GPU": gpus} if gpus > 0 else {})


def stream_key(v: VariantConfig, job: JobSpec) -> dict[str, Any]:
    """What must be equal for two students to share one loader (each value readable in the plan)."""
    pairs = train_pairs(job.train, v.mode)
    prep = student_prep(v, job.teacher_prep)
    return {
        "train shards": _shards(pairs),
        "passes per epoch": labelled_passes(job.train, v.mode, job.labelled_passes),
        "views": views_to_use(v.views, job.num_views),
        "batch_size": v.batch_size,
        "epochs": v.epochs,
        "data seed": data_seed(v),
        "input": f"{prep.input_size}px {prep.channels}ch mean {list(prep.mean)} std {list(prep.std)}",
        "ranks": v.num_workers,
        "online teacher": v.mode == "online",
    }


def _shards(pairs: list) -> str:
    pool = sum(p.unlabelled for p in pairs)
    return f"{len(pairs) - pool} labelled + {pool} pool" if pool else f"{len(pairs)}"


def fuse_key(v: VariantConfig) -> tuple:
    return tuple(repr(getattr(v, f)) for f in FUSE_FIELDS)


def plan_groups(variants: list[tuple[str, VariantConfig]], job: JobSpec, fuse: str | int = "auto",
                horizontal: str = "auto", device_type: str | None = None) -> list[Group]:
    """Groups in the order of their first member; `device_type` (cpu/cuda, None: from gpus_per_worker) decides
    `horizontal: auto` (fuse same-architecture students on CUDA; on the CPU they loop, BENCHMARKS.md)."""
    buckets: dict[str, list[tuple[str, VariantConfig]]] = {}
    for name, v in variants:
        key = repr(sorted(stream_key(v, job).items())) if fuse != "off" else name
        buckets.setdefault(key, []).append((name, v))
    limit = fuse if isinstance(fuse, int) else None
    groups: list[Group] = []
    for members in buckets.values():
        size = limit or len(members)
        for i in range(0, len(members), size):
            part = members[i:i + size]
            groups.append(Group(f"g{len(groups) + 1}", part, _fused_sets(part, horizontal, device_type)))
    return groups


def _fused_sets(members: list[tuple[str, VariantConfig]], horizontal: str, device_type: str | None) -> list[list[str]]:
    if horizontal == "off" or len(members) < 2:
        return []
    if horizontal == "auto":
        dev = device_type or ("cuda" if members[0][1].gpus_per_worker > 0 else "cpu")
        if dev != "cuda":
            return []
    by_key: dict[tuple, list[str]] = {}
    for name, v in members:
        if not v.feature_kd and v.zero_stage == 0:
            by_key.setdefault(fuse_key(v), []).append(name)
    return [names for names in by_key.values() if len(names) > 1]


def _differences(a: dict[str, Any], b: dict[str, Any]) -> list[str]:
    return [f"{k} {a[k]} (not {b[k]})" for k in a if a[k] != b[k]]


def format_plan(groups: list[Group], job: JobSpec, fuse: str | int) -> str:
    """The plan printed before training: each group, its students and its stream; for a student with a stream of
    its own beside others (the twin beside an unlabelled pool), why its stream differs."""
    lines = [f"training plan: {sum(len(g.members) for g in groups)} student(s) in {len(groups)} group(s) "
             f"(train.fuse: {fuse}); each group reads its data once for all its students"]
    keys = {g.id: stream_key(g.members[0][1], job) for g in groups}
    for g in groups:
        k = keys[g.id]
        lines.append(f"  {g.id}: {', '.join(g.names)}")
        lines.append(f"      stream: {k['train shards']} train shards, {k['passes per epoch']} pass(es) per epoch, "
                     f"{k['views']} view(s), batch {k['batch_size']}, {k['epochs']} epochs, data seed "
                     f"{k['data seed']}, {k['input']}, {k['ranks']} rank(s)" +
                     (", online teacher" if k["online teacher"] else ""))
        for names in g.fused:
            lines.append(f"      fused into one model (same architecture): {', '.join(names)}")
        others = [(o, _differences(k, keys[o.id])) for o in groups if o is not g]
        if others and fuse != "off":
            nearest, diff = min(others, key=lambda od: len(od[1]))
            if diff:
                lines.append(f"      a stream of its own, unlike {nearest.id}'s: " + "; ".join(diff) + _why(g, diff))
            else:
                lines.append(f"      the stream of {nearest.id} too (train.fuse: {fuse} students per group at most)")
    return "\n".join(lines)


def _why(g: Group, diff: list[str]) -> str:
    if any(v.mode == "none" for _, v in g.members) and any(d.startswith(("train shards", "passes")) for d in diff):
        return (" (mode none cannot learn from the unlabelled pool, so it skips it and makes more passes over "
                "the labelled shards: a different stream)")
    return ""
