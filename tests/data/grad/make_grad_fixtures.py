#!/usr/bin/env python3
"""Reference gradients for edgecl's training tests, computed with PyTorch.

Purpose
    Writes two small ONNX backbones and, for each, the inputs, outputs and gradients of one
    training step, so that edgecl's Rust tests can compare their SupSup and CLR backward passes
    against PyTorch autograd:

    * case `gem`: a narrow GEMResNet18 (widths 4, 8, 16, 32; 5-way linear head, no biases, signed
      Kaiming constant weights, non-affine BN) with edge-popup top-k supermasks (density 0.3) on
      every conv and the linear; one train-mode forward on a batch of 4, mean cross-entropy,
      straight-through backward (dL/dS = sign(S) * W * dL/dW_eff). ALGORITHMS.md 1.1, 1.2.
    * case `clr`: a small conv net (3x3 conv with bias, ReLU6, 3x3 depthwise, 1x1 conv, affine BN)
      with a CLR depthwise 3x3 layer between every k>1 conv and its BN, trainable BN and a new
      linear head; loss = mean cross-entropy + 1e-5 * sum of L2 norms. ALGORITHMS.md 3.1-3.3.

    README.md beside this file describes every output (shape, order, meaning).

    Python is only used to produce these files; it is no part of edgecl.

Packages
    pip install torch onnx numpy      (tested with torch 2.15.0, onnx 1.23.2, numpy 2.4.6)

Run (from the repository root; writes next to this script; a few seconds)
    python3 tests/data/grad/make_grad_fixtures.py

Determinism
    Every random draw comes from its own torch.Generator with a fixed seed (CPU generators,
    float64 draws), in a fixed order. Every value that is written to a file (weights, scores,
    inputs, BN parameters, CLR kernels, head) is first rounded to float32, and the maths then
    runs in float64 on exactly those float32 values, so the Rust side sees the same inputs the
    reference used. Results are saved as float32 little-endian .npy (C order), and the ONNX files
    are serialised from a graph built here with the `onnx` helper API. Re-running the script
    reproduces every file byte for byte; the script also checks itself (autograd against a
    hand-written straight-through rule, finite differences, and the ONNX graphs evaluated with
    onnx.reference against the PyTorch forward) and stops on any mismatch.

Why the ONNX graphs are built by hand
    torch.onnx.export (torch 2.15) either folds BatchNormalization into the convs (dynamo
    exporter with its default optimisation) or emits shape arithmetic / Transpose / Cast nodes
    (dynamo without optimisation, and the TorchScript exporter) that edgecl's importer does not
    take. Building the graph directly keeps BN as BatchNormalization nodes and uses only Conv,
    BatchNormalization, Relu, Clip, Add, GlobalAveragePool, Flatten and Gemm. The same layer
    list drives both the ONNX graph and the PyTorch maths, and the ONNX graph is checked against
    the PyTorch forward with onnx.reference.
"""

import math
import os
import sys
from fractions import Fraction

import numpy as np
import onnx
import onnx.reference
import torch
import torch.nn.functional as F
from onnx import TensorProto, helper, numpy_helper

OUT = os.path.dirname(os.path.abspath(__file__))
OPSET = 18
BN_EPS = 1e-5
BN_MOMENTUM = 0.1
DENSITY = Fraction(3, 10)  # edge-popup kept fraction k
CLR_LAMBDA = 1e-5
BATCH = 4
CLASSES = 5

torch.set_num_threads(1)
torch.use_deterministic_algorithms(True)
D = torch.float64


# --------------------------------------------------------------------------------------------
# Random draws: float64 from a seeded CPU generator, rounded to float32 (the stored value).


def gen(seed):
    return torch.Generator().manual_seed(seed)


def f32(t):
    """Round to float32 and return as a numpy array (the value that gets stored)."""
    return t.to(torch.float32).numpy().copy()


def normal(g, shape, std=1.0, mean=0.0):
    return f32(torch.randn(shape, generator=g, dtype=D) * std + mean)


def uniform(g, shape, lo, hi):
    return f32(torch.rand(shape, generator=g, dtype=D) * (hi - lo) + lo)


def t64(a):
    return torch.from_numpy(np.asarray(a, dtype=np.float32)).to(D)


# --------------------------------------------------------------------------------------------
# A tiny layer list: the one description behind the ONNX graph and the PyTorch maths.


class Node:
    def __init__(self, op, name, inputs, params=None, **attrs):
        self.op = op  # conv, bn, relu, clip6, add, gap, flatten, linear
        self.name = name
        self.inputs = inputs  # value names (a value is named after the node that makes it)
        self.params = params or {}  # float32 numpy arrays, in ONNX input order
        self.attrs = attrs


class Graph:
    def __init__(self, in_shape):
        self.in_shape = in_shape
        self.nodes = []

    def add(self, op, name, inputs, params=None, **attrs):
        assert all(n.name != name for n in self.nodes) and name != "x"
        self.nodes.append(Node(op, name, inputs, params, **attrs))
        return name

    def of(self, op):
        return [n for n in self.nodes if n.op == op]


def fan_in(w):
    return int(np.prod(w.shape[1:]))


# --------------------------------------------------------------------------------------------
# ONNX


def to_onnx(graph, out_features, doc):
    nodes, inits = [], []

    def init(name, arr):
        inits.append(numpy_helper.from_array(np.ascontiguousarray(arr, dtype=np.float32), name))
        return name

    for n in graph.nodes:
        p = {k: init(f"{n.name}.{k}", v) for k, v in n.params.items()}
        if n.op == "conv":
            w = n.params["weight"]
            kh, kw = w.shape[2:]
            pad = n.attrs["pad"]
            ins = n.inputs + [p["weight"]] + ([p["bias"]] if "bias" in p else [])
            nodes.append(
                helper.make_node(
                    "Conv", ins, [n.name], name=n.name, kernel_shape=[kh, kw], strides=[n.attrs["stride"]] * 2,
                    pads=[pad] * 4, dilations=[1, 1], group=n.attrs["groups"],
                )
            )
        elif n.op == "bn":
            ins = n.inputs + [p["scale"], p["B"], p["mean"], p["var"]]
            nodes.append(helper.make_node("BatchNormalization", ins, [n.name], name=n.name, epsilon=BN_EPS))
        elif n.op == "relu":
            nodes.append(helper.make_node("Relu", n.inputs, [n.name], name=n.name))
        elif n.op == "clip6":
            lo = init(f"{n.name}.min", np.array(0.0, np.float32))
            hi = init(f"{n.name}.max", np.array(6.0, np.float32))
            nodes.append(helper.make_node("Clip", n.inputs + [lo, hi], [n.name], name=n.name))
        elif n.op == "add":
            nodes.append(helper.make_node("Add", n.inputs, [n.name], name=n.name))
        elif n.op == "gap":
            nodes.append(helper.make_node("GlobalAveragePool", n.inputs, [n.name], name=n.name))
        elif n.op == "flatten":
            nodes.append(helper.make_node("Flatten", n.inputs, [n.name], name=n.name, axis=1))
        elif n.op == "linear":
            ins = n.inputs + [p["weight"]] + ([p["bias"]] if "bias" in p else [])
            nodes.append(helper.make_node("Gemm", ins, [n.name], name=n.name, transB=1))
        else:
            raise ValueError(n.op)
    last = graph.nodes[-1].name
    # The graph output is the last node's value itself: edgecl wants it produced by the last node.
    g = helper.make_graph(
        nodes,
        "main",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", *graph.in_shape])],
        [helper.make_tensor_value_info(last, TensorProto.FLOAT, ["N", out_features])],
        initializer=inits,
        doc_string=doc,
    )
    m = helper.make_model(
        g, opset_imports=[helper.make_opsetid("", OPSET)], producer_name="edgecl tests/data/grad/make_grad_fixtures.py",
        ir_version=8,
    )
    onnx.checker.check_model(m, full_check=True)
    allowed = {"Conv", "BatchNormalization", "Relu", "Clip", "Add", "GlobalAveragePool", "Flatten", "Gemm"}
    assert {nd.op_type for nd in m.graph.node} <= allowed
    return m


def run_onnx(model, x):
    """Evaluate the ONNX graph with onnx's reference evaluator (float32)."""
    sess = onnx.reference.ReferenceEvaluator(model)
    return sess.run(None, {"x": np.asarray(x, dtype=np.float32)})[0]


def with_bn_stats(model, stats):
    """A copy of `model` whose BN running mean/var initializers are replaced by `stats`."""
    m = onnx.ModelProto()
    m.CopyFrom(model)
    for t in m.graph.initializer:
        for name, (mean, var) in stats.items():
            if t.name == f"{name}.mean":
                t.CopyFrom(numpy_helper.from_array(np.asarray(mean, np.float32), t.name))
            elif t.name == f"{name}.var":
                t.CopyFrom(numpy_helper.from_array(np.asarray(var, np.float32), t.name))
    return m


# --------------------------------------------------------------------------------------------
# PyTorch forward over the same layer list, in float64.


def forward(graph, x, training, weights=None, bn_stats=None, bn_affine=None, clr=None, seen=None):
    """
    weights:   node name -> weight tensor replacing the node's own (masked weights for SupSup)
    bn_stats:  node name -> (running_mean, running_var) tensors, updated in place when training
    bn_affine: node name -> (gamma, beta) tensors replacing the node's own (trainable for CLR)
    clr:       conv node name -> depthwise kernel [C,1,3,3] applied right after that conv
    seen:      if a dict, gets node name -> input of every relu / clip6 (pre-activations)
    """
    weights, bn_affine, clr = weights or {}, bn_affine or {}, clr or {}
    env = {"x": x}
    for n in graph.nodes:
        a = [env[i] for i in n.inputs]
        if seen is not None and n.op in ("relu", "clip6"):
            seen[n.name] = a[0].detach()
        if n.op == "conv":
            w = weights.get(n.name, None)
            w = t64(n.params["weight"]) if w is None else w
            b = t64(n.params["bias"]) if "bias" in n.params else None
            y = F.conv2d(a[0], w, b, stride=n.attrs["stride"], padding=n.attrs["pad"], groups=n.attrs["groups"])
            if n.name in clr:
                k = clr[n.name]
                y = F.conv2d(y, k, None, stride=1, padding=1, groups=k.shape[0])
        elif n.op == "bn":
            mean, var = bn_stats[n.name] if bn_stats else (t64(n.params["mean"]), t64(n.params["var"]))
            gamma, beta = bn_affine.get(n.name, (t64(n.params["scale"]), t64(n.params["B"])))
            y = F.batch_norm(a[0], mean, var, gamma, beta, training=training, momentum=BN_MOMENTUM, eps=BN_EPS)
        elif n.op == "relu":
            y = F.relu(a[0])
        elif n.op == "clip6":
            y = torch.clamp(a[0], 0.0, 6.0)
        elif n.op == "add":
            y = a[0] + a[1]
        elif n.op == "gap":
            y = a[0].mean(dim=(2, 3), keepdim=True)
        elif n.op == "flatten":
            y = torch.flatten(a[0], 1)
        elif n.op == "linear":
            w = weights.get(n.name, None)
            w = t64(n.params["weight"]) if w is None else w
            b = t64(n.params["bias"]) if "bias" in n.params else None
            y = F.linear(a[0], w, b)
        else:
            raise ValueError(n.op)
        env[n.name] = y
    return env[graph.nodes[-1].name]


def check_kinks(seen):
    """ReLU / Clip derivatives at exactly 0 or 6 are a convention; make sure none is needed."""
    for name, v in seen.items():
        assert not torch.any(v == 0.0) and not torch.any(v == 6.0), f"pre-activation exactly at a kink in {name}"


def fresh_stats(graph):
    return {n.name: (t64(n.params["mean"]).clone(), t64(n.params["var"]).clone()) for n in graph.of("bn")}


# --------------------------------------------------------------------------------------------
# Output and checks


written = []


def save(name, arr):
    arr = np.ascontiguousarray(np.asarray(arr, dtype="<f4"))
    path = os.path.join(OUT, name)
    np.save(path, arr, allow_pickle=False)
    written.append(name)


def save_text(name, lines):
    with open(os.path.join(OUT, name), "w", newline="\n") as f:
        f.write("\n".join(lines) + "\n")
    written.append(name)


def save_onnx(name, model):
    with open(os.path.join(OUT, name), "wb") as f:
        f.write(model.SerializeToString(deterministic=True))
    written.append(name)


def close(what, got, want, rtol, atol):
    got = np.asarray(got, np.float64)
    want = np.asarray(want, np.float64)
    if not np.allclose(got, want, rtol=rtol, atol=atol):
        sys.exit(f"CHECK FAILED: {what}: max |diff| {np.max(np.abs(got - want)):.3e}")
    print(f"  ok  {what}: max |diff| {np.max(np.abs(got - want)):.2e}")


def finite_difference(loss_of, tensors, picks, h=1e-6):
    """Central differences of loss_of() w.r.t. single entries tensors[i].view(-1)[j]."""
    out = []
    with torch.no_grad():
        for i, j in picks:
            flat = tensors[i].view(-1)
            v = flat[j].item()
            flat[j] = v + h
            up = loss_of().item()
            flat[j] = v - h
            down = loss_of().item()
            flat[j] = v
            out.append((up - down) / (2 * h))
    return np.array(out)


def batch_inputs(seed, shape):
    g = gen(seed)
    x = normal(g, (BATCH, *shape))
    labels = torch.randperm(CLASSES, generator=g)[:BATCH].numpy().astype(np.float32)
    assert len(set(labels.tolist())) == BATCH
    return x, labels


# --------------------------------------------------------------------------------------------
# Case gem: masked GEMResNet18, nf = 4


def signed_kaiming_constant(g, shape):
    fan = int(np.prod(shape[1:]))
    c = math.sqrt(2.0 / fan)
    s = torch.sign(torch.randn(shape, generator=g, dtype=D))
    assert torch.all(s != 0)
    return f32(s * c)


def gem_graph(seed, nf=4, classes=CLASSES):
    g = gen(seed)
    net = Graph((3, 32, 32))

    def bn(name, x, c):
        p = {"scale": np.ones(c, np.float32), "B": np.zeros(c, np.float32),
             "mean": np.zeros(c, np.float32), "var": np.ones(c, np.float32)}
        return net.add("bn", name, [x], p)

    def conv(name, x, cin, cout, k, stride):
        w = signed_kaiming_constant(g, (cout, cin, k, k))
        return net.add("conv", name, [x], {"weight": w}, stride=stride, pad=k // 2, groups=1)

    y = conv("conv1", "x", 3, nf, 3, 1)
    y = bn("bn1", y, nf)
    y = net.add("relu", "relu1", [y])
    cin = nf
    for s, (mult, stride) in enumerate([(1, 1), (2, 2), (4, 2), (8, 2)], start=1):
        cout = nf * mult
        for b, st in enumerate([stride, 1]):
            p = f"layer{s}.{b}"
            inp = y
            y = conv(f"{p}.conv1", inp, cin, cout, 3, st)
            y = bn(f"{p}.bn1", y, cout)
            y = net.add("relu", f"{p}.relu1", [y])
            y = conv(f"{p}.conv2", y, cout, cout, 3, 1)
            y = bn(f"{p}.bn2", y, cout)
            if st != 1 or cin != cout:
                sc = conv(f"{p}.shortcut.0", inp, cin, cout, 1, st)
                sc = bn(f"{p}.shortcut.1", sc, cout)
            else:
                sc = inp
            y = net.add("add", f"{p}.add", [y, sc])
            y = net.add("relu", f"{p}.relu2", [y])
            cin = cout
    y = net.add("gap", "pool", [y])
    y = net.add("flatten", "flatten", [y])
    w = signed_kaiming_constant(g, (classes, cin))
    net.add("linear", "linear", [y], {"weight": w})
    return net


class TopK(torch.autograd.Function):
    """Edge-popup mask from |S| (the j smallest -> 0); the backward passes the gradient
    straight through to |S| (SupSup's GetSubnet). Autograd then applies d|S|/dS = sign(S)."""

    @staticmethod
    def forward(ctx, abs_scores, j):
        m = torch.ones_like(abs_scores)
        order = torch.argsort(abs_scores.flatten(), stable=True)
        m.view(-1)[order[:j]] = 0.0
        return m

    @staticmethod
    def backward(ctx, grad):
        return grad, None


def zeroed(n):
    """j = floor((1 - k) * n), exactly (no floating-point rounding)."""
    return math.floor((1 - DENSITY) * n)


def case_gem():
    print("case gem")
    net = gem_graph(seed=1001)
    masked = [n for n in net.nodes if n.op in ("conv", "linear")]
    gs = gen(1002)
    scores = {}
    for n in masked:
        w = n.params["weight"]
        bound = 1.0 / math.sqrt(fan_in(w))
        scores[n.name] = uniform(gs, w.shape, -bound, bound)
        a = np.sort(np.abs(scores[n.name]).ravel())
        j = zeroed(a.size)
        assert 0 < j < a.size and a[j - 1] < a[j], f"tie at the top-k threshold of {n.name}"
        assert np.all(scores[n.name] != 0)
    x, labels = batch_inputs(1003, (3, 32, 32))

    # (A) autograd through the straight-through top-k (SupSup's formulation).
    W = {n.name: t64(n.params["weight"]) for n in masked}
    S = {k: t64(v).requires_grad_(True) for k, v in scores.items()}
    M = {k: TopK.apply(S[k].abs(), zeroed(S[k].numel())) for k in S}
    xa = t64(x).requires_grad_(True)
    y = torch.from_numpy(labels).long()
    stats = fresh_stats(net)
    seen = {}
    logits = forward(net, xa, True, weights={k: W[k] * M[k] for k in W}, bn_stats=stats, seen=seen)
    check_kinks(seen)
    loss = F.cross_entropy(logits, y)
    loss.backward()
    for k in M:
        kept = int(M[k].sum().item())
        assert kept == M[k].numel() - zeroed(M[k].numel())

    # (B) the straight-through rule by hand: dL/dS = sign(S) * W * dL/dW_eff.
    Weff = {k: (W[k] * M[k]).detach().requires_grad_(True) for k in W}
    xb = t64(x).requires_grad_(True)
    loss_b = F.cross_entropy(forward(net, xb, True, weights=Weff, bn_stats=fresh_stats(net)), y)
    loss_b.backward()
    for n in masked:
        k = n.name
        manual = torch.sign(S[k].detach()) * W[k] * Weff[k].grad
        close(f"grad_scores {k}: autograd vs sign(S)*W*dL/dW_eff", S[k].grad, manual, 1e-12, 1e-15)
    close("grad_x: run A vs run B", xa.grad, xb.grad, 1e-12, 1e-15)

    # (C) finite differences of the loss w.r.t. a few effective weights and inputs.
    names = list(Weff)
    leaves = [Weff[k].detach().clone() for k in names] + [t64(x)]
    grads = [Weff[k].grad for k in names] + [xb.grad]

    def loss_of():
        wd = dict(zip(names, leaves[:-1]))
        return F.cross_entropy(forward(net, leaves[-1], True, weights=wd, bn_stats=fresh_stats(net)), y)

    rng = np.random.default_rng(7)
    picks = []
    for i in [0, 3, 7, 9, 15, 19, len(names) - 1, len(leaves) - 1]:
        nz = np.flatnonzero(leaves[i].numpy().ravel()) if i < len(names) else np.arange(leaves[i].numel())
        picks += [(i, int(j)) for j in rng.choice(nz, 2, replace=False)]
    fd = finite_difference(loss_of, leaves, picks)
    ad = np.array([grads[i].view(-1)[j].item() for i, j in picks])
    close("autograd vs central differences (W_eff and x entries)", ad, fd, 1e-5, 1e-9)

    # Running statistics: PyTorch's update with the unbiased batch variance, checked by hand for
    # the first BN (its input is conv1 of the masked weights).
    c1 = F.conv2d(t64(x), W["conv1"] * M["conv1"].detach(), padding=1)
    bm = c1.mean(dim=(0, 2, 3))
    bv = c1.var(dim=(0, 2, 3), unbiased=True)
    close("bn1 running stats by hand", torch.cat(stats["bn1"]),
          torch.cat([0.9 * 0 + 0.1 * bm, 0.9 * 1 + 0.1 * bv]), 1e-12, 1e-15)

    # The ONNX graph (unmasked backbone, eval-mode BN) against the PyTorch forward.
    model = to_onnx(net, CLASSES, "edgecl grad fixture `gem`: GEMResNet18 nf=4, unmasked, BN unfolded")
    want = forward(net, t64(x), False).numpy()
    close("onnx.reference vs PyTorch, eval, running stats 0/1", run_onnx(model, x), want, 1e-4, 1e-4)
    upd = {k: (v[0].numpy(), v[1].numpy()) for k, v in stats.items()}
    want = forward(net, t64(x), False, bn_stats={k: (t64(m), t64(v)) for k, (m, v) in upd.items()}).numpy()
    close("onnx.reference vs PyTorch, eval, updated running stats", run_onnx(with_bn_stats(model, upd), x), want,
          1e-4, 1e-4)
    assert [n.op_type for n in model.graph.node].count("BatchNormalization") == len(net.of("bn"))

    save_onnx("gem.onnx", model)
    save("gem.x.npy", x)
    save("gem.labels.npy", labels)
    save("gem.scores.npy", np.concatenate([scores[n.name].ravel() for n in masked]))
    save("gem.logits.npy", logits.detach().numpy())
    save("gem.loss.npy", [loss.item()])
    save("gem.grad_scores.npy", np.concatenate([S[n.name].grad.numpy().ravel() for n in masked]))
    save("gem.grad_x.npy", xa.grad.numpy())
    bns = net.of("bn")
    save("gem.running_mean.npy", np.concatenate([stats[n.name][0].numpy() for n in bns]))
    save("gem.running_var.npy", np.concatenate([stats[n.name][1].numpy() for n in bns]))

    lines = [
        "# gem: GEMResNet18 nf=4 (gem.onnx). Maskable layers in ONNX node order, then BN nodes in ONNX node order.",
        f"# density k = {DENSITY} (kept fraction); zeroed = floor((1-k)*numel) smallest |S| get mask 0, kept = numel - zeroed.",
        "# offset: start of the layer's block in gem.scores.npy / gem.grad_scores.npy (and, for bn,",
        "# in gem.running_mean.npy / gem.running_var.npy).",
        "# mask <onnx node name> <op> <weight shape> fan_in=<fan_in> numel=<n> offset=<o> zeroed=<j> kept=<n-j>",
        "# bn <onnx node name> channels=<C> offset=<o>",
    ]
    off = 0
    for n in masked:
        w = n.params["weight"]
        op = "Conv" if n.op == "conv" else "Gemm"
        j = zeroed(w.size)
        lines.append(f"mask {n.name} {op} {'x'.join(map(str, w.shape))} fan_in={fan_in(w)} numel={w.size} "
                     f"offset={off} zeroed={j} kept={w.size - j}")
        off += w.size
    off = 0
    for n in bns:
        c = n.params["mean"].size
        lines.append(f"bn {n.name} channels={c} offset={off}")
        off += c
    save_text("gem.layers.txt", lines)
    print(f"  loss {loss.item():.6f}")


# --------------------------------------------------------------------------------------------
# Case clr: CLR over a small conv net


def clr_graph(seed):
    g = gen(seed)
    net = Graph((3, 16, 16))

    def bn(name, x, c):
        p = {"scale": uniform(g, (c,), 0.5, 1.5), "B": normal(g, (c,), 0.1),
             "mean": normal(g, (c,), 0.1), "var": uniform(g, (c,), 0.5, 1.5)}
        return net.add("bn", name, [x], p)

    y = net.add("conv", "conv1", ["x"], {"weight": normal(g, (8, 3, 3, 3), 0.3), "bias": normal(g, (8,), 0.3)},
                stride=1, pad=1, groups=1)
    y = bn("bn1", y, 8)
    y = net.add("clip6", "relu6", [y])
    y = net.add("conv", "dwconv", [y], {"weight": normal(g, (8, 1, 3, 3), 0.3)}, stride=2, pad=1, groups=8)
    y = bn("bn2", y, 8)
    y = net.add("relu", "relu2", [y])
    y = net.add("conv", "pwconv", [y], {"weight": normal(g, (16, 8, 1, 1), 0.3)}, stride=1, pad=0, groups=1)
    y = bn("bn3", y, 16)
    y = net.add("relu", "relu3", [y])
    y = net.add("gap", "pool", [y])
    net.add("flatten", "flatten", [y])
    return net


def case_clr():
    print("case clr")
    net = clr_graph(seed=2001)
    convs = net.of("conv")
    clr_at = [n for n in convs if n.params["weight"].shape[2:] != (1, 1)]
    assert [n.name for n in clr_at] == ["conv1", "dwconv"]
    bns = net.of("bn")
    g = gen(2002)
    kernels = {}
    for n in clr_at:
        c = n.params["weight"].shape[0]
        ident = torch.zeros(c, 1, 3, 3, dtype=D)
        ident[:, 0, 1, 1] = 1.0
        kernels[n.name] = f32(ident + torch.randn(c, 1, 3, 3, generator=g, dtype=D) * 0.1)
    bound = 1.0 / math.sqrt(16)
    head_w = uniform(g, (CLASSES, 16), -bound, bound)
    head_b = uniform(g, (CLASSES,), -bound, bound)
    x, labels = batch_inputs(2003, (3, 16, 16))
    y = torch.from_numpy(labels).long()

    K = {k: t64(v).requires_grad_(True) for k, v in kernels.items()}
    gam = {n.name: t64(n.params["scale"]).requires_grad_(True) for n in bns}
    bet = {n.name: t64(n.params["B"]).requires_grad_(True) for n in bns}
    hw = t64(head_w).requires_grad_(True)
    hb = t64(head_b).requires_grad_(True)
    xt = t64(x).requires_grad_(True)
    reg = [K[n.name] for n in clr_at] + [gam[n.name] for n in bns] + [bet[n.name] for n in bns] + [hw, hb]

    def loss_fn(xin, stats, seen=None):
        feats = forward(net, xin, True, bn_stats=stats, bn_affine={k: (gam[k], bet[k]) for k in gam}, clr=K,
                        seen=seen)
        logits = F.linear(feats, hw, hb)
        ce = F.cross_entropy(logits, y)
        penalty = sum(torch.linalg.vector_norm(p) for p in reg if torch.linalg.vector_norm(p) > 0)
        return logits, ce + CLR_LAMBDA * penalty, ce

    stats = fresh_stats(net)
    seen = {}
    logits, loss, ce = loss_fn(xt, stats, seen)
    loss.backward()
    check_kinks(seen)
    print(f"  largest value entering relu6: {seen['relu6'].max().item():.4f}")

    # Finite differences over a few entries of every trainable tensor and of x.
    leaves = reg + [xt]
    rng = np.random.default_rng(11)
    picks = [(i, int(j)) for i, p in enumerate(leaves) for j in rng.choice(p.numel(), min(2, p.numel()), replace=False)]
    fd = finite_difference(lambda: loss_fn(xt, fresh_stats(net))[1], [p.data for p in leaves], picks)
    ad = np.array([leaves[i].grad.view(-1)[j].item() for i, j in picks])
    close("autograd vs central differences (CLR kernels, gamma, beta, head, x)", ad, fd, 1e-5, 1e-9)
    # The penalty's gradient is lambda * p / ||p||: check it on the head bias by hand.
    with torch.no_grad():
        feats = forward(net, t64(x), True, bn_stats=fresh_stats(net), bn_affine={k: (gam[k], bet[k]) for k in gam},
                        clr=K)
        p = torch.softmax(F.linear(feats, hw, hb), dim=1)
        p[torch.arange(BATCH), y] -= 1.0
        want = p.mean(0) + CLR_LAMBDA * hb / torch.linalg.vector_norm(hb)
    close("grad head bias by hand (softmax - onehot, + lambda p/|p|)", hb.grad, want, 1e-12, 1e-15)

    model = to_onnx(net, 16, "edgecl grad fixture `clr`: conv net backbone, no head, BN unfolded")
    want = forward(net, t64(x), False).numpy()
    close("onnx.reference vs PyTorch, eval", run_onnx(model, x), want, 1e-4, 1e-4)
    upd = {k: (v[0].detach().numpy(), v[1].detach().numpy()) for k, v in stats.items()}
    want = forward(net, t64(x), False, bn_stats={k: (t64(m), t64(v)) for k, (m, v) in upd.items()}).numpy()
    close("onnx.reference vs PyTorch, eval, updated running stats", run_onnx(with_bn_stats(model, upd), x), want,
          1e-4, 1e-4)

    save_onnx("clr.onnx", model)
    save("clr.x.npy", x)
    save("clr.labels.npy", labels)
    save("clr.reprogram.npy", np.concatenate([kernels[n.name].ravel() for n in clr_at]))
    save("clr.gamma.npy", np.concatenate([n.params["scale"] for n in bns]))
    save("clr.beta.npy", np.concatenate([n.params["B"] for n in bns]))
    save("clr.head_w.npy", head_w)
    save("clr.head_b.npy", head_b)
    save("clr.logits.npy", logits.detach().numpy())
    save("clr.loss.npy", [loss.item()])
    save("clr.grad_reprogram.npy", np.concatenate([K[n.name].grad.numpy().ravel() for n in clr_at]))
    save("clr.grad_gamma.npy", np.concatenate([gam[n.name].grad.numpy() for n in bns]))
    save("clr.grad_beta.npy", np.concatenate([bet[n.name].grad.numpy() for n in bns]))
    save("clr.grad_head_w.npy", hw.grad.numpy())
    save("clr.grad_head_b.npy", hb.grad.numpy())
    save("clr.grad_x.npy", xt.grad.numpy())
    save("clr.running_mean.npy", np.concatenate([stats[n.name][0].numpy() for n in bns]))
    save("clr.running_var.npy", np.concatenate([stats[n.name][1].numpy() for n in bns]))

    lines = [
        "# clr: backbone clr.onnx (no head). Conv nodes in ONNX node order, then CLR layers, then BN nodes.",
        "# conv <onnx node name> <weight shape> k=<kh>x<kw> stride=<s> pad=<p> groups=<g> bias=<yes|no> clr=<index|none>",
        "# clr <index> after=<conv node> before=<bn node> channels=<C> offset=<start in clr.reprogram.npy>",
        "# bn <onnx node name> channels=<C> offset=<start in clr.gamma/beta/running_mean/running_var.npy>",
        f"# loss = mean cross-entropy + {CLR_LAMBDA:g} * sum of L2 norms of: each CLR kernel, each BN gamma,",
        "# each BN beta, head weight, head bias.",
    ]
    consumer = {n.inputs[0]: n.name for n in net.nodes if n.inputs}
    for n in convs:
        w = n.params["weight"]
        idx = [c.name for c in clr_at].index(n.name) if n in clr_at else "none"
        lines.append(f"conv {n.name} {'x'.join(map(str, w.shape))} k={w.shape[2]}x{w.shape[3]} "
                     f"stride={n.attrs['stride']} pad={n.attrs['pad']} groups={n.attrs['groups']} "
                     f"bias={'yes' if 'bias' in n.params else 'no'} clr={idx}")
    off = 0
    for i, n in enumerate(clr_at):
        c = n.params["weight"].shape[0]
        lines.append(f"clr {i} after={n.name} before={consumer[n.name]} channels={c} offset={off}")
        off += c * 9
    off = 0
    for n in bns:
        c = n.params["scale"].size
        lines.append(f"bn {n.name} channels={c} offset={off}")
        off += c
    save_text("clr.layers.txt", lines)
    print(f"  loss {loss.item():.6f} (cross-entropy {ce.item():.6f}, penalty term {loss.item() - ce.item():.4e})")


if __name__ == "__main__":
    case_gem()
    case_clr()
    total = sum(os.path.getsize(os.path.join(OUT, f)) for f in written)
    print(f"wrote {len(written)} files, {total} bytes, to {OUT}")
