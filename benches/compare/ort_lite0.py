"""onnxruntime on EfficientNet-Lite0, the long-term speed peer of `cargo bench --bench forward`.

Host only (not CI):

    pip install onnxruntime numpy
    python3 benches/compare/ort_lite0.py [--json out.json] [--model PATH]

CPUExecutionProvider, all graph optimisations, intra-op threads 1 and 2 (inter-op 1), batch 1,
96x96 and 224x224 (models/efficientnet-lite0.onnx has dynamic H and W), a fixed random input
(numpy seed 0): 20 warm-up runs, then at least 200 runs and at least 3 s; prints the median,
p10 and p90 latency of one `run` in milliseconds. `--json FILE` also writes
{"onnxruntime": version, "cpu": model name, "results": [{size, threads, median_ms, p10_ms,
p90_ms, runs}, ...]}. Run it on an otherwise idle machine: it has 2 cores.
"""
import argparse
import json
import os
import time

import numpy as np
import onnxruntime as ort

MODEL = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "models", "efficientnet-lite0.onnx")


def cpu_name():
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "unknown"


def bench(size, threads):
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    sess = ort.InferenceSession(MODEL, opts, providers=["CPUExecutionProvider"])
    x = np.random.default_rng(0).standard_normal((1, 3, size, size)).astype(np.float32)
    feed = {sess.get_inputs()[0].name: x}
    for _ in range(20):
        sess.run(None, feed)
    times = []
    start = time.perf_counter()
    while len(times) < 200 or time.perf_counter() - start < 3.0:
        t = time.perf_counter()
        sess.run(None, feed)
        times.append((time.perf_counter() - t) * 1e3)
    p10, p50, p90 = np.percentile(times, [10, 50, 90])
    return {"size": size, "threads": threads, "median_ms": p50, "p10_ms": p10, "p90_ms": p90, "runs": len(times)}


def main():
    global MODEL
    ap = argparse.ArgumentParser(description="onnxruntime latency of EfficientNet-Lite0")
    ap.add_argument("--json", help="also write the results to this JSON file")
    ap.add_argument("--model", default=MODEL, help="ONNX file (default: models/efficientnet-lite0.onnx)")
    args = ap.parse_args()
    MODEL = args.model
    rows = [bench(s, t) for s in (96, 224) for t in (1, 2)]
    print(f"onnxruntime {ort.__version__} on {cpu_name()}")
    for r in rows:
        print(f"lite0 {r['size']}x{r['size']} threads {r['threads']}: median {r['median_ms']:.2f} ms "
              f"(p10 {r['p10_ms']:.2f}, p90 {r['p90_ms']:.2f}, {r['runs']} runs)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"onnxruntime": ort.__version__, "cpu": cpu_name(), "results": rows}, f, indent=1)


if __name__ == "__main__":
    main()
