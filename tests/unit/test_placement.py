"""Issue 21 items 10 and 11: where the labellers run is decided once (device, precision, decode backend), the
file records it, and the classifier head runs in fp32 under autocast."""

import pytest
import torch
from torch import nn

from distill.core.devices import DeviceError
from distill.images.preprocessing import Preprocessing
from distill.teacher.hooks import Fp32Head
from distill.teacher.load import LoadedTeacher
from distill.teacher_cache.config import CacheConfig
from distill.teacher_cache.fingerprint import fingerprint
from distill.teacher_cache.placement import PlacementError, resolve_placement
from distill.teacher_cache.schema import META_PRECISION, CacheMeta

NO_CUDA = not torch.cuda.is_available()


def _cfg(**over) -> CacheConfig:
    return CacheConfig.model_validate({"shards": ["x.tar"], "cache_root": "/nonexistent",
                                       "teacher": {"arch": "resnet_mini", "pretrained": True}, **over})


def _teacher() -> LoadedTeacher:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(16, 10)).eval()
    return LoadedTeacher(model, 10, Preprocessing(4, 1.0, (0.1,), (0.3,), "bilinear", 1),
                         {"source": "arch", "arch": "x", "weights_sha256": "ab", "num_classes": 10, "arch_kwargs": {}})


def test_gpu_actors_label_in_bf16_whatever_the_driver_has():
    """A CPU head (this machine) with GPU actors: the fingerprint and the actors must both say bf16."""
    gpu_actors = resolve_placement(_cfg(ray={"gpus_per_actor": 1}))
    assert (gpu_actors.device, gpu_actors.precision, gpu_actors.decode_backend) == ("cuda", "bf16", "gpu")
    cpu_actors = resolve_placement(_cfg(ray={"gpus_per_actor": 0}))
    assert (cpu_actors.device, cpu_actors.precision, cpu_actors.decode_backend) == ("cpu", "fp32", "cpu")
    teacher = _teacher()
    fp_gpu = fingerprint(teacher, _cfg(ray={"gpus_per_actor": 1}))  # unresolved: the same rule applies
    assert fp_gpu != fingerprint(teacher, _cfg(ray={"gpus_per_actor": 0}))
    assert fp_gpu == fingerprint(teacher, _cfg(precision="bf16", device="cpu"))  # the numbers bf16 gives
    assert resolve_placement(gpu_actors) == gpu_actors  # resolved once: passing it down changes nothing


@pytest.mark.skipif(not NO_CUDA, reason="checks the refusal on a host without CUDA")
def test_an_actor_told_cuda_on_a_node_without_it_fails_its_start():
    resolved = resolve_placement(_cfg(ray={"gpus_per_actor": 1}))
    with pytest.raises(DeviceError, match="torch sees no CUDA device"):
        resolve_placement(resolved, in_this_process=True)  # what the labeller does in its actor


def test_in_process_labeller_resolves_for_this_host():
    here = resolve_placement(_cfg(ray={"enabled": False}))
    want = ("cpu", "fp32", "cpu") if NO_CUDA else ("cuda", "bf16", "gpu")
    assert (here.device, here.precision, here.decode_backend) == want


def test_impossible_placements_fail_before_any_work():
    with pytest.raises(PlacementError, match="ray.gpus_per_actor is 0: Ray hides the GPUs"):
        resolve_placement(_cfg(device="cuda"))
    with pytest.raises(PlacementError, match="decode_backend: gpu needs the teacher on CUDA"):
        resolve_placement(_cfg(decode_backend="gpu", device="cpu"))


def test_precision_and_decode_backend_recorded_and_old_files_still_read():
    base = dict(schema_version=2, fingerprint="fp", k=5, num_views=2, num_classes=10, preprocessing={},
                teacher={}, shard="s", view_policy={})
    m = CacheMeta(**base, precision="bf16", head_precision="fp32", decode_backend="gpu")
    assert CacheMeta.from_kv(m.to_kv(), "f") == m and m.to_kv()[META_PRECISION] == b"bf16"
    old = CacheMeta(**base).to_kv()
    assert META_PRECISION not in old
    assert CacheMeta.from_kv(old, "f").precision is None


def test_fp32_head_under_bf16_autocast():
    """Item 11: the head's output is the fp32 matmul of what the body gave it, not a bf16 rounding of it."""
    torch.manual_seed(0)
    head = nn.Linear(64, 1000)
    x = torch.randn(8, 64) * 4
    with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16):
        assert head(x).dtype == torch.bfloat16  # what autocast does on its own
        hook = Fp32Head.install(nn.Sequential(head))
        out = head(x)
    assert hook is not None and out.dtype == torch.float32
    torch.testing.assert_close(out, nn.functional.linear(x, head.weight, head.bias), rtol=0, atol=1e-5)
    hook.remove()
    with torch.inference_mode():
        assert head(x).dtype == torch.float32  # without autocast the hook changes nothing


def test_fp32_head_only_where_it_can_be_hooked():
    class Scaled(nn.Linear):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return super().forward(x) * 2

    assert Fp32Head.install(nn.Sequential(nn.Flatten())) is None  # no Linear
    assert Fp32Head.install(nn.Sequential(Scaled(4, 2))) is None  # its own forward: not ours to recompute
    assert Fp32Head.install(torch.jit.script(nn.Sequential(nn.Linear(4, 2)))) is None  # TorchScript hides it
