"""GCNet-S from scratch on the generated demo dataset, on the CPU: mIoU reached, wall time,
and the mIoU of the `reparam.fuse`d model (which must be the same).

    python benchmarks/gcnet_demo_train.py                 # about 10 minutes on 2 cores
    python benchmarks/gcnet_demo_train.py --iters 100     # a quicker look

Trains with the demo recipe (`gcnet.presets.PRESETS["demo"]`, overridable below) through
`gcnet.train.train`, so the numbers are what `gcnet train --dataset demo` does. The learning
curve is the validation mIoU the run logged every `--val-every` iterations.
"""
from __future__ import annotations

import argparse
import csv
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from gcnet.evaluate import evaluate, load_for_inference  # noqa: E402
from gcnet.presets import dataset_for, make_config  # noqa: E402
from gcnet.train import train  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--iters", type=int, default=360)
    p.add_argument("--size", type=int, default=64, help="demo pictures and crops are SIZE×SIZE")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--lr", type=float, default=0.05)
    p.add_argument("--val-every", type=int, default=120)
    p.add_argument("--threads", type=int, default=1,
                   help="torch CPU threads; on a shared 2-core machine one thread is several times "
                        "faster than two, which spend their time waiting for each other")
    p.add_argument("--out-dir", help="where the run goes (default: a temporary directory)")
    args = p.parse_args()
    torch.set_num_threads(args.threads)

    out = Path(args.out_dir or tempfile.mkdtemp(prefix="gcnet-demo-"))
    config = make_config("demo", overrides=dict(
        iters=args.iters, crop_size=(args.size, args.size), batch_size=args.batch_size, lr=args.lr,
        min_kept=args.batch_size * args.size * args.size // 8, val_every=args.val_every, ckpt_every=args.iters,
        log_every=max(1, args.iters // 12), out_dir=str(out), overwrite=True, progress=False))
    print(f"GCNet-S from scratch on the demo dataset: {args.iters} iterations, batch {args.batch_size}, "
          f"{args.size}×{args.size}, lr {args.lr}, {args.threads} thread(s), run in {out}")

    start = began = time.perf_counter()
    checkpoint = train(config)
    train_seconds = time.perf_counter() - start

    val = dataset_for(config, config.val_split)
    model, _ = load_for_inference(checkpoint)
    start = time.perf_counter()
    fused, _ = load_for_inference(checkpoint, deploy_form=True)
    fuse_seconds = time.perf_counter() - start
    trained, deployed = evaluate(model, val), evaluate(fused, val)

    with open(out / "log.csv") as f:
        curve = [(int(r["iteration"]), float(r["val_miou"])) for r in csv.DictReader(f) if r["val_miou"]]
    print("\nvalidation mIoU during training: " + ", ".join(f"iter {i}: {100 * m:.1f}" for i, m in curve))
    print(f"\n{trained.table()}\n")
    print(f"mIoU (training form): {100 * trained.miou:.2f}  on {len(val)} validation pictures")
    print(f"mIoU (reparam.fuse):  {100 * deployed.miou:.2f}  "
          f"({'identical' if torch.equal(trained.confusion, deployed.confusion) else 'DIFFERENT'} confusion matrix)")
    print(f"training wall time:   {train_seconds:.0f} s ({train_seconds / args.iters:.2f} s/iteration, "
          f"validation included); fusing: {fuse_seconds:.1f} s; all: {time.perf_counter() - began:.0f} s")


if __name__ == "__main__":
    main()
