#!/usr/bin/env python3
"""Builds the Fashion-MNIST subset that edgecl embeds (`Source::Embedded`).

Rule: for each split, keep the first N images of each of the ten classes in the order they
appear in the original file (N = TRAIN_PER_CLASS for train, TEST_PER_CLASS for t10k), and
keep their original relative order. The output is gzipped IDX, byte-identical on every run
(gzip header mtime 0, no file name).

Usage (the inputs are the files of Debian's `dataset-fashion-mnist` package, or the same
files from https://github.com/zalandoresearch/fashion-mnist):

    python3 src/data/embedded/make_subset.py /usr/share/datasets/fashion-mnist src/data/embedded

Standard library only.
"""

import gzip
import struct
import sys
from pathlib import Path

TRAIN_PER_CLASS = 500
TEST_PER_CLASS = 100
CLASSES = 10


def read_idx(path, magic):
    data = gzip.decompress(Path(path).read_bytes())
    got, n = struct.unpack(">II", data[:8])
    if got != magic:
        sys.exit(f"{path}: magic {got:#010x}, expected {magic:#010x}")
    if magic == 0x803:
        rows, cols = struct.unpack(">II", data[8:16])
        size = rows * cols
        body = data[16:]
        return [body[i * size:(i + 1) * size] for i in range(n)], (rows, cols)
    return list(data[8:8 + n]), None


def write_gz(path, data):
    # mtime=0 and no file name in the header keep the output reproducible.
    with open(path, "wb") as raw:
        with gzip.GzipFile(filename="", mode="wb", fileobj=raw, compresslevel=9, mtime=0) as gz:
            gz.write(data)


def subset(src, dst, prefix, per_class):
    images, (rows, cols) = read_idx(src / f"{prefix}-images-idx3-ubyte.gz", 0x803)
    labels, _ = read_idx(src / f"{prefix}-labels-idx1-ubyte.gz", 0x801)
    taken = [0] * CLASSES
    keep = []
    for i, label in enumerate(labels):
        if taken[label] < per_class:
            taken[label] += 1
            keep.append(i)
    if any(t != per_class for t in taken):
        sys.exit(f"{prefix}: not enough images per class: {taken}")
    header = struct.pack(">IIII", 0x803, len(keep), rows, cols)
    write_gz(dst / f"{prefix}-images-idx3-ubyte.gz", header + b"".join(images[i] for i in keep))
    write_gz(dst / f"{prefix}-labels-idx1-ubyte.gz", struct.pack(">II", 0x801, len(keep)) + bytes(labels[i] for i in keep))
    print(f"{prefix}: {len(keep)} images ({per_class} per class)")


def main():
    if len(sys.argv) != 3:
        sys.exit(__doc__)
    src, dst = Path(sys.argv[1]), Path(sys.argv[2])
    subset(src, dst, "train", TRAIN_PER_CLASS)
    subset(src, dst, "t10k", TEST_PER_CLASS)


if __name__ == "__main__":
    main()
