"""SupSup one-shot task inference on permuted Fashion-MNIST (PyTorch reference replication).

Purpose: find out whether the published SupSup method itself (Wortsman et al. 2020,
"Supermasks in Superposition", GNu setting: task identity not given at test time) infers
the task correctly on permuted Fashion-MNIST, independently of edgecl. Written from the
paper's description, not copied from the reference code.

Host only, never CI (needs torch + numpy, CPU). Data: the gzipped IDX files of Fashion-MNIST
in /usr/share/datasets/fashion-mnist/ (or --data DIR).

Run (from the repository root):

    python3 benches/compare/supsup_oneshot.py --tasks 10 --steps 1000 --outputs 10
    python3 benches/compare/supsup_oneshot.py --tasks 10 --steps 1000 --outputs 500 --objective both
    python3 benches/compare/supsup_oneshot.py ... --diag 3 --json out.json

What it does:

* Network FC1024: 784 -> 1024 -> ReLU -> 1024 -> ReLU -> OUT (--outputs, default 10), no
  biases. Weights frozen "signed constant": sign(w) * sqrt(2 / fan_in), w ~ N(0, 1) with a
  fixed seed (--seed).
* Each task t has one real score tensor per layer, initialised U(-1/sqrt(fan_in),
  1/sqrt(fan_in)) (= PyTorch's kaiming_uniform_(a=sqrt(5))). Mask = (scores >= 0) as float;
  forward uses W * mask; the gradient passes straight through to the scores.
* Inputs: pixels / 255, (x - 0.1307) / 0.3081, flattened, permuted by task t's permutation
  (np.random.seed(t + seed); np.random.permutation(784)); task 0 is permuted too.
* Training per task: RMSprop lr 1e-4 (other PyTorch defaults), batch 128, cross-entropy of
  the 10 real labels over all OUT outputs, --steps steps on the reshuffled training set.
* Evaluation after all tasks are learned, on each task's permuted test set:
  - task given: accuracy of each task's own mask on its 10,000 test images;
  - one-shot H: superposed weights W * sum_i alpha_i M_i (alpha_i = 1/n, requires grad),
    H = mean softmax entropy of the logits, inferred task = argmin_i dH/dalpha_i;
  - one-shot G (only when OUT > 10): G = mean over examples of logsumexp over all outputs
    with the first 10 logits detached, inferred task = argmin_i dG/dalpha_i;
  - both one-shot rules on every full batch of 128 (78 per task) and on single images (the
    first 200 test images of each task, one at a time);
  - lowest entropy: run each task's own network on the batch of 128 and pick the task whose
    mean softmax entropy is lowest.
  One alpha tensor is used per layer (all equal to 1/n); the shared-alpha gradient of the
  paper is the sum over layers of these, so the result is identical and --diag N can also
  print the per-layer terms of dH/dalpha for the first N batches of task 0. The JSON also
  records, as a diagnostic, how often each single layer's term alone would pick the right
  task.

`--json PATH` writes settings, per-rule correct counts and totals, per-task counts,
confusion matrices (rows: true task, columns: inferred task), per-task accuracy and times.
"""
import argparse
import gzip
import json
import os
import time

import numpy as np
import torch
import torch.nn.functional as F

DATA = "/usr/share/datasets/fashion-mnist"
MEAN, STD = 0.1307, 0.3081
HIDDEN = 1024


def read_idx(path):
    with gzip.open(path, "rb") as f:
        raw = f.read()
    magic = int.from_bytes(raw[0:4], "big")
    ndim = magic & 0xFF
    dims = [int.from_bytes(raw[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim)]
    return np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim).reshape(dims)


def load(data_dir, split):
    prefix = "train" if split == "train" else "t10k"
    x = read_idx(os.path.join(data_dir, f"{prefix}-images-idx3-ubyte.gz"))
    y = read_idx(os.path.join(data_dir, f"{prefix}-labels-idx1-ubyte.gz"))
    x = torch.from_numpy(((x.astype(np.float32) / 255.0 - MEAN) / STD).reshape(len(x), 784))
    y = torch.from_numpy(y.astype(np.int64))
    return x, y


def permutation(task, seed):
    np.random.seed(task + seed)
    return torch.from_numpy(np.random.permutation(784))


class StraightThroughMask(torch.autograd.Function):
    @staticmethod
    def forward(ctx, scores):
        return (scores >= 0).float()

    @staticmethod
    def backward(ctx, grad):
        return grad


def entropy(logits):
    logp = F.log_softmax(logits, dim=1)
    return -(logp.exp() * logp).sum(dim=1)  # per example


def forward_masked(x, weights, masks):
    h = x
    for l, (w, m) in enumerate(zip(weights, masks)):
        h = h @ (w * m).t()
        if l < len(weights) - 1:
            h = F.relu(h)
    return h


def train_task(task, weights, xtr, ytr, perm, steps, seed, log_every):
    g = torch.Generator().manual_seed(1000003 * (seed + 1) + task)
    scores = []
    for w in weights:
        bound = 1.0 / np.sqrt(w.shape[1])
        s = (torch.rand(w.shape, generator=g) * 2 - 1) * bound
        scores.append(s.requires_grad_(True))
    opt = torch.optim.RMSprop(scores, lr=1e-4)
    n = len(xtr)
    order = torch.randperm(n, generator=g)
    pos = 0
    run_loss, run_acc, run_n = 0.0, 0.0, 0
    for step in range(steps):
        if pos + 128 > n:
            order = torch.randperm(n, generator=g)
            pos = 0
        idx = order[pos:pos + 128]
        pos += 128
        x = xtr[idx][:, perm]
        y = ytr[idx]
        masks = [StraightThroughMask.apply(s) for s in scores]
        logits = forward_masked(x, weights, masks)
        loss = F.cross_entropy(logits, y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        run_loss += loss.item()
        run_acc += (logits[:, :10].argmax(1) == y).float().mean().item()
        run_n += 1
        if log_every and (step + 1) % log_every == 0:
            print(f"  task {task} step {step + 1}: loss {run_loss / run_n:.4f} "
                  f"train-acc {run_acc / run_n:.4f}", flush=True)
            run_loss, run_acc, run_n = 0.0, 0.0, 0
    return [(s.detach() >= 0).float() for s in scores]


class Superposition:
    """W * sum_i alpha_i M_i with one alpha leaf per layer (all 1/n)."""

    def __init__(self, weights, task_masks):
        n = len(task_masks)
        self.n = n
        # wm[l]: (n, out, in) = W_l * M_{i,l}
        self.wm = [torch.stack([w * task_masks[i][l] for i in range(n)])
                   for l, w in enumerate(weights)]

    def grads(self, x, objective, nreal=10):
        """Per-layer d objective / d alpha, shape (layers, n)."""
        alphas = [torch.full((self.n,), 1.0 / self.n, requires_grad=True) for _ in self.wm]
        h = x
        for l, (wm, a) in enumerate(zip(self.wm, alphas)):
            w = torch.einsum("i,ijk->jk", a, wm)
            h = h @ w.t()
            if l < len(self.wm) - 1:
                h = F.relu(h)
        logits = h
        if objective == "H":
            obj = entropy(logits).mean()
        elif objective == "G":
            z = torch.cat([logits[:, :nreal].detach(), logits[:, nreal:]], dim=1)
            obj = torch.logsumexp(z, dim=1).mean()
        else:
            raise ValueError(objective)
        gs = torch.autograd.grad(obj, alphas)
        return torch.stack(gs)


def new_counter(n):
    return {"correct": 0, "total": 0, "per_task_correct": [0] * n, "per_task_total": [0] * n,
            "confusion": [[0] * n for _ in range(n)]}


def record(c, true_task, pred):
    c["total"] += 1
    c["per_task_total"][true_task] += 1
    c["confusion"][true_task][pred] += 1
    if pred == true_task:
        c["correct"] += 1
        c["per_task_correct"][true_task] += 1


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tasks", type=int, default=10)
    ap.add_argument("--steps", type=int, default=1000)
    ap.add_argument("--outputs", type=int, default=10)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--objective", choices=["H", "G", "both"], default="H")
    ap.add_argument("--json", default=None)
    ap.add_argument("--data", default=DATA)
    ap.add_argument("--single", type=int, default=200, help="single images per task")
    ap.add_argument("--diag", type=int, default=0,
                    help="print per-layer dH/dalpha for the first N batches of task 0")
    ap.add_argument("--log-every", type=int, default=250)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()

    torch.set_num_threads(args.threads)
    t_start = time.time()
    n_tasks, out = args.tasks, args.outputs
    objectives = ["H", "G"] if args.objective == "both" else [args.objective]
    if "G" in objectives and out <= 10:
        print("warning: G has zero gradient when --outputs <= 10; skipping G")
        objectives = [o for o in objectives if o != "G"]

    xtr, ytr = load(args.data, "train")
    xte, yte = load(args.data, "test")

    gw = torch.Generator().manual_seed(args.seed)
    weights = []
    for fan_in, fan_out in [(784, HIDDEN), (HIDDEN, HIDDEN), (HIDDEN, out)]:
        w = torch.randn((fan_out, fan_in), generator=gw)
        weights.append(torch.sign(w) * np.sqrt(2.0 / fan_in))

    perms = [permutation(t, args.seed) for t in range(n_tasks)]

    # ---- training
    t0 = time.time()
    task_masks = []
    for t in range(n_tasks):
        ts = time.time()
        task_masks.append(train_task(t, weights, xtr, ytr, perms[t], args.steps, args.seed,
                                     args.log_every))
        dens = [m.mean().item() for m in task_masks[-1]]
        print(f"task {t} trained in {time.time() - ts:.1f}s, mask density "
              + " ".join(f"{d:.3f}" for d in dens), flush=True)
    train_seconds = time.time() - t0

    # ---- task given
    t0 = time.time()
    task_acc = []
    xte_t = [xte[:, perms[t]] for t in range(n_tasks)]
    with torch.no_grad():
        for t in range(n_tasks):
            correct = 0
            for i in range(0, len(xte), 1000):
                logits = forward_masked(xte_t[t][i:i + 1000], weights, task_masks[t])
                correct += (logits[:, :10].argmax(1) == yte[i:i + 1000]).sum().item()
            task_acc.append(correct / len(xte))
    print("task-given accuracy: " + " ".join(f"{a:.4f}" for a in task_acc)
          + f"  mean {np.mean(task_acc):.4f}", flush=True)
    given_seconds = time.time() - t0

    # ---- lowest entropy (batches of 128)
    t0 = time.time()
    nb = len(xte) // 128
    lowest = new_counter(n_tasks)
    with torch.no_grad():
        for t in range(n_tasks):
            for b in range(nb):
                x = xte_t[t][b * 128:(b + 1) * 128]
                ents = [entropy(forward_masked(x, weights, task_masks[i])).mean().item()
                        for i in range(n_tasks)]
                record(lowest, t, int(np.argmin(ents)))
    lowest_seconds = time.time() - t0
    print(f"lowest-entropy (batch 128): {lowest['correct']}/{lowest['total']} "
          f"= {lowest['correct'] / lowest['total']:.4f}", flush=True)

    # ---- one-shot
    sup = Superposition(weights, task_masks)
    nl = len(weights)
    results = {}
    for obj in objectives:
        res = {}
        for mode in ["batch128", "single"]:
            t0 = time.time()
            total = new_counter(n_tasks)
            per_layer = [new_counter(n_tasks) for _ in range(nl)]
            for t in range(n_tasks):
                if mode == "batch128":
                    batches = [xte_t[t][b * 128:(b + 1) * 128] for b in range(nb)]
                else:
                    batches = [xte_t[t][i:i + 1] for i in range(args.single)]
                for bi, x in enumerate(batches):
                    g = sup.grads(x, obj)  # (layers, n)
                    record(total, t, int(torch.argmin(g.sum(0))))
                    for l in range(nl):
                        record(per_layer[l], t, int(torch.argmin(g[l])))
                    if (obj == "H" and mode == "batch128" and t == 0 and bi < args.diag):
                        print(f"\n[diag] task 0, batch {bi}: dH/dalpha_i by layer "
                              f"(columns: task i; argmin marked *)")
                        rows = [(f"layer{l + 1}", g[l]) for l in range(nl)] + [("sum", g.sum(0))]
                        print("         " + " ".join(f"{i:>10d}" for i in range(n_tasks)))
                        for name, row in rows:
                            am = int(torch.argmin(row))
                            print(f"{name:>8} " + " ".join(
                                f"{v:>+10.2e}" + ("*" if i == am else " ")
                                for i, v in enumerate(row.tolist()))[:-1]
                                  + f"   argmin={am}")
            secs = time.time() - t0
            total["seconds"] = secs
            total["per_layer_argmin_diagnostic"] = [
                {"layer": l + 1, "correct": c["correct"], "total": c["total"],
                 "per_task_correct": c["per_task_correct"]} for l, c in enumerate(per_layer)]
            res[mode] = total
            print(f"one-shot {obj} {mode}: {total['correct']}/{total['total']} = "
                  f"{total['correct'] / total['total']:.4f}  ({secs:.1f}s)  per-layer-alone: "
                  + " ".join(f"L{l + 1} {c['correct'] / c['total']:.3f}"
                             for l, c in enumerate(per_layer)), flush=True)
            print("  per task: " + " ".join(
                f"{c}/{n}" for c, n in zip(total["per_task_correct"], total["per_task_total"])))
        results[obj] = res

    total_seconds = time.time() - t_start
    summary = {
        "settings": {"tasks": n_tasks, "steps": args.steps, "outputs": out, "seed": args.seed,
                     "objectives": objectives, "batch": 128, "single_per_task": args.single,
                     "optimizer": "RMSprop lr 1e-4", "threads": args.threads,
                     "torch": torch.__version__},
        "task_given_accuracy": task_acc,
        "task_given_mean": float(np.mean(task_acc)),
        "lowest_entropy_batch128": lowest,
        "oneshot": results,
        "seconds": {"train": train_seconds, "task_given": given_seconds,
                    "lowest_entropy": lowest_seconds, "total": total_seconds},
    }
    print("\n==== summary ====")
    print(f"settings: tasks {n_tasks} steps {args.steps} outputs {out} seed {args.seed}")
    print(f"task-given accuracy mean {np.mean(task_acc):.4f} "
          f"(min {min(task_acc):.4f}, max {max(task_acc):.4f})")
    print(f"lowest-entropy batch128: {lowest['correct']}/{lowest['total']}")
    for obj, res in results.items():
        for mode, c in res.items():
            print(f"one-shot {obj} {mode}: {c['correct']}/{c['total']} "
                  f"= {c['correct'] / c['total']:.4f}")
    print(f"seconds: train {train_seconds:.1f}, total {total_seconds:.1f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(summary, f, indent=1)
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
