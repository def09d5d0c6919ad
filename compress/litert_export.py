"""fp32 ONNX -> fp32 LiteRT (.tflite) flatbuffer, NHWC, for the operators our students are made of.

Why our own small converter: the PyTorch-to-LiteRT converter (`litert-torch` 0.10, the only release that accepts
torch 2.14) does not install beside this project: through `litert-converter` it pins `xdsl==0.28.0`, which
requires `typing-extensions<4.13`, while pydantic 2.14 (and anyio) require >= 4.16 (README, "LiteRT"). The
LiteRT runtime (`ai-edge-litert`) and its quantizer (`ai-edge-quantizer`) do install, and the runtime ships the
official flatbuffer schema (`schema_py_generated`), so the graph ONNX export already made (BatchNorm folded) is
rewritten op by op into LiteRT builtin operators here, and checked against PyTorch in the real LiteRT
interpreter before it is bundled (compress/litert_run.py, deploy). An operator without a mapping raises
LiteRTConversionError naming it; the ONNX models are not affected.

Layout: LiteRT's convolutions are NHWC, so the model takes `input` as (1, H, W, C) float32 (the batch can be
resized at run time) and returns `logits` (N, classes); flattening a feature map transposes it back to NCHW
first, so the classifier's weights keep PyTorch's order.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from onnx import numpy_helper, shape_inference

from distill.core.errors import InputError

SIGNATURE = "serving_default"


class LiteRTConversionError(InputError):
    """An ONNX operator (or attribute) with no LiteRT mapping here; the message names it."""


def _schema():  # noqa: ANN202 - a module object from the optional extra
    try:
        from ai_edge_litert import schema_py_generated
    except ImportError as exc:
        raise LiteRTConversionError("LiteRT targets need the optional extra: pip install -e '.[litert]' "
                                    f"(ai-edge-litert, ai-edge-quantizer): {exc}") from exc
    return schema_py_generated


def _attrs(node: onnx.NodeProto) -> dict:
    return {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}


def _same_pads(size: int, k: int, s: int, d: int) -> tuple[int, int]:
    """What LiteRT's SAME padding adds before/after one spatial axis."""
    out = -(-size // s)
    total = max((out - 1) * s + (k - 1) * d + 1 - size, 0)
    return total // 2, total - total // 2


class _Builder:
    """Tensors, buffers and operators of one LiteRT subgraph; ONNX names map to tensor indices."""

    def __init__(self, graph: onnx.GraphProto, source: str) -> None:
        self.fb = _schema()
        self.source = source
        self.model = self.fb.ModelT()
        self.model.version = 3
        self.model.buffers = [self.fb.BufferT()]  # buffer 0: the empty sentinel every runtime expects
        self.model.operatorCodes, self.ops, self.tensors = [], [], []
        self.index: dict[str, int] = {}
        self.const: dict[str, np.ndarray] = {i.name: numpy_helper.to_array(i) for i in graph.initializer}
        self.shape: dict[str, list[int]] = {}
        for vi in [*graph.input, *graph.value_info, *graph.output]:
            dims = vi.type.tensor_type.shape.dim
            self.shape[vi.name] = [d.dim_value if d.HasField("dim_value") else 1 for d in dims]
        self.producer: dict[int, object] = {}
        self.consumers: dict[str, int] = {}
        for node in graph.node:
            for name in node.input:
                self.consumers[name] = self.consumers.get(name, 0) + 1
        for out in graph.output:
            self.consumers[out.name] = self.consumers.get(out.name, 0) + 1

    def fail(self, node: onnx.NodeProto, why: str) -> LiteRTConversionError:
        return LiteRTConversionError(f"{self.source}: operator '{node.op_type}' (ONNX node '{node.name}') {why}; "
                                     f"the ONNX models are unaffected. Converted operators: {sorted(CONVERTERS)}")

    def tensor(self, name: str, shape: list[int], data: np.ndarray | None = None) -> int:
        t = self.fb.TensorT()
        t.name, t.shape, t.type = name, list(shape), self.fb.TensorType.FLOAT32
        if data is not None:
            if data.dtype == np.int32:
                t.type = self.fb.TensorType.INT32
            buf = self.fb.BufferT()
            buf.data = np.frombuffer(np.ascontiguousarray(data).tobytes(), np.uint8)
            self.model.buffers.append(buf)
            t.buffer = len(self.model.buffers) - 1
        else:
            t.buffer = 0
        self.tensors.append(t)
        return len(self.tensors) - 1

    def constant(self, name: str, data: np.ndarray) -> int:
        arr = np.asarray(data)
        arr = arr.astype(np.int32 if arr.dtype.kind in "iu" else np.float32)
        return self.tensor(name, list(arr.shape), arr)

    def op(self, code: int, inputs: list[int], outputs: list[int], options: object = None,
           options_type: int = 0) -> object:
        codes = [c.builtinCode for c in self.model.operatorCodes]
        if code not in codes:
            oc = self.fb.OperatorCodeT()
            oc.builtinCode, oc.deprecatedBuiltinCode, oc.version = code, min(code, 127), 1
            self.model.operatorCodes.append(oc)
            codes.append(code)
        o = self.fb.OperatorT()
        o.opcodeIndex, o.inputs, o.outputs = codes.index(code), inputs, outputs
        o.builtinOptionsType, o.builtinOptions = options_type, options
        self.ops.append(o)
        for t in outputs:
            self.producer[t] = o
        return o

    def out(self, node: onnx.NodeProto, shape: list[int]) -> int:
        i = self.tensor(node.output[0], shape)
        self.index[node.output[0]] = i
        return i

    def shape_of(self, name: str) -> list[int]:
        return list(self.tensors[self.index[name]].shape)

    def finish(self, inputs: list[int], outputs: list[int]) -> bytes:
        import flatbuffers

        sub = self.fb.SubGraphT()
        sub.tensors, sub.operators, sub.inputs, sub.outputs, sub.name = self.tensors, self.ops, inputs, outputs, "main"
        self.model.subgraphs = [sub]
        sig = self.fb.SignatureDefT()
        sig.signatureKey, sig.subgraphIndex = SIGNATURE, 0
        sig.inputs = [self._tmap("input", inputs[0])]
        sig.outputs = [self._tmap("logits", outputs[0])]
        self.model.signatureDefs = [sig]
        self.model.description = "distill: converted from ONNX by compress/litert_export.py"
        b = flatbuffers.Builder(1024)
        b.Finish(self.model.Pack(b), file_identifier=b"TFL3")
        return bytes(b.Output())

    def _tmap(self, name: str, index: int) -> object:
        m = self.fb.TensorMapT()
        m.name, m.tensorIndex = name, index
        return m


def convert_onnx(onnx_path: Path) -> bytes:
    """The fp32 LiteRT flatbuffer of an fp32 ONNX classifier (input (N, C, H, W) -> logits (N, classes))."""
    model = onnx.load(str(onnx_path))
    for vi in [*model.graph.input, *model.graph.output]:
        vi.type.tensor_type.shape.dim[0].ClearField("dim_param")
        vi.type.tensor_type.shape.dim[0].dim_value = 1
    model = shape_inference.infer_shapes(model)
    g = model.graph
    b = _Builder(g, Path(onnx_path).name)
    for node in g.node:
        if node.op_type == "Constant":
            b.const[node.output[0]] = numpy_helper.to_array(_attrs(node)["value"])
    [inp] = [i for i in g.input if i.name not in b.const]
    n, c, h, w = b.shape[inp.name]
    b.index[inp.name] = b.tensor("input", [1, h, w, c])
    for node in g.node:
        if node.op_type == "Constant":
            continue
        handler = CONVERTERS.get(node.op_type)
        if handler is None:
            raise b.fail(node, "has no LiteRT mapping in compress/litert_export.py")
        handler(b, node)
    outputs = [b.index[o.name] for o in g.output]
    if len(outputs) != 1 or len(b.shape_of(g.output[0].name)) != 2:
        raise LiteRTConversionError(f"{onnx_path}: expected one (N, classes) output, got {len(outputs)} outputs")
    return b.finish([b.index[inp.name]], outputs)


def export_litert(onnx_path: Path, out: Path) -> Path:
    """Write the fp32 .tflite of `onnx_path` to `out` (atomically: a killed export leaves no partial model)."""
    from distill.core.atomic_io import atomic_write

    atomic_write(out, convert_onnx(onnx_path))
    return out


# ---- operators -------------------------------------------------------------------------------------------


def _conv(b: _Builder, node: onnx.NodeProto) -> None:
    a = _attrs(node)
    x = b.index[node.input[0]]
    _, hin, win, cin = b.tensors[x].shape
    wt = b.const.get(node.input[1])
    if wt is None:
        raise b.fail(node, "has weights that are not constants")
    cout, cin_g, kh, kw = wt.shape
    groups = a.get("group", 1)
    strides, dil = a.get("strides", [1, 1]), a.get("dilations", [1, 1])
    pads = a.get("pads", [0, 0, 0, 0])
    if a.get("auto_pad", b"NOTSET") not in (b"NOTSET", "NOTSET"):
        raise b.fail(node, f"uses auto_pad={a['auto_pad']!r}")
    bias = b.const.get(node.input[2]) if len(node.input) > 2 else np.zeros(cout, np.float32)
    same = (_same_pads(hin, kh, strides[0], dil[0]) == (pads[0], pads[2])
            and _same_pads(win, kw, strides[1], dil[1]) == (pads[1], pads[3]))
    if not same and any(pads):
        x = _pad(b, node, x, pads)
    fb = b.fb
    hout, wout = b.shape[node.output[0]][2:]
    y = b.out(node, [1, hout, wout, cout])
    if groups == 1:
        opt = fb.Conv2DOptionsT()
        code, otype = fb.BuiltinOperator.CONV_2D, fb.BuiltinOptions.Conv2DOptions
        kernel = wt.transpose(0, 2, 3, 1)  # OIHW -> OHWI
    elif groups == cin and cin_g == 1:
        opt = fb.DepthwiseConv2DOptionsT()
        opt.depthMultiplier = cout // cin
        code, otype = fb.BuiltinOperator.DEPTHWISE_CONV_2D, fb.BuiltinOptions.DepthwiseConv2DOptions
        kernel = wt.transpose(1, 2, 3, 0)  # (O, 1, H, W) -> (1, H, W, O)
    else:
        raise b.fail(node, f"is a grouped convolution (group={groups}, {cin} input channels) that is neither "
                     "plain nor depthwise")
    opt.padding = fb.Padding.SAME if same and any(pads) else fb.Padding.VALID
    opt.strideH, opt.strideW = strides
    opt.dilationHFactor, opt.dilationWFactor = dil
    b.op(code, [x, b.constant(node.input[1], kernel), b.constant(f"{node.name}/bias", bias)], [y], opt, otype)


def _pad(b: _Builder, node: onnx.NodeProto, x: int, pads: list[int]) -> int:
    _, h, w, c = b.tensors[x].shape
    spec = np.array([[0, 0], [pads[0], pads[2]], [pads[1], pads[3]], [0, 0]], np.int32)
    y = b.tensor(f"{node.name}/pad", [1, h + pads[0] + pads[2], w + pads[1] + pads[3], c])
    b.op(b.fb.BuiltinOperator.PAD, [x, b.constant(f"{node.name}/paddings", spec)], [y], b.fb.PadOptionsT(),
         b.fb.BuiltinOptions.PadOptions)
    return y


def _gemm(b: _Builder, node: onnx.NodeProto) -> None:
    a = _attrs(node)
    x = b.index[node.input[0]]
    wt = b.const.get(node.input[1])
    if wt is None or a.get("transA", 0):
        raise b.fail(node, "multiplies two activations (or a transposed input)")
    wt = (wt if a.get("transB", 0) else wt.T) * a.get("alpha", 1.0)  # LiteRT wants (units, inputs)
    bias = (b.const[node.input[2]] * a.get("beta", 1.0) if len(node.input) > 2 and node.input[2]
            else np.zeros(wt.shape[0], np.float32))
    _fc(b, node, x, wt, np.broadcast_to(bias, (wt.shape[0],)))


def _matmul(b: _Builder, node: onnx.NodeProto) -> None:
    wt = b.const.get(node.input[1])
    if wt is None or wt.ndim != 2 or len(b.tensors[b.index[node.input[0]]].shape) != 2:
        raise b.fail(node, "is not a 2-D activation times a constant matrix")
    _fc(b, node, b.index[node.input[0]], wt.T, np.zeros(wt.shape[1], np.float32))


def _fc(b: _Builder, node: onnx.NodeProto, x: int, wt: np.ndarray, bias: np.ndarray) -> None:
    y = b.out(node, [1, wt.shape[0]])
    opt = b.fb.FullyConnectedOptionsT()
    b.op(b.fb.BuiltinOperator.FULLY_CONNECTED,
         [x, b.constant(f"{node.name}/weights", wt), b.constant(f"{node.name}/bias", bias)], [y], opt,
         b.fb.BuiltinOptions.FullyConnectedOptions)


def _activation(b: _Builder, node: onnx.NodeProto) -> None:
    fb = b.fb
    if node.op_type == "Clip":
        bounds = [b.const.get(n) if n else None for n in [*node.input[1:3], "", ""][:2]]  # opset >= 11: inputs
        lo, hi = _attrs(node).get("min", bounds[0]), _attrs(node).get("max", bounds[1])  # older: attributes
        if lo is None or hi is None or float(lo) != 0.0 or float(hi) != 6.0:
            raise b.fail(node, f"clips to [{lo}, {hi}]; only ReLU6 (0, 6) is mapped")
        fused, code = fb.ActivationFunctionType.RELU6, fb.BuiltinOperator.RELU6
    else:
        fused, code = fb.ActivationFunctionType.RELU, fb.BuiltinOperator.RELU
    x = b.index[node.input[0]]
    prev = b.producer.get(x)
    opts = getattr(prev, "builtinOptions", None)
    if (opts is not None and hasattr(opts, "fusedActivationFunction") and opts.fusedActivationFunction == 0
            and b.consumers.get(node.input[0], 0) == 1):
        opts.fusedActivationFunction = fused  # conv/FC/add + activation: one LiteRT op, as its converter does
        b.index[node.output[0]] = x
        return
    b.op(code, [x], [b.out(node, b.shape_of(node.input[0]))])


def _unary(code_name: str) -> object:
    def convert(b: _Builder, node: onnx.NodeProto) -> None:
        x = b.index[node.input[0]]
        b.op(getattr(b.fb.BuiltinOperator, code_name), [x], [b.out(node, b.shape_of(node.input[0]))])
    return convert


def _binary(b: _Builder, node: onnx.NodeProto) -> None:
    fb = b.fb
    acts = [n for n in node.input if n in b.index]
    if not acts:
        raise b.fail(node, "has no activation input")
    rank = len(b.shape_of(acts[0]))
    ins = []
    for name in node.input:
        if name in b.index:
            ins.append(b.index[name])
            continue
        k = b.const[name].astype(np.float32)
        if rank == 4 and k.ndim >= 3:  # an NCHW-broadcast constant (C, 1, 1) -> NHWC (1, 1, 1, C)
            k = k.reshape((1,) * (4 - k.ndim) + k.shape).transpose(0, 2, 3, 1)
        ins.append(b.constant(name, k))
    shape = list(np.broadcast_shapes(*(tuple(b.tensors[i].shape) for i in ins)))
    if node.op_type == "Add":
        code, opt, otype = fb.BuiltinOperator.ADD, fb.AddOptionsT(), fb.BuiltinOptions.AddOptions
    else:
        code, opt, otype = fb.BuiltinOperator.MUL, fb.MulOptionsT(), fb.BuiltinOptions.MulOptions
    b.op(code, ins, [b.out(node, shape)], opt, otype)


def _global_pool(b: _Builder, node: onnx.NodeProto) -> None:
    x = b.index[node.input[0]]
    n, _, _, c = b.tensors[x].shape
    opt = b.fb.ReducerOptionsT()
    opt.keepDims = True
    axes = b.constant(f"{node.name}/axes", np.array([1, 2], np.int32))
    b.op(b.fb.BuiltinOperator.MEAN, [x, axes], [b.out(node, [n, 1, 1, c])], opt, b.fb.BuiltinOptions.ReducerOptions)


def _pool(b: _Builder, node: onnx.NodeProto) -> None:
    a = _attrs(node)
    x = b.index[node.input[0]]
    _, h, w, c = b.tensors[x].shape
    (kh, kw), (sh, sw) = a["kernel_shape"], a.get("strides", [1, 1])
    pads = a.get("pads", [0, 0, 0, 0])
    same = _same_pads(h, kh, sh, 1) == (pads[0], pads[2]) and _same_pads(w, kw, sw, 1) == (pads[1], pads[3])
    if (any(pads) and not same) or a.get("ceil_mode", 0) or (node.op_type == "AveragePool"
                                                             and a.get("count_include_pad", 0) and any(pads)):
        raise b.fail(node, f"pads {pads} (ceil_mode {a.get('ceil_mode', 0)}) in a way LiteRT's SAME/VALID "
                     "pooling does not")
    fb = b.fb
    opt = fb.Pool2DOptionsT()
    opt.padding = fb.Padding.SAME if any(pads) else fb.Padding.VALID
    opt.strideH, opt.strideW, opt.filterHeight, opt.filterWidth = sh, sw, kh, kw
    hout, wout = b.shape[node.output[0]][2:]
    code = fb.BuiltinOperator.MAX_POOL_2D if node.op_type == "MaxPool" else fb.BuiltinOperator.AVERAGE_POOL_2D
    b.op(code, [x], [b.out(node, [1, hout, wout, c])], opt, fb.BuiltinOptions.Pool2DOptions)


def _flatten(b: _Builder, node: onnx.NodeProto) -> None:
    x = b.index[node.input[0]]
    shape = b.tensors[x].shape
    if node.op_type == "Flatten" and _attrs(node).get("axis", 1) != 1:
        raise b.fail(node, "flattens from an axis other than 1")
    if node.op_type == "Reshape":
        target = b.const.get(node.input[1])
        if target is None or len(target) != 2:
            raise b.fail(node, "reshapes to something other than (N, features)")
    if len(shape) == 2:
        b.index[node.output[0]] = x
        return
    fb = b.fb
    if len(shape) == 4 and (shape[1] > 1 or shape[2] > 1):  # NHWC -> NCHW so features keep PyTorch's order
        t = b.tensor(f"{node.name}/nchw", [shape[0], shape[3], shape[1], shape[2]])
        b.op(fb.BuiltinOperator.TRANSPOSE, [x, b.constant(f"{node.name}/perm", np.array([0, 3, 1, 2], np.int32))],
             [t], fb.TransposeOptionsT(), fb.BuiltinOptions.TransposeOptions)
        x = t
    features = int(np.prod(shape[1:]))
    opt = fb.ReshapeOptionsT()
    opt.newShape = [-1, features]
    b.op(fb.BuiltinOperator.RESHAPE, [x, b.constant(f"{node.name}/shape", np.array([-1, features], np.int32))],
         [b.out(node, [1, features])], opt, fb.BuiltinOptions.ReshapeOptions)


def _concat(b: _Builder, node: onnx.NodeProto) -> None:
    ins = [b.index[n] for n in node.input]
    rank = len(b.tensors[ins[0]].shape)
    axis = _attrs(node)["axis"] % rank
    axis = {1: 3, 2: 1, 3: 2}.get(axis, axis) if rank == 4 else axis  # NCHW axis -> NHWC axis
    shape = b.tensors[ins[0]].shape.copy()
    shape[axis] = sum(b.tensors[i].shape[axis] for i in ins)
    opt = b.fb.ConcatenationOptionsT()
    opt.axis = axis
    b.op(b.fb.BuiltinOperator.CONCATENATION, ins, [b.out(node, shape)], opt, b.fb.BuiltinOptions.ConcatenationOptions)


def _softmax(b: _Builder, node: onnx.NodeProto) -> None:
    x = b.index[node.input[0]]
    if len(b.tensors[x].shape) != 2 or _attrs(node).get("axis", -1) not in (-1, 1):
        raise b.fail(node, "is not a softmax over the classes of (N, classes)")
    opt = b.fb.SoftmaxOptionsT()
    opt.beta = 1.0
    b.op(b.fb.BuiltinOperator.SOFTMAX, [x], [b.out(node, b.shape_of(node.input[0]))], opt,
         b.fb.BuiltinOptions.SoftmaxOptions)


def _identity(b: _Builder, node: onnx.NodeProto) -> None:
    if node.input[0] in b.const:
        b.const[node.output[0]] = b.const[node.input[0]]
    else:
        b.index[node.output[0]] = b.index[node.input[0]]


CONVERTERS = {"Conv": _conv, "Gemm": _gemm, "MatMul": _matmul, "Relu": _activation, "Clip": _activation,
              "Sigmoid": _unary("LOGISTIC"), "HardSwish": _unary("HARD_SWISH"), "Add": _binary, "Mul": _binary,
              "GlobalAveragePool": _global_pool, "MaxPool": _pool, "AveragePool": _pool, "Flatten": _flatten,
              "Reshape": _flatten, "Concat": _concat, "Softmax": _softmax, "Identity": _identity,
              "Dropout": _identity}
