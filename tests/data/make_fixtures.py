"""Regenerates the small image fixtures in tests/data (host only; needs numpy and Pillow).

    apt-get install dataset-fashion-mnist && python3 tests/data/make_fixtures.py

Writes the first 24 Fashion-MNIST test images as 28x28 grey PNGs named NN-L.png
(index, label). The two colour photos are copied by hand from scikit-learn (PHOTOS.md).
"""
import gzip
import os

import numpy as np
from PIL import Image

SRC = "/usr/share/datasets/fashion-mnist"
DST = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fmnist")


def idx(path):
    with gzip.open(path, "rb") as f:
        data = f.read()
    ndim = data[3]
    dims = [int.from_bytes(data[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim)]
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim).reshape(dims)


def main():
    os.makedirs(DST, exist_ok=True)
    images = idx(os.path.join(SRC, "t10k-images-idx3-ubyte.gz"))
    labels = idx(os.path.join(SRC, "t10k-labels-idx1-ubyte.gz"))
    for i in range(24):
        Image.fromarray(images[i], mode="L").save(os.path.join(DST, f"{i:02d}-{labels[i]}.png"), optimize=True)


if __name__ == "__main__":
    main()
