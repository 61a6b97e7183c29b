"""Does `reparam.expand` help a plain network train? A small plain segmentation net, trained
from scratch on gcnet's generated demo dataset on the CPU: the plain net, then the same net
expanded with each recipe; the same initial weights, batches, iterations and seed for all.

    python benchmarks/expand_demo.py               # about 10 minutes on 2 cores
    python benchmarks/expand_demo.py --fast        # a quick look (a minute or two)
    python benchmarks/expand_demo.py --round-trip  # op counts of fuse(m) and fuse(expand(m)), torchvision and GCNet-S

Each run trains in its own process, so its memory is its own. Printed per run:
training wall time (validation excluded), peak RSS during training and its rise over the
RSS at the start of training (the model, optimizer and data already there), validation mIoU (of the trained
model and of its `reparam.fuse`d deploy form, which must be the same), and the deploy form's
convs and BNs, which must be the plain net's. `--plot` draws the mIoU curves (matplotlib).
"""
from __future__ import annotations

import argparse
import concurrent.futures
import multiprocessing
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

import reparam  # noqa: E402
from gcnet.datasets import IGNORE_INDEX, Demo  # noqa: E402
from gcnet.evaluate import evaluate  # noqa: E402
from gcnet.transforms import normalize, to_tensors  # noqa: E402

RECIPES = ["repvgg", "acnet", "dbb", "gcblock"]


def conv_bn_relu(cin: int, cout: int, stride: int = 1) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU())


class PlainSeg(nn.Module):
    """VGG-style: six 3×3 conv-BN-ReLU (two of stride 2), a 1×1 classifier, logits upsampled
    to the input. (N, 3, H, W) → (N, classes, H, W)."""

    def __init__(self, num_classes: int, width: int = 16):
        super().__init__()
        w = width
        self.body = nn.Sequential(conv_bn_relu(3, w, 2), conv_bn_relu(w, w), conv_bn_relu(w, 2 * w, 2),
                                  conv_bn_relu(2 * w, 2 * w), conv_bn_relu(2 * w, 2 * w), conv_bn_relu(2 * w, 2 * w))
        self.cls = nn.Conv2d(2 * w, num_classes, 1)

    def forward(self, x):
        return F.interpolate(self.cls(self.body(x)), size=x.shape[2:], mode="bilinear", align_corners=False)


def tensors(dataset) -> tuple[torch.Tensor, torch.Tensor]:
    pairs = [to_tensors(*dataset[i]) for i in range(len(dataset))]
    return torch.stack([normalize(img) for img, _ in pairs]), torch.stack([lab for _, lab in pairs])


def memory_mib(field: str) -> float:
    """VmRSS (resident now) or VmHWM (peak resident since the last `reset_peak`), MiB (Linux)."""
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) / 1024 for line in f if line.startswith(field + ":"))


def reset_peak():
    """Peak RSS := RSS now, so the peak read later is that of what runs after (Linux ≥ 4.0)."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def run(recipe: str | None, args) -> dict:
    """Train the plain net (recipe None) or its expansion; what the table prints."""
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    train_set, val_set = Demo(split="train", size=args.size, length=args.train_images), Demo(split="val", size=args.size)
    images, labels = tensors(train_set)
    plain = PlainSeg(len(Demo.classes), args.width)
    model = plain if recipe is None else reparam.expand(plain, recipe)
    opt = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=0.9, weight_decay=5e-4)
    rng = np.random.default_rng(args.seed)  # the same batches and flips for every run
    reset_peak()
    start_rss, curve = memory_mib("VmRSS"), []
    train_seconds, began = 0.0, time.perf_counter()
    for it in range(1, args.iters + 1):
        idx = torch.from_numpy(rng.choice(len(images), args.batch_size, replace=False))
        x, y = images[idx], labels[idx]
        if rng.random() < 0.5:
            x, y = x.flip(-1), y.flip(-1)
        for group in opt.param_groups:
            group["lr"] = args.lr * (1 - (it - 1) / args.iters) ** 0.9
        model.train()
        loss = F.cross_entropy(model(x), y, ignore_index=IGNORE_INDEX)
        opt.zero_grad()
        loss.backward()
        opt.step()
        if it % args.val_every == 0 or it == args.iters:
            train_seconds += time.perf_counter() - began
            curve.append((it, evaluate(model, val_set).miou))
            began = time.perf_counter()
    peak = memory_mib("VmHWM")
    example = (torch.zeros(1, 3, args.size, args.size),)
    deploy = reparam.fuse(model.eval(), example)
    stats = reparam.count(deploy, example)
    return dict(recipe=recipe or "plain", seconds=train_seconds, peak=peak, rise=peak - start_rss,
                train_params=reparam.count(model).params, miou=curve[-1][1], deploy_miou=evaluate(deploy, val_set).miou,
                convs=stats.convs, bns=stats.bns, curve=curve)


def in_own_process(recipe, args) -> dict:
    ctx = multiprocessing.get_context("spawn")
    with concurrent.futures.ProcessPoolExecutor(1, mp_context=ctx) as pool:
        return pool.submit(run, recipe, args).result()


def train_table(args):
    print(f"PlainSeg (width {args.width}) from scratch on the demo dataset: {args.iters} iterations, batch "
          f"{args.batch_size}, {args.size}×{args.size}, lr {args.lr}, seed {args.seed}, {args.threads} thread(s)")
    rows = []
    for recipe in [None, *args.recipes]:
        rows.append(in_own_process(recipe, args))
        r = rows[-1]
        print(f"  {r['recipe']:<8} done in {r['seconds']:.0f} s", flush=True)
    print(f"\n| {'form':<8} | train s | s/iter | peak RSS MiB | rise MiB | train params | val mIoU % | "
          f"deploy mIoU % | deploy convs / BNs |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        same = (r["convs"], r["bns"]) == (rows[0]["convs"], rows[0]["bns"])
        print(f"| {r['recipe']:<8} | {r['seconds']:7.1f} | {r['seconds'] / args.iters:6.3f} | {r['peak']:12.0f} | "
              f"{r['rise']:8.0f} | {r['train_params']:12,} | {100 * r['miou']:10.2f} | {100 * r['deploy_miou']:13.2f} | "
              f"{r['convs']} / {r['bns']}{'' if same else '  (DIFFERS from plain)'} |")
    print("\nvalidation mIoU % during training:")
    for r in rows:
        print(f"  {r['recipe']:<8} " + ", ".join(f"{i}: {100 * m:.1f}" for i, m in r["curve"]))
    if args.plot:
        plot(rows, args)


def plot(rows, args):
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no plot")
        return
    fig, ax = plt.subplots(figsize=(6, 3.6))
    for r in rows:
        its, mious = zip(*r["curve"])
        ax.plot(its, [100 * m for m in mious], marker="o", label=r["recipe"])
    ax.set(xlabel="iteration", ylabel="validation mIoU %",
           title=f"PlainSeg on the demo dataset ({args.iters} iterations, seed {args.seed})")
    ax.grid(alpha=0.3)
    ax.legend()
    Path(args.plot).parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(args.plot, dpi=110)
    print(f"plot: {args.plot}")


def round_trip_table():
    """convs / BNs one forward runs: m, fuse(m), expand(m, recipe), fuse(expand(m, recipe)), and
    max rel err of expand(m) against m at expansion (BN statistics randomized, eval mode)."""
    import torchvision

    import gcnet

    torch.set_num_threads(1)
    models = {"resnet18": (lambda: torchvision.models.resnet18(weights=None), 224),
              "mobilenet_v2": (lambda: torchvision.models.mobilenet_v2(weights=None), 224),
              "gcnet_s": (lambda: gcnet.gcnet_s(), 256)}
    print("| model | recipe | pairs expanded | m | fuse(m) | expand(m) | fuse(expand(m)) | same kernels | "
          "rel err at expansion | fuse(expand(m)) vs expand(m) |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for name, (make, size) in models.items():
        torch.manual_seed(0)
        model = randomize_bn(make()).eval()
        x = torch.randn(1, 3, size, size)
        fused = reparam.fuse(model, (x,))
        base, kernels = reparam.count(fused, (x,)), conv_kernels(fused, x)
        plain = reparam.count(model, (x,))
        for recipe in RECIPES:
            expanded, report = reparam.expand_with_report(model, recipe, example_inputs=(x,))
            back = reparam.fuse(randomize_bn(expanded).eval(), (x,))
            after = reparam.count(back, (x,))
            with torch.no_grad():
                err = reparam.testing.rel_error(expanded(x), back(x))
            c = lambda s: f"{s.convs} / {s.bns}"
            print(f"| {name} | {recipe} | {len(report.expanded)} | {c(plain)} | {c(base)} | {c(report.after)} | "
                  f"{c(after)} | {conv_kernels(back, x) == kernels} | {report.max_rel_error:.1e} | {err:.1e} |",
                  flush=True)


@torch.no_grad()
def randomize_bn(model: nn.Module, seed: int = 0) -> nn.Module:
    """Random BN statistics and affines (a fresh BN is the identity in eval and hides mistakes)."""
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            c = m.num_features
            m.weight.copy_(torch.rand(c, generator=g) + 0.5)
            m.bias.copy_(torch.randn(c, generator=g) * 0.2)
            m.running_mean.copy_(torch.randn(c, generator=g) * 0.2)
            m.running_var.copy_(torch.rand(c, generator=g) + 0.5)
    return model


def conv_kernels(model, x) -> list:
    from torch.utils._python_dispatch import TorchDispatchMode

    class Convs(TorchDispatchMode):
        seen = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func._overloadpacket.__name__ == "convolution":
                self.seen.append((tuple(args[1].shape), *map(tuple, args[3:6]), args[8]))
            return func(*args, **(kwargs or {}))

    mode = Convs()
    mode.seen = []
    with torch.no_grad(), mode:
        model(x)
    return sorted(mode.seen)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--iters", type=int, default=600)
    p.add_argument("--size", type=int, default=64, help="demo pictures are SIZE×SIZE")
    p.add_argument("--width", type=int, default=16)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--train-images", type=int, default=1000)
    p.add_argument("--lr", type=float, default=0.05)
    p.add_argument("--val-every", type=int, default=100)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--recipes", nargs="+", default=RECIPES, choices=RECIPES)
    p.add_argument("--plot", nargs="?", const="docs/assets/expand_demo.png", default=None,
                   help="draw the mIoU curves into this file (default docs/assets/expand_demo.png)")
    p.add_argument("--fast", action="store_true", help="60 iterations on 200 pictures of 48×48")
    p.add_argument("--round-trip", action="store_true", help="only the op-count table for torchvision and GCNet-S")
    args = p.parse_args()
    if args.round_trip:
        return round_trip_table()
    if args.fast:
        args.iters, args.train_images, args.size, args.val_every = 60, 200, 48, 20
    train_table(args)


if __name__ == "__main__":
    main()
