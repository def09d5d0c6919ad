"""Device selection (`device: auto|cpu|cuda`) for the cache pass and training."""

import pytest
import torch

from distill.core.devices import DeviceError, resolve_device
from distill.student_train.config import TrainConfig


def test_cpu_is_always_cpu():
    assert resolve_device("cpu") == torch.device("cpu")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU branch")
def test_auto_without_cuda_is_cpu_and_cuda_is_a_config_error():
    assert resolve_device("auto", local_rank=3) == torch.device("cpu")
    with pytest.raises(DeviceError, match="device: cuda"):
        resolve_device("cuda")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_auto_with_cuda_picks_the_local_rank():
    n = torch.cuda.device_count()
    assert resolve_device("auto", local_rank=n + 1) == torch.device("cuda", (n + 1) % n)


def test_train_config_has_a_device_field():
    base = {"run_dir": "r", "data": {"train_shards": ["x.tar"]}, "base": {"mode": "none"}}
    assert TrainConfig.model_validate(base).device == "auto"
    assert TrainConfig.model_validate({**base, "device": "cpu"}).device == "cpu"
    with pytest.raises(ValueError, match="device"):
        TrainConfig.model_validate({**base, "device": "tpu"})
