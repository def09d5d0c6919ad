"""The fake-quant student of quantization-aware distillation (QAD): the student as a PT2E graph that simulates the
int8 recipe the deployed models use, trained like any student and turned back into a plain fp32 model to export.

The simulated recipe is the deployed one (ONNX Runtime QDQ static int8 in compress/quantize.py, ai-edge-quantizer
full-integer int8 in compress/litert_convert.py):
- BatchNorm folded into the convolution before anything is quantized (both runtimes fold it);
- weights int8 per output channel, symmetric in [-127, 127], scale = each channel's abs max of the folded weight,
  taken afresh at every step (what a quantizer computes from the final weights);
- activations int8 per tensor, affine (the uint8 grid of ONNX Runtime and the int8 grid of LiteRT are the same
  grid, shifted), range = the global min/max of each tensor over the calibration views, measured on the float
  model (fake quantization off) as the runtimes' calibrators do, then frozen while training, and measured again
  on the final weights before export.
Which tensors are quantized follows litert-torch's PT2E annotator (conv, conv+relu, linear, add, mul, cat,
pooling: their inputs and outputs), so every tensor that reaches a quantized kernel is fake-quantized.

Why PT2E with litert-torch's annotator and not the eager `torch.ao` QAT flow: PT2E captures functional ops
(residual adds, squeeze-excite multiplies) that module hooks miss, and it is the flow litert-torch follows.
litert-torch 0.10's QAT-only conv+bn annotators fail on torchao 0.18 (their pattern is exported as a function);
folding BN first (as the runtimes do) needs only its static annotators.
"""

from __future__ import annotations

import copy
import importlib.util
import types
from collections.abc import Iterable

import numpy as np
import torch
from torch import fx, nn

RECIPE = ("BatchNorm folded; weights int8 per output channel, symmetric [-127, 127] (abs max of the folded weight, "
          "every step); activations int8 per tensor, affine (global min/max over the calibration views on the "
          "float model, frozen while training, re-measured on the final weights)")


def qad_available() -> str | None:
    """None when the fake-quant flow can run here (torchao's PT2E + litert-torch's annotator), else why not."""
    missing = [m for m in ("torchao", "litert_torch") if importlib.util.find_spec(m) is None]
    return (f"{', '.join(missing)} not installed: pip install -e '.[litert]' (QAD's fake-quant graph uses torchao's "
            "PT2E flow and litert-torch's annotator)") if missing else None


def _config() -> object:
    from litert_torch.quantize.pt2e_quantizer_utils import QuantizationConfig
    from torchao.quantization.pt2e import FakeQuantize, MinMaxObserver, MovingAveragePerChannelMinMaxObserver
    from torchao.quantization.pt2e.quantizer import QuantizationSpec

    act = QuantizationSpec(dtype=torch.int8, quant_min=-128, quant_max=127, qscheme=torch.per_tensor_affine,
                           observer_or_fake_quant_ctr=FakeQuantize.with_args(observer=MinMaxObserver, eps=2**-12))
    weight = QuantizationSpec(dtype=torch.int8, quant_min=-127, quant_max=127, qscheme=torch.per_channel_symmetric,
                              ch_axis=0, observer_or_fake_quant_ctr=FakeQuantize.with_args(
                                  observer=MovingAveragePerChannelMinMaxObserver, averaging_constant=1.0,
                                  eps=2**-12))
    return QuantizationConfig(act, act, weight, None, None, is_qat=False, is_dynamic=False)


def fake_quant_model(model: nn.Module, channels: int, size: int) -> fx.GraphModule:
    """`model` (untouched) as a fake-quant graph: BN folded, fake-quant nodes per the recipe, any batch size, and
    .train()/.eval() allowed (the training loop switches modes; dropout and an unfolded BatchNorm follow them).
    Ranges are unset until `calibrate_ranges`."""
    from litert_torch.quantize.pt2e_quantizer import PT2EQuantizer
    from torchao.quantization.pt2e import allow_exported_model_train_eval
    from torchao.quantization.pt2e.quantize_pt2e import prepare_pt2e

    float_model = copy.deepcopy(model).eval().float()
    example = torch.zeros(2, channels, size, size)
    batch = torch.export.Dim("batch", min=1, max=65536)
    graph = torch.export.export(float_model, (example,), dynamic_shapes=({0: batch},)).module()
    graph = prepare_pt2e(graph, PT2EQuantizer().set_global(_config()))
    modal = [n for n in graph.graph.nodes if n.op == "call_function" and any(
        w in str(n.target) for w in ("dropout", "batch_norm"))]
    if modal:  # each switch rewrites these ops by pattern (seconds): only where the mode changes something
        allow_exported_model_train_eval(graph)
    else:
        graph.train = types.MethodType(_same_in_every_mode, graph)
        graph.eval = types.MethodType(_same_in_every_mode, graph)
    return graph


def _same_in_every_mode(self: fx.GraphModule, mode: bool = True) -> fx.GraphModule:
    """train()/eval() of a graph with no dropout and no BatchNorm left (folded): nothing changes with the mode."""
    return self


def fake_quants(graph: nn.Module) -> tuple[list[nn.Module], list[nn.Module]]:
    """(weight fake-quants, activation fake-quants) of a `fake_quant_model` graph."""
    from torchao.quantization.pt2e import FakeQuantizeBase

    fqs = [m for m in graph.modules() if isinstance(m, FakeQuantizeBase)]
    weights = [m for m in fqs if m.qscheme == torch.per_channel_symmetric]
    return weights, [m for m in fqs if m not in weights]


def calibrate_ranges(graph: nn.Module, calib: Iterable[np.ndarray]) -> int:
    """Set every activation range to its global min/max over `calib` (N, C, H, W float32 batches), measured with
    fake quantization off, as ONNX Runtime's and ai-edge-quantizer's calibrators measure the float model; then
    freeze them (observers off) and turn fake quantization on. Returns how many views it saw."""
    weights, acts = fake_quants(graph)
    if not acts:
        raise ValueError("the fake-quant graph has no quantized activation (no conv, linear, add or mul?)")
    for fq in weights + acts:
        fq.disable_fake_quant()  # type: ignore[operator]
        fq.enable_observer()  # type: ignore[operator]
    for fq in acts:
        fq.activation_post_process.reset_min_max_vals()  # type: ignore[operator, union-attr]
    views = 0
    graph.eval()  # left in eval mode: the caller switches (an exported graph's .training does not follow .train())
    with torch.no_grad():
        for batch in calib:
            graph(torch.from_numpy(np.asarray(batch, np.float32)))
            views += len(batch)
    for fq in acts:
        fq.disable_observer()  # type: ignore[operator]
    for fq in weights + acts:
        fq.enable_fake_quant()  # type: ignore[operator]
    return views


def float_twin(graph: fx.GraphModule) -> fx.GraphModule:
    """A copy of the fake-quant graph with every fake-quant node removed: the plain fp32 model (BN folded) that is
    exported to ONNX and LiteRT and quantized there by the deployed recipe."""
    from torchao.quantization.pt2e import FakeQuantizeBase

    twin = copy.deepcopy(graph)
    for node in list(twin.graph.nodes):
        if node.op == "call_module" and isinstance(twin.get_submodule(node.target), FakeQuantizeBase):
            node.replace_all_uses_with(node.args[0])
            twin.graph.erase_node(node)
            twin.delete_submodule(node.target)
    twin.graph.lint()
    twin.recompile()
    return twin.eval()
