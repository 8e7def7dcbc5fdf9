"""Builds the small test model models/test-ops.onnx (every op edgecl imports), its int8 QDQ
version models/test-ops-qdq.onnx, and onnxruntime reference outputs in tests/data/.

Host only (not CI):  pip install onnx onnxruntime numpy && python3 models/make_test_model.py

Deterministic (re-running reproduces every file byte for byte with the same package versions):
weights from numpy.random.default_rng(0), 16 calibration inputs from default_rng(1), the
fixture input from default_rng(2). Opset 18, IR version 8.
- test-ops.onnx: input `input` [N, 3, 16, 16] (N dynamic), output `logits` [N, 10]; the graph
  is described in models/README.md.
- test-ops-qdq.onnx: quantize_static, QDQ format, per-channel symmetric int8 weights, uint8
  activations, MinMax calibration.
- tests/data/test-ops.input.npy (float32 [2, 3, 16, 16]), test-ops.expected.npy and
  test-ops-qdq.expected.npy (float32 [2, 10], onnxruntime CPU outputs of the two models).
"""
import collections
import os

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper
from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static

HERE = os.path.dirname(os.path.abspath(__file__))
DATA = os.path.join(HERE, "..", "tests", "data")
rng = np.random.default_rng(0)
inits = []


def const(name, arr):
    inits.append(numpy_helper.from_array(np.asarray(arr), name))
    return name


def weight(name, shape):
    fan_in = int(np.prod(shape[1:]))
    return const(name, (rng.standard_normal(shape) * np.sqrt(2.0 / fan_in)).astype(np.float32))


def vec(name, n, lo=-0.2, hi=0.2):
    return const(name, rng.uniform(lo, hi, n).astype(np.float32))


def build():
    nodes = []

    def node(op, inputs, out, **attrs):
        nodes.append(helper.make_node(op, inputs, [out], name=out, **attrs))
        return out

    x = "input"
    a = node("Conv", [x, weight("w1", (8, 3, 3, 3)), vec("b1", 8)], "conv1", pads=[1, 1, 1, 1])
    a = node("BatchNormalization", [a, vec("g1", 8, 0.5, 1.5), vec("be1", 8), vec("m1", 8), vec("v1", 8, 0.5, 2.0)], "bn1", epsilon=1e-3)
    a = node("Relu", [a], "relu1")
    d = node("Conv", [a, weight("w2", (8, 1, 3, 3))], "depthwise2", pads=[1, 1, 1, 1], group=8)
    d = node("Clip", [d, const("zero", np.float32(0)), const("six", np.float32(6))], "relu6_2")
    g = node("Conv", [d, weight("w3", (8, 4, 3, 3)), vec("b3", 8)], "grouped3", pads=[2, 2, 2, 2], dilations=[2, 2], group=2)
    s = node("Add", [g, a], "residual_add")
    s = node("MaxPool", [s], "maxpool_3x3", kernel_shape=[3, 3], strides=[1, 1], pads=[1, 1, 1, 1])
    c = node("Conv", [s, weight("w4", (16, 8, 3, 3)), vec("b4", 16)], "strided4", strides=[2, 2], pads=[0, 0, 1, 1])
    c = node("Relu", [c], "relu4")
    c = node("MaxPool", [c], "maxpool_2x2", kernel_shape=[2, 2], strides=[2, 2])
    c = node("Conv", [c, weight("w5", (16, 16, 1, 1))], "pointwise5")
    c = node("AveragePool", [c], "avgpool", kernel_shape=[2, 2], strides=[2, 2])
    p = node("GlobalAveragePool", [c], "gap")
    r = node("Relu", [c], "relu5")
    q = node("ReduceMean", [r, const("axes", np.array([2, 3], dtype=np.int64))], "reduce_mean", keepdims=1)
    t = node("Add", [p, q], "pool_sum")
    t = node("Flatten", [t], "flatten", axis=1)
    t = node("Gemm", [t, weight("w6", (12, 16)), vec("b6", 12)], "gemm", transB=1)
    t = node("Relu", [t], "relu6")
    t = node("Reshape", [t, const("shape", np.array([0, -1], dtype=np.int64))], "reshape")
    t = node("MatMul", [t, const("w7", (rng.standard_normal((12, 10)) * 0.4).astype(np.float32))], "matmul")
    node("Add", [t, vec("b7", 10)], "logits")
    graph = helper.make_graph(
        nodes, "edgecl-test-ops",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", 3, 16, 16])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 10])],
        initializer=inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)], producer_name="edgecl make_test_model.py")
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model


class Reader(CalibrationDataReader):
    def __init__(self):
        r = np.random.default_rng(1)
        self.items = iter([{"input": r.standard_normal((1, 3, 16, 16)).astype(np.float32)} for _ in range(16)])

    def get_next(self):
        return next(self.items, None)


def run(path, x):
    s = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    return s.run(None, {"input": x})[0]


def main():
    f32 = os.path.join(HERE, "test-ops.onnx")
    qdq = os.path.join(HERE, "test-ops-qdq.onnx")
    onnx.save(build(), f32)
    quantize_static(f32, qdq, Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
                    weight_type=QuantType.QInt8, activation_type=QuantType.QUInt8,
                    extra_options={"WeightSymmetric": True})
    for p in (f32, qdq):
        m = onnx.load(p)
        print(os.path.basename(p), os.path.getsize(p), "bytes", dict(sorted(collections.Counter(n.op_type for n in m.graph.node).items())))
    x = np.random.default_rng(2).standard_normal((2, 3, 16, 16)).astype(np.float32)
    np.save(os.path.join(DATA, "test-ops.input.npy"), x)
    np.save(os.path.join(DATA, "test-ops.expected.npy"), run(f32, x).astype(np.float32))
    np.save(os.path.join(DATA, "test-ops-qdq.expected.npy"), run(qdq, x).astype(np.float32))
    print("f32 out", run(f32, x)[0][:4], "qdq out", run(qdq, x)[0][:4])


if __name__ == "__main__":
    main()
