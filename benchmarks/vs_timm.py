"""`reparam.fuse` against timm's hand-written converter, `timm.utils.model.reparameterize_model`.

    python benchmarks/vs_timm.py                  # the re-parameterizable families, 64×64
    python benchmarks/vs_timm.py --all            # plus timm's conv/linear-BN `fuse()` families
    python benchmarks/vs_timm.py repvgg_a0 --size 224 --threads 2

For each model (smallest variant, random weights, BatchNorm statistics randomized so no BN is
the identity, never pretrained): convs/BNs one forward runs after timm's converter and after
`reparam.fuse` on the training form, the max relative error of each against the original,
the latency ratio of the two deploy models (ours / timm's: in each of several rounds both are
timed, one after the other, in one process; the median over rounds of the per-round ratio, and
its quartiles, which show how much a shared machine's load moves it), and the median fusion time
of each.
`reparam.fuse` is given example inputs, as documented; its time includes the counting and
checking forwards it then runs for its report."""
from __future__ import annotations

import argparse
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from statistics import median, quantiles

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repo root, for `examples`

import reparam  # noqa: E402
from examples.blocks import randomize_norms  # noqa: E402
from reparam.stats import latency  # noqa: E402
from reparam.testing import model_rel_error  # noqa: E402

# (family, smallest variant, create_model kwargs): families whose blocks timm re-parameterizes
# (`reparameterize` / `switch_to_deploy`), then those it only conv-BN / linear-BN fuses (`fuse()`).
REPARAM_FAMILIES = [
    ("RepVGG", "repvgg_a0", {}),
    ("MobileOne", "mobileone_s0", {}),
    ("FastViT", "fastvit_t8", {}),
    ("RepGhostNet", "repghostnet_050", {}),
    ("RepViT", "repvit_m0_9", {}),
    ("GhostNetV3", "ghostnetv3_050", {}),
    ("PP-LCNetV2", "lcnetv2_small", {}),
    ("Next-ViT", "nextvit_small", {}),
]
FUSE_FAMILIES = [
    ("LeViT", "levit_128s", {"img_size": 64}),
    ("EfficientViT-MSRA", "efficientvit_m0", {"img_size": 64}),
    ("SHViT", "shvit_s1", {}),
    ("TinyViT", "tiny_vit_5m_224", {}),
    ("iFormer", "iformer_t", {}),
    ("EfficientViM", "efficientvim_m1", {}),
]
FAMILIES = REPARAM_FAMILIES + FUSE_FAMILIES


def build(name: str, kwargs: dict, size: int = 64, seed: int = 0):
    """(eval-mode training-form model with random BN statistics, input (1, 3, size, size))."""
    import timm
    torch.manual_seed(seed)
    model = timm.create_model(name, pretrained=False, num_classes=10, **kwargs)
    x = torch.randn(1, 3, size, size, generator=torch.Generator().manual_seed(seed))
    return randomize_norms(model, seed).eval(), x


def timm_deploy(model):
    from timm.utils.model import reparameterize_model
    return reparameterize_model(model)


@dataclass
class Row:
    family: str
    model: str
    timm: reparam.Stats
    ours: reparam.Stats
    err_timm: float
    err_ours: float
    latency_ratio: float                 # median over rounds of (ours / timm's) medians
    ratio_iqr: tuple[float, float]       # its quartiles: how much the machine's load moved it
    latency_timm: float
    fuse_timm: float
    fuse_ours: float


def _timed(fn, repeats: int):
    times, out = [], None
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t0)
    return out, median(times)


@torch.no_grad()
def compare(family: str, name: str, kwargs: dict, *, size: int, fuse_repeats: int, rounds: int,
            repeats: int) -> Row:
    model, x = build(name, kwargs, size)
    theirs, t_timm = _timed(lambda: timm_deploy(model), fuse_repeats)
    ours, t_ours = _timed(lambda: reparam.fuse(model, (x,)), fuse_repeats)
    lat_timm, ratios = [], []
    for _ in range(rounds):  # alternate, so that a change in machine load hits both alike
        lt = latency(theirs, (x,), warmup=1, repeats=repeats)[0]
        lo = latency(ours, (x,), warmup=1, repeats=repeats)[0]
        lat_timm.append(lt)
        ratios.append(lo / lt)
    q = quantiles(ratios, n=4)
    return Row(family, name, reparam.count(theirs, (x,)), reparam.count(ours, (x,)),
               model_rel_error(model, theirs, x), model_rel_error(model, ours, x),
               median(ratios), (q[0], q[2]), median(lat_timm), t_timm, t_ours)


def table(rows: list[Row]) -> str:
    head = ("| family | model | convs/BNs timm | convs/BNs reparam | max rel err timm | "
            "max rel err reparam | latency ours/timm (quartiles) | timm latency | fusion time timm | "
            "fusion time reparam |")
    lines = [head, "|" + "---|" * head.count(" | ") + "---|"]
    for r in rows:
        lines.append(f"| {r.family} | {r.model} | {r.timm.convs}/{r.timm.bns} | {r.ours.convs}/{r.ours.bns} | "
                     f"{r.err_timm:.1e} | {r.err_ours:.1e} | {r.latency_ratio:.3f} "
                     f"({r.ratio_iqr[0]:.2f}–{r.ratio_iqr[1]:.2f}) | "
                     f"{r.latency_timm * 1e3:.2f} ms | {r.fuse_timm:.2f} s | {r.fuse_ours:.2f} s |")
    return "\n".join(lines)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("models", nargs="*", help="timm model names (default: one per family)")
    p.add_argument("--all", action="store_true", help="include timm's conv/linear-BN fuse() families")
    p.add_argument("--size", type=int, default=64, help="input height and width")
    p.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    p.add_argument("--fuse-repeats", type=int, default=3)
    p.add_argument("--rounds", type=int, default=15, help="alternating latency rounds per model")
    p.add_argument("--repeats", type=int, default=4, help="timed forwards per round (median taken)")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    families = FAMILIES if args.all else REPARAM_FAMILIES
    if args.models:
        known = {name: (fam, kw) for fam, name, kw in FAMILIES}
        families = [(known.get(n, ("?", {}))[0], n, known.get(n, ("?", {}))[1]) for n in args.models]
    rows = []
    for family, name, kwargs in families:
        row = compare(family, name, kwargs, size=args.size, fuse_repeats=args.fuse_repeats,
                      rounds=args.rounds, repeats=args.repeats)
        print(f"{name}: done", file=sys.stderr, flush=True)
        rows.append(row)
    print(f"input 1×3×{args.size}×{args.size} float32, CPU, {args.threads} thread(s); "
          f"medians: fusion over {args.fuse_repeats} runs; latency ratio over {args.rounds} "
          f"alternating rounds, each the ratio of medians of {args.repeats} forwards")
    print(table(rows))


if __name__ == "__main__":
    main()
