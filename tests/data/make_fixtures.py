"""Regenerates the image fixtures in tests/data (host only, never CI; no torch needed).

    apt-get install -y dataset-fashion-mnist
    pip install numpy pillow onnxruntime scikit-learn
    python3 tests/data/make_fixtures.py

Writes, all deterministic:
- fmnist/NN-L.png: the first 24 Fashion-MNIST *test* images as 28x28 8-bit grey PNGs
  (NN = index 00..23, L = label 0..9), read from Debian's dataset-fashion-mnist (fmnist/LICENSE.md).
- china.jpg, flower.jpg: scikit-learn's two sample photos, copied byte for byte from
  sklearn/datasets/images/ (PHOTOS.md).
- lite0-china-96.npy: float32 [1, 3, 96, 96], china.jpg decoded by Pillow, converted to RGB,
  resized to 96x96 with `Image.resize((96, 96), Image.BILINEAR)` (Pillow's bilinear filter
  widens with the scale factor when shrinking, so it is not a plain 2x2 interpolation), scaled
  to [0, 1] and normalised with EfficientNet-Lite's mean 127/255 and std 128/255 per channel.
- lite0-china-96.logits.npy: float32 [1, 1000], onnxruntime's output of
  models/efficientnet-lite0.onnx on that tensor (top-1 is class 832, "stupa").
"""
import gzip
import os
import shutil

import numpy as np
import onnxruntime as ort
import sklearn
from PIL import Image

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
FMNIST = "/usr/share/datasets/fashion-mnist"
LITE0 = os.path.join(ROOT, "models", "efficientnet-lite0.onnx")
LITE_MEAN = np.float32(127 / 255)
LITE_STD = np.float32(128 / 255)


def idx(path):
    """Reads a gzipped IDX file (big-endian dims after a 4-byte magic whose last byte is ndim)."""
    with gzip.open(path, "rb") as f:
        data = f.read()
    ndim = data[3]
    dims = [int.from_bytes(data[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim)]
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim).reshape(dims)


def fashion_mnist():
    dst = os.path.join(HERE, "fmnist")
    os.makedirs(dst, exist_ok=True)
    images = idx(os.path.join(FMNIST, "t10k-images-idx3-ubyte.gz"))
    labels = idx(os.path.join(FMNIST, "t10k-labels-idx1-ubyte.gz"))
    for i in range(24):
        Image.fromarray(images[i], mode="L").save(os.path.join(dst, f"{i:02d}-{labels[i]}.png"), optimize=True)


def photos():
    src = os.path.join(os.path.dirname(sklearn.__file__), "datasets", "images")
    for name in ("china.jpg", "flower.jpg"):
        shutil.copyfile(os.path.join(src, name), os.path.join(HERE, name))


def lite0_china():
    img = Image.open(os.path.join(HERE, "china.jpg")).convert("RGB").resize((96, 96), Image.BILINEAR)
    x = np.asarray(img, dtype=np.float32) / np.float32(255)
    x = (x - LITE_MEAN) / LITE_STD
    x = np.ascontiguousarray(x.transpose(2, 0, 1)[None], dtype=np.float32)
    sess = ort.InferenceSession(LITE0, providers=["CPUExecutionProvider"])
    logits = sess.run(None, {"input": x})[0].astype(np.float32)
    np.save(os.path.join(HERE, "lite0-china-96.npy"), x)
    np.save(os.path.join(HERE, "lite0-china-96.logits.npy"), logits)
    print("lite0-china-96:", x.shape, "range", float(x.min()), float(x.max()),
          "logits", logits.shape, "top-5", np.argsort(-logits[0])[:5].tolist())


def main():
    fashion_mnist()
    photos()
    lite0_china()


if __name__ == "__main__":
    main()
