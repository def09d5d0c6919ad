"""QAD's configuration and the variant it trains (compress/qad.py): pure functions, no model, no data."""

import pytest
from pydantic import ValidationError

from distill.compress.config import CompressConfig, QADConfig
from distill.compress.litert_stages import Source, litert_files
from distill.compress.qad import qad_names, qad_variant
from distill.deploy.choose import STAGE_FILES
from distill.deploy.config import DeployConfig
from distill.student_train.config import VariantConfig


def test_qad_is_off_by_default_and_needs_int8():
    cfg = CompressConfig.model_validate({"train_run": "r", "out_dir": "o"})
    assert cfg.qad.enabled is False and cfg.qad.models == ["baseline"]
    with pytest.raises(ValidationError, match="qad.enabled needs quantize.enabled"):
        CompressConfig.model_validate({"train_run": "r", "out_dir": "o", "qad": {"enabled": True},
                                       "quantize": {"enabled": False}})
    with pytest.raises(ValidationError, match="qad.models"):
        CompressConfig.model_validate({"train_run": "r", "out_dir": "o", "qad": {"models": ["qad"]}})


@pytest.mark.parametrize(("mode", "want_mode", "want_alpha"), [
    ("soft", "soft", 0.7), ("hard", "hard", 0.7), ("online", "soft", 0.7), ("none", "soft", 0.5)])
def test_qad_trains_from_the_cache_in_every_mode(mode, want_mode, want_alpha):
    """Online would load the teacher: QAD reads its soft labels from the cache instead; a no-KD student gets the
    prune fine-tune's default weight. Feature KD and explicit loss terms are dropped (the fake-quant graph has no
    named penultimate layer)."""
    v = VariantConfig(arch="cnn_small", mode=mode, alpha=0.7, temperature=3.0, epochs=9, lr=0.01, num_workers=2,
                      precision="bf16", zero_stage=2,
                      **({"beta": 0.5} if mode != "none" else {}))
    q = qad_variant(v, QADConfig(enabled=True, epochs=2, lr=1e-4))
    assert (q.mode, q.alpha, q.temperature) == (want_mode, want_alpha, 3.0)
    assert (q.epochs, q.lr, q.num_workers, q.precision, q.zero_stage, q.beta, q.loss) == (2, 1e-4, 1, "fp32", 0,
                                                                                          0.0, None)
    assert not q.feature_kd and q.arch == v.arch and q.batch_size == v.batch_size
    assert qad_variant(v, QADConfig(alpha=0.2, temperature=1.5)).alpha == 0.2


def test_qad_stage_names_and_files_line_up_from_compress_to_deploy():
    import torch

    m = torch.nn.Linear(2, 2)
    assert qad_names(Source("", m, 1, 1)) == ("qad+", "qad")
    assert qad_names(Source("pruned+", m, 1, 1)) == ("pruned+qad+", "pruned_qad")
    assert litert_files("qad+litert+int8") == ("qad.tflite", "qad_int8.tflite", "qad.ts")
    assert litert_files("pruned+qad+litert+int8") == ("pruned_qad.tflite", "pruned_qad_int8.tflite", "pruned_qad.ts")
    assert Source("pruned+qad+", m, 1, 1, fp32_row=False).stem == "pruned_qad"
    assert STAGE_FILES["qad+int8"] == ("qad.onnx", "qad_int8.onnx")
    assert STAGE_FILES["pruned+qad+int8"] == ("pruned_qad.onnx", "pruned_qad_int8.onnx")
    for stage in ("qad+int8", "pruned+qad+int8"):
        DeployConfig(compress_dir="c", out_dir="o", stage=stage)
    for stage in ("qad+litert+int8", "pruned+qad+litert+int8"):
        DeployConfig(compress_dir="c", out_dir="o", litert_stage=stage)
