"""The cache stage on real MNIST digits in real WebDataset tars: in-process, Ray, incremental, bad input."""

import os
import time
import urllib.request

import numpy as np
import pytest
import torch
from helpers import cache_cfg_dict, encode, mnist, mnist_shard, save_teacher, write_tar

from distill.images.views import image_to_tensor, normalize, replay_view
from distill.teacher.load import load_teacher
from distill.teacher_cache.config import CacheConfig
from distill.teacher_cache.reader import CacheError, CacheReader, read_errors
from distill.teacher_cache.run import run
from distill.teacher_cache.topk import rebuild_log_probs

pytestmark = pytest.mark.integration


@pytest.fixture()
def setup(tmp_path):
    shards = [mnist_shard(tmp_path / "in" / f"train-{i:06d}.tar", 40, offset=40 * i) for i in range(3)]
    ckpt = save_teacher(tmp_path / "teacher.pt")
    return tmp_path, shards, ckpt


def _cfg(tmp, ckpt, **over):
    root = over.pop("cache_root", tmp / "cache")
    return CacheConfig.model_validate(cache_cfg_dict([str(tmp / "in" / "*.tar")], root, ckpt, **over))


def _all_keys(cache_dir):
    r = CacheReader(cache_dir)
    return [k for s in r.shards for k in r.arrays(s).keys]


def test_cache_written_and_read_back(setup):
    tmp, shards, ckpt = setup
    res = run(_cfg(tmp, ckpt))
    assert res.status == "success" and res.images == 120 and len(res.labelled) == 3
    reader = CacheReader(res.cache_dir)
    assert reader.shards == ["train-000000", "train-000001", "train-000002"]
    a = reader.arrays("train-000001")
    x, y = mnist(40, 40)
    assert a.keys == [f"train-000001_{i:05d}" for i in range(40)]
    assert np.array_equal(a.labels, y)
    assert a.topk_ids.shape == (40, 3, 5) and a.topk_logits.dtype == np.float16
    assert (a.image_hw == 28).all()
    meta = reader.meta("train-000001")
    assert (meta.k, meta.num_views, meta.num_classes, meta.fingerprint) == (5, 3, 10, res.fingerprint)
    assert meta.preprocessing["input_size"] == 32 and meta.teacher["arch"] == "resnet_mini"
    # rebuilt distributions are proper distributions
    lp = rebuild_log_probs(torch.from_numpy(a.topk_ids[:, 0].astype(np.int64)), torch.from_numpy(a.topk_logits[:, 0]),
                           torch.from_numpy(a.tail_lse[:, 0]), 10)
    assert torch.allclose(lp.exp().sum(1), torch.ones(40), atol=1e-3)


def test_replayed_view_reproduces_cached_topk(setup):
    tmp, shards, ckpt = setup
    cfg = _cfg(tmp, ckpt)
    res = run(cfg)
    teacher = load_teacher(cfg.teacher)
    prep = teacher.preprocessing
    a = CacheReader(res.cache_dir).arrays("train-000000")
    x, _ = mnist(40, 0)
    from PIL import Image

    crops = []
    for i in range(40):
        img = image_to_tensor(Image.fromarray(x[i]), prep.channels)
        crops += [replay_view(img, a.view(i, v), prep.input_size, prep.interpolation) for v in range(3)]
    with torch.inference_mode():
        logits = teacher.model(normalize(torch.stack(crops), prep.mean, prep.std))
    lp = torch.log_softmax(logits, 1).reshape(40, 3, 10)
    ids = torch.topk(lp, 5, -1).indices.numpy()
    assert (ids[..., 0] == a.topk_ids[..., 0]).mean() == 1.0
    vals = torch.gather(lp, 2, torch.from_numpy(a.topk_ids.astype(np.int64))).numpy()
    np.testing.assert_allclose(vals, a.topk_logits.astype(np.float32), atol=5e-3, rtol=2e-3)


def test_ray_path_gives_identical_rows(setup, ray_local):
    tmp, shards, ckpt = setup
    local = run(_cfg(tmp, ckpt))
    ray_res = run(_cfg(tmp, ckpt, cache_root=str(tmp / "cache_ray"),
                       ray={"enabled": True, "num_actors": 2, "cpus_per_actor": 0.5}))
    assert ray_res.status == "success" and ray_res.fingerprint == local.fingerprint
    assert ray_res.labelled_on_driver == []  # Ray was up already: the actors labelled every shard (head_start.py)
    r1, r2 = CacheReader(local.cache_dir), CacheReader(ray_res.cache_dir)
    assert r1.shards == r2.shards
    for s in r1.shards:
        a, b = r1.arrays(s), r2.arrays(s)
        assert a.keys == b.keys and np.array_equal(a.crops, b.crops) and np.array_equal(a.flips, b.flips)
        assert np.array_equal(a.topk_ids[..., 0], b.topk_ids[..., 0])
        np.testing.assert_allclose(a.topk_logits.astype(np.float32), b.topk_logits.astype(np.float32), atol=2e-3)


def test_incremental_refresh(setup):
    tmp, shards, ckpt = setup
    cfg = _cfg(tmp, ckpt)
    first = run(cfg)
    noop = run(cfg)
    assert noop.labelled == [] and len(noop.unchanged) == 3 and noop.images == 0
    # touch one shard (same bytes), add one, change one
    later = time.time() + 5
    os.utime(shards[0], (later, later))
    mnist_shard(tmp / "in" / "train-000003.tar", 10, offset=500)
    mnist_shard(shards[2], 40, offset=900)
    third = run(cfg)
    assert sorted(third.labelled) == ["train-000002", "train-000003"]
    assert third.touched == ["train-000000"] and "train-000000" in third.unchanged
    assert len(_all_keys(first.cache_dir)) == 130
    # a vanished shard is reported, its cache kept
    shards[1].unlink()
    assert run(cfg).vanished == ["train-000001"]
    # a changed teacher (weights, or k) writes to a new fingerprint directory; the old one stays readable
    ckpt2 = save_teacher(tmp / "teacher2.pt", seed=1)
    new_w = run(_cfg(tmp, ckpt2))
    new_k = run(_cfg(tmp, ckpt, topk=3))
    assert len({first.fingerprint, new_w.fingerprint, new_k.fingerprint}) == 3
    assert len(new_w.labelled) == 3 and CacheReader(first.cache_dir).shards


def test_bad_samples_and_bad_shards_fail_alone(tmp_path):
    x, y = mnist(6)
    good = [(f"g{i}", {"png": encode(x[i]), "cls": str(int(y[i])).encode()}) for i in range(3)]
    write_tar(tmp_path / "in" / "mixed.tar", good + [
        ("broken", {"jpg": b"\xff\xd8 not really a jpeg", "cls": b"1"}),
        ("rgba", {"png": encode(x[3], mode="RGBA")}),  # unlabelled, RGBA
        ("webp", {"webp": encode(x[4], "webp"), "cls": b"4"}),
        ("jpeg", {"jpg": encode(x[5], "jpg"), "cls": b"5"}),
        ("nolabel_text", {"png": encode(x[0]), "cls": b"seven"}),
        ("noimage", {"cls": b"2"}),
    ])
    trunc = mnist_shard(tmp_path / "in" / "trunc.tar", 20)
    trunc.write_bytes(trunc.read_bytes()[: trunc.stat().st_size // 2])
    write_tar(tmp_path / "in" / "dup.tar", [("a", {"png": encode(x[0])}), ("b", {"png": encode(x[1])}),
                                            ("a", {"cls": b"1"})])
    ckpt = save_teacher(tmp_path / "t.pt")
    res = run(_cfg(tmp_path, ckpt))
    assert res.status == "partial" and res.labelled == ["mixed"]
    assert "trunc.tar: corrupt or truncated" in res.failed["trunc"]
    assert "duplicate key 'a'" in res.failed["dup"]
    reader = CacheReader(res.cache_dir)
    a = reader.arrays("mixed")
    assert a.keys == ["g0", "g1", "g2", "rgba", "webp", "jpeg"]
    assert a.labels.tolist()[3:] == [-1, 4, 5]
    errs = {e["key"]: e["reason"] for e in read_errors(res.cache_dir)}
    assert set(errs) == {"broken", "nolabel_text", "noimage"}
    assert "cannot decode .jpg" in errs["broken"] and "no image file" in errs["noimage"]
    with pytest.raises(CacheError, match="'trunc' has no complete cache file"):
        reader.arrays("trunc")


def test_reader_rejects_altered_file(setup):
    tmp, shards, ckpt = setup
    res = run(_cfg(tmp, ckpt))
    f = CacheReader(res.cache_dir).path("train-000000")  # <stem>-<sha16>.parquet
    f.write_bytes(f.read_bytes()[:-10] + b"0123456789")
    with pytest.raises(CacheError, match="partial or altered file"):
        CacheReader(res.cache_dir).arrays("train-000000")


def test_metrics_endpoint_counts_the_work(setup):
    from distill.core.metrics_server import start_metrics_server
    from distill.teacher_cache import metrics

    tmp, shards, ckpt = setup
    before = metrics.IMAGES._value.get()
    port = start_metrics_server("127.0.0.1", 0)
    run(_cfg(tmp, ckpt))
    body = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    line = next(ln for ln in body.splitlines() if ln.startswith("distill_cache_images_total "))
    assert float(line.split()[1]) - before == 120
    assert 'distill_cache_shards_total{status="done"}' in body
    assert "distill_cache_batch_latency_seconds_count" in body


def test_noop_refresh_loads_no_teacher_and_rewritten_weights_refingerprint(setup, monkeypatch):
    tmp, shards, ckpt = setup
    cfg = _cfg(tmp, ckpt)
    import distill.images.shards as shards_mod

    time.sleep(shards_mod.RACY_WINDOW_NS / 1e9)  # a teacher written within the racy window is never memoised, and a
    first = run(cfg)  # warm process can load and fingerprint it that fast (this test failed so in a full run)
    import distill.teacher_cache.run as run_mod

    with monkeypatch.context() as m:
        m.setattr(run_mod, "load_teacher", lambda *_: pytest.fail("no-op refresh loaded the teacher"))
        m.setattr(shards_mod.ShardReader, "__iter__", lambda *_: pytest.fail("no-op refresh read a shard"))
        noop = run(cfg)
    assert noop.fingerprint == first.fingerprint and noop.labelled == []
    time.sleep(0.01)
    save_teacher(ckpt, seed=7)  # same path, new weights, new mtime
    again = run(cfg)
    assert again.fingerprint != first.fingerprint and len(again.labelled) == 3


def test_torchscript_and_export_teachers(setup):
    tmp, shards, ckpt = setup
    cfg = _cfg(tmp, ckpt)
    teacher = load_teacher(cfg.teacher)
    scripted = tmp / "teacher_ts.pt"
    torch.jit.script(teacher.model).save(str(scripted))
    exported = tmp / "teacher.pt2"
    torch.export.save(torch.export.export(teacher.model, (torch.zeros(2, 1, 32, 32),),
                                          dynamic_shapes=({0: torch.export.Dim("batch")},)), str(exported))
    base = run(cfg)
    ref = CacheReader(base.cache_dir).arrays("train-000000")
    for path in (scripted, exported):
        over = {"teacher": {"scripted": str(path),
                            "preprocessing": {"input_size": 32, "crop_pct": 0.875, "mean": [0.13], "std": [0.31],
                                              "channels": 1}},
                "cache_root": str(tmp / f"cache_{path.suffix}")}
        res = run(_cfg(tmp, ckpt, **over))
        assert res.status == "success"
        got = CacheReader(res.cache_dir).arrays("train-000000")
        assert np.array_equal(got.topk_ids[..., 0], ref.topk_ids[..., 0])
        assert CacheReader(res.cache_dir).manifest.teacher["source"] in ("torchscript", "torch.export")


def test_progress_is_polled_taken_back_topped_up_and_survives_a_dead_actor(ray_local):
    """The driver polls busy actors for progress: late events of an attempt that is over are ignored, a shard that
    died gives its images back, a finished one is topped up to its rows, and a poll to a dead actor is quiet."""
    from distill.teacher_cache.labeler import ProgressEvent
    from distill.teacher_cache.ray_pool import _Progress

    @ray_local.remote(num_cpus=0)
    class Reporter:  # answers take_progress() like TeacherActor, from a script
        def __init__(self, script):
            self.script = list(script)

        def take_progress(self):
            return self.script.pop(0) if self.script else (("", 0), ProgressEvent())

    ticks = iter(range(1, 1000))  # the driver's clock, one `every` and more per call: each call sends its polls

    def poll_until_answered(progress, actors):
        progress.poll(actors, now=float(next(ticks)))
        assert len(progress.polls) == len(actors)  # sent (the test would pass without it otherwise)
        while progress.polls:
            progress.poll([], now=0.0)

    seen: list[int] = []
    progress = _Progress(lambda ev: seen.append(ev.images), every=0.5)
    actor = Reporter.remote([(("s0", 0), ProgressEvent(images=5)), (("s0", 1), ProgressEvent(images=7))])
    progress.begin("s0", 0)
    poll_until_answered(progress, [actor])
    poll_until_answered(progress, [actor])  # ("s0", 1) is not running: ignored
    assert seen == [5]
    progress.end("s0", 0, keep=False)  # the shard died: its images are taken back
    assert seen == [5, -5]
    progress.begin("s1", 0)
    progress.add(("s1", 0), ProgressEvent(images=3))
    progress.end("s1", 0, keep=True, rows=10)  # written: topped up to its 10 rows (the last poll came late)
    assert sum(seen) == 10
    ray_local.kill(actor)
    progress.begin("s2", 0)
    poll_until_answered(progress, [actor])  # must not raise
    assert sum(seen) == 10 and not progress.polls


def _rewrite_keeping_size_and_mtime(path, edit):
    """What `cp -p` / `rsync -t` / an unpacked archive do: new bytes, same size, the old mtime restored."""
    st = path.stat()
    data = edit(path.read_bytes())
    assert len(data) == st.st_size
    path.write_bytes(data)
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))


def _flip_first_label(data: bytes) -> tuple[bytes, str, int]:
    import io
    import tarfile

    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        member = next(m for m in tar if m.name.endswith(".cls") and m.size == 1)
        old = data[member.offset_data:member.offset_data + 1]
    new = b"7" if old != b"7" else b"3"
    return data[:member.offset_data] + new + data[member.offset_data + 1:], member.name[:-4], int(new)


def test_rewrite_with_mtime_restored_relabels_and_join_check_refuses(setup):
    from distill.student_train.data import DataJoinError, resolve_split

    tmp, shards, ckpt = setup
    cfg = _cfg(tmp, ckpt)
    first = run(cfg)
    edited = {}

    def edit(data):
        out, edited["key"], edited["label"] = _flip_first_label(data)
        return out

    _rewrite_keeping_size_and_mtime(shards[0], edit)
    with pytest.raises(DataJoinError, match="train-000000.tar: changed since it was cached"):
        resolve_split([str(shards[0])], CacheReader(first.cache_dir), "train")
    again = run(cfg)
    assert again.changed == ["train-000000"] and again.labelled == ["train-000000"]
    a = CacheReader(first.cache_dir).arrays("train-000000")
    assert a.labels[a.keys.index(edited["key"])] == edited["label"]
    assert resolve_split([str(shards[0])], CacheReader(first.cache_dir), "train")[0].rows == 40


def test_retrained_teacher_with_same_size_and_mtime_gets_a_new_fingerprint(setup):
    tmp, shards, ckpt = setup
    cfg = _cfg(tmp, ckpt)
    first = run(cfg)
    st = ckpt.stat()
    retrained = save_teacher(tmp / "retrained" / ckpt.name, seed=7)  # same name: same zip layout and size
    assert retrained.stat().st_size == st.st_size
    os.utime(retrained, ns=(st.st_atime_ns, st.st_mtime_ns))
    os.replace(retrained, ckpt)  # like `cp -p` / `rsync -t` onto the old path
    assert (ckpt.stat().st_size, ckpt.stat().st_mtime_ns) == (st.st_size, st.st_mtime_ns)
    again = run(cfg)
    assert again.fingerprint != first.fingerprint and len(again.labelled) == 3


def test_damaged_listed_cache_file_is_refused_on_the_training_path(setup):
    """Same size, altered bytes: the join check (once per run) refuses it, naming the file and the fix."""
    import distill.core.atomic_io as atomic_io
    from distill.student_train.data import resolve_split

    tmp, shards, ckpt = setup
    res = run(_cfg(tmp, ckpt))
    f = CacheReader(res.cache_dir).path("train-000001")
    data = bytearray(f.read_bytes())
    data[len(data) // 2] ^= 0xFF
    f.write_bytes(bytes(data))
    with pytest.raises(CacheError, match=r"train-000001-\w+\.parquet: .*checksum does not match.*delete it and re-run "
                                         r"`distill cache`"):
        resolve_split([str(tmp / "in" / "*.tar")], CacheReader(res.cache_dir), "train")
    # a truncated file is refused even by a reader that skips checksums (size + footer on every open) ...
    f.write_bytes(bytes(data[:-100]))
    with pytest.raises(CacheError, match=r"train-000001-\w+\.parquet: .*bytes but the manifest says"):
        CacheReader(res.cache_dir, verify=False).arrays("train-000001")
    # ... and `distill cache` relabels it
    assert run(_cfg(tmp, ckpt)).changed == ["train-000001"]
    # a good (here: just rewritten) file is checksummed once per process, later opens check size + footer only
    calls = []
    real = atomic_io.file_sha256  # what the reader's checksum_matches hashes with
    atomic_io.file_sha256 = lambda p: calls.append(p) or real(p)
    try:
        resolve_split([str(shards[1])], CacheReader(res.cache_dir), "train")
        CacheReader(res.cache_dir).arrays("train-000001")
    finally:
        atomic_io.file_sha256 = real
    assert [p.name for p in calls] == [CacheReader(res.cache_dir).path("train-000001").name]
