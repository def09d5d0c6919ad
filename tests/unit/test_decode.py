"""The decode module: both replay paths agree; bad samples become reasons, checked before decoding."""

import io
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from distill.images.decode import (
    REPLAY_TOLERANCE,
    DecodeSpec,
    SampleError,
    decode_batch_gpu,
    decode_cpu,
    parse_label,
    replay_views_tensor,
    try_decode_cpu,
)
from distill.images.decode_pool import DecodePool
from distill.images.shards import RawSample
from distill.images.views import ViewPolicy, replay_view, sample_views


def _photo(i: int = 0) -> np.ndarray:
    from sklearn.datasets import load_sample_images

    return load_sample_images().images[i]  # real 427x640 photos shipped inside scikit-learn


def _bytes(arr: np.ndarray, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format=fmt, **kw)
    return buf.getvalue()


@pytest.mark.parametrize("interpolation", ["bilinear", "bicubic", "nearest"])
def test_both_replay_paths_agree_within_the_stated_tolerance(interpolation):
    """The device path (float resize) run on CPU tensors against the reference replay_view (uint8 kernel)."""
    image = torch.from_numpy(_photo(0).copy()).permute(2, 0, 1).contiguous()
    policy = ViewPolicy(num_views=8, seed=3)
    diffs = []
    for k in range(6):
        views = sample_views(f"key{k}", image.shape[1], image.shape[2], policy)
        ref = torch.stack([replay_view(image, v, 96, interpolation) for v in views])
        dev = replay_views_tensor(image, views, 96, interpolation)
        assert dev.shape == ref.shape and dev.dtype == torch.uint8
        diffs.append((ref.int() - dev.int()).abs())
    d = torch.cat([x.flatten() for x in diffs]).float()
    assert d.max() <= REPLAY_TOLERANCE
    assert d.mean() < 0.5  # rounding noise (measured ~0.1 at 96 px, ~0.01 at 224 px), not another crop or flip


def test_replay_paths_differ_when_the_flip_is_wrong():
    """The agreement test can fail: a mirrored view is far outside the tolerance."""
    image = torch.from_numpy(_photo(1).copy()).permute(2, 0, 1).contiguous()
    v = sample_views("k", image.shape[1], image.shape[2], ViewPolicy(num_views=2, flip=True))[0]
    ref = replay_view(image, v, 64)
    assert (ref.int() - replay_views_tensor(image, [v], 64)[0].flip(-1).int()).abs().max() > 20


def _spec(**kw) -> DecodeSpec:
    return DecodeSpec(channels=3, input_size=32, interpolation="bilinear", policy=ViewPolicy(num_views=2), **kw)


def _cmyk_jpeg(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).convert("CMYK").save(buf, format="JPEG")
    return buf.getvalue()


def test_gpu_backend_code_path_on_cpu_tensors_matches_the_cpu_backend():
    """decode_batch_gpu with device=cpu: libjpeg through torchvision + device replay, PNG through the fallback."""
    photo = _photo(0)[:300, :400]
    raws = [RawSample("a", {"jpg": _bytes(photo, "JPEG", quality=92), "cls": b"3"}),
            RawSample("b", {"png": _bytes(photo, "PNG")}),
            RawSample("c", {"jpg": b"not an image"}),
            RawSample("d", {"jpg": _cmyk_jpeg(photo)})]
    spec = _spec(num_classes=10)
    gpu = decode_batch_gpu(raws, spec, torch.device("cpu"))
    cpu = [try_decode_cpu(r, spec) for r in raws]
    assert isinstance(gpu[2], str) and isinstance(cpu[2], str)
    for i in (0, 1, 3):
        assert gpu[i].views == cpu[i].views and gpu[i].hw == cpu[i].hw and gpu[i].label == cpu[i].label
        assert (gpu[i].pixels.int() - cpu[i].pixels.int()).abs().max() <= REPLAY_TOLERANCE


def test_pixel_limit_is_checked_from_the_header_before_decoding():
    big = _bytes(np.zeros((7000, 7000), np.uint8), "PNG")  # 49 Mpx in a few dozen KB
    truncated = big[: len(big) // 2]  # decoding this would fail differently: the check must come first
    with pytest.raises(SampleError, match="max_image_pixels=40,000,000"):
        decode_cpu(truncated, 1, 40_000_000)
    assert decode_cpu(_bytes(np.zeros((50, 60), np.uint8), "PNG"), 1, 40_000_000).shape == (1, 50, 60)


def test_only_accepted_formats_are_opened():
    gif = _bytes(np.zeros((10, 10), np.uint8), "GIF")
    with pytest.raises(SampleError, match="cannot read the image header"):
        decode_cpu(gif, 3, 40_000_000)


@pytest.mark.parametrize("cls,ok", [(b"0", True), (b"9", True), (b"10", False), (b"-1", False),
                                    (b"99999999999", False), (b"x", False)])
def test_labels_outside_the_teachers_classes_are_bad_samples(cls, ok):
    raw = RawSample("k", {"cls": cls})
    if ok:
        assert parse_label(raw, 10) == int(cls)
    else:
        with pytest.raises(SampleError, match="bad .cls"):
            parse_label(raw, 10)


def test_process_pool_gives_the_same_samples_in_order():
    photo = _photo(1)[:120, :160]
    raws = [RawSample(f"k{i}", {"jpg": _bytes(np.roll(photo, i * 7, axis=1), "JPEG")}) for i in range(11)]
    raws.insert(4, RawSample("bad", {"jpg": b"\xff\xd8 broken"}))
    spec = _spec()
    inline = list(DecodePool(spec, 0).map(raws))
    pool = DecodePool(spec, 2, chunk=3)
    try:
        forked = list(pool.map(raws))
    finally:
        pool.close()
    assert [k for k, _ in forked] == [r.key for r in raws]
    for (_, a), (_, b) in zip(inline, forked, strict=True):
        assert isinstance(a, str) == isinstance(b, str)
        if not isinstance(a, str):
            assert torch.equal(a.pixels, b.pixels) and a.views == b.views


def test_a_killed_decode_process_loses_no_sample():
    """A decode worker SIGKILLed mid-shard (OOM killer): its chunk is redone in a fresh process, the pool restarts."""
    import os
    import signal

    photo = _photo(0)[:100, :120]
    raws = [RawSample(f"k{i}", {"jpg": _bytes(np.roll(photo, i, axis=0), "JPEG")}) for i in range(12)]
    pool = DecodePool(_spec(), 1, chunk=2)
    try:
        it = pool.map(raws)
        out = [next(it)]
        for pid in list(pool._pool._processes):  # the worker of the chunks still in flight
            os.kill(pid, signal.SIGKILL)
        out += list(it)
    finally:
        pool.close()
    assert [k for k, _ in out] == [r.key for r in raws]
    assert all(not isinstance(r, str) for _, r in out)


def test_decode_processes_end_with_a_killed_parent(tmp_path):
    """A SIGKILLed labeller leaves no decode process behind (one would hold its pipes open for ever)."""
    import os
    import signal
    import subprocess
    import sys
    import time

    script = ("import sys, time\n"
              "from distill.images.decode_pool import DecodePool\n"
              "from distill.images.decode import DecodeSpec\n"
              "from distill.images.views import ViewPolicy\n"
              "pool = DecodePool(DecodeSpec(channels=3, input_size=32, interpolation='bilinear',"
              " policy=ViewPolicy(num_views=2)), 1)\n"
              "list(pool.map([]))\n"
              "pool._pool.submit(int, 0).result()\n"  # the worker is up
              "print(*pool._pool._processes, flush=True)\n"
              "time.sleep(600)\n")
    parent = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True,
                              cwd=str(tmp_path), env=dict(os.environ, PYTHONPATH=os.getcwd()))
    workers = [int(p) for p in parent.stdout.readline().split()]
    assert workers
    os.kill(parent.pid, signal.SIGKILL)
    parent.wait()
    deadline = time.time() + 300  # only against a hang: the loop ends as soon as they are gone
    alive = workers
    while alive and time.time() < deadline:
        time.sleep(0.2)
        alive = [w for w in workers if os.path.exists(f"/proc/{w}") and
                 "zombie" not in Path(f"/proc/{w}/status").read_text().lower()]
    for w in alive:  # clean up before failing
        os.kill(w, signal.SIGKILL)
    assert not alive, f"decode processes {alive} outlived their SIGKILLed parent"
