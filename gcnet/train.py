"""`gcnet train`: GCNet with OHEM cross entropy, SGD + poly LR, periodic validation, atomic
checkpoints and exact resume; several GPUs through `torchrun` (DistributedDataParallel).

    path = train(make_config("demo"))                  # → runs/gcnet-demo/last.pt
    torchrun --nproc-per-node 4 -m gcnet train --dataset cityscapes --data-root data/cityscapes   # DDP, plain BN (voc: SyncBN)

Exact resume: the data a step sees is a function of (seed, sample number) alone (`TrainSamples`),
and a checkpoint holds everything else that changes during training (weights, BN statistics,
optimizer momenta, LR schedule, AMP scaler, global RNG states), so N iterations in one run and
N/2 + resume + N/2 give the same weights (bit for bit on CPU with deterministic kernels).
"""
from __future__ import annotations

import csv
import json
import math
import os
import random
import time
from dataclasses import asdict, replace
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from reparam.export import write_atomic

from .checkpoint import load as load_weights, read_object
from .errors import CheckpointError, ConfigError, TrainingDiverged
from .evaluate import evaluate
from .losses import GCNetLoss
from .model import FACTORIES, GCNet
from .presets import (PRESETS, TrainConfig, add_config_flags, config_from_dict, dataset_for, describe,
                      overrides_from_args, resolve)
from .transforms import train_transform

CHECKPOINT_FORMAT = "gcnet-train/1"


def build_model(variant: str, num_classes: int, n_paths: int = 2) -> GCNet:
    if variant not in FACTORIES:
        raise ValueError(f"unknown GCNet variant '{variant}'; choose from {sorted(FACTORIES)}")
    return FACTORIES[variant](num_classes=num_classes, n_paths=n_paths)


class TrainSamples(Dataset):
    """Sample number → augmented (image (3, h, w), label (h, w)) for one process.

    Process `rank` of `world_size` takes, at iteration t, the global samples
    (t · world_size + rank) · batch + j, j < batch. Global sample k is item perm_e[k mod n],
    e = k // n, of a permutation seeded by (seed, e), augmented by a generator seeded by
    (seed, k): the stream restarts anywhere without replaying what came before. (Resuming
    with another number of processes changes the order, not the recipe.)"""

    def __init__(self, dataset: Dataset, config: TrainConfig, batch: int, rank: int = 0, world_size: int = 1):
        self.dataset, self.config, self.batch = dataset, config, batch
        self.rank, self.world_size = rank, world_size
        self._epoch, self._order = -1, None

    def global_index(self, s: int) -> int:
        step, j = divmod(s, self.batch)
        return (step * self.world_size + self.rank) * self.batch + j

    def __getitem__(self, s: int):
        k = self.global_index(s)
        epoch, pos = divmod(k, len(self.dataset))
        if epoch != self._epoch:
            self._epoch = epoch
            self._order = np.random.default_rng([self.config.seed, 0, epoch]).permutation(len(self.dataset))
        image, label = self.dataset[int(self._order[pos])]
        c = self.config
        return train_transform(image, label, np.random.default_rng([c.seed, 1, k]), c.crop_size,
                               c.ratio_range, c.base_size, c.cat_max_ratio, c.photometric)


# --- checkpoints --------------------------------------------------------------------------

def save_atomic(obj, path: Path) -> None:
    """torch.save to a temporary file beside `path`, then rename: a crash mid-write never leaves
    a truncated checkpoint where a good one was."""
    write_atomic(path, True, lambda tmp: torch.save(obj, tmp))


def read_checkpoint(path) -> dict:
    """A checkpoint written by `train`, for resuming (weights_only: loading runs no code from the file)."""
    state = read_object(path)
    if not isinstance(state, dict) or "model" not in state or "config" not in state:
        raise CheckpointError(f"{path}: not a gcnet train checkpoint (no 'model' and 'config' entries); "
                              "--resume continues a gcnet train run, --init-from starts from any weights")
    return state


def inference_meta(config: TrainConfig, model: GCNet, classes, palette) -> dict:
    """What inference needs besides weights, in the metadata layout of `gcnet.checkpoint`
    (string values, `variant`, `config` = the GCNetConfig as JSON), so `gcnet.checkpoint.load`
    reads a training checkpoint like any converted weights file (see `evaluate.load_for_inference`)."""
    return {"variant": config.variant, "config": json.dumps(asdict(model.config)),
            "classes": json.dumps(list(classes)), "palette": json.dumps(np.asarray(palette).tolist()),
            "train_config": json.dumps(config.to_dict())}


def _rng_state() -> dict:
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    return {"torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
            "numpy": {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": pos,
                      "has_gauss": has_gauss, "gauss": gauss},
            "python": random.getstate()}


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    n = state["numpy"]
    np.random.set_state((n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"]))
    random.setstate(state["python"])


def load_matching(model: nn.Module, state_dict: dict) -> list[str]:
    """Load the entries whose names and shapes match; return the names left out (e.g. a
    classifier trained for another number of classes)."""
    own = model.state_dict()
    usable = {k: v for k, v in state_dict.items() if k in own and own[k].shape == v.shape}
    model.load_state_dict(usable, strict=False)
    return sorted(set(own) - set(usable))


# --- the loop -----------------------------------------------------------------------------

class CsvLog:
    """Rows of training and validation numbers in `<out_dir>/log.csv`, appended across resumes.

    Rows past iteration `start` are dropped when the log is opened: a run resumed from an
    earlier checkpoint replays those iterations and logs them again, once."""
    FIELDS = ("iteration", "loss", "main_loss", "aux_loss", "lr", "images_per_s", "eta_s", "val_miou", "val_acc")

    def __init__(self, path: Path, start: int = 0):
        self.path = path
        rows = []
        if path.exists():
            with path.open(newline="") as f:
                rows = [r for r in csv.DictReader(f) if r.get("iteration", "").isdigit() and int(r["iteration"]) <= start]

        def write(tmp):
            with open(tmp, "w", newline="") as f:
                writer = csv.DictWriter(f, self.FIELDS, extrasaction="ignore")
                writer.writeheader()
                writer.writerows(rows)

        write_atomic(path, True, write)

    def write(self, **row) -> None:
        with self.path.open("a", newline="") as f:
            csv.DictWriter(f, self.FIELDS).writerow(row)


def remove_stale_temp_files(checkpoint: Path) -> list[Path]:
    """Delete the temp files that killed writes of `checkpoint` left (`write_atomic` names them
    `.<name>.<pid>.tmp<suffix>`), unless their process still runs; returns the paths removed."""
    removed = []
    for tmp in checkpoint.parent.glob(f".{checkpoint.name}.*.tmp*"):
        pid = tmp.name[len(checkpoint.name) + 2:].split(".", 1)[0]
        if pid.isdigit() and int(pid) != os.getpid() and _running(int(pid)):
            continue
        tmp.unlink(missing_ok=True)
        removed.append(tmp)
    return removed


def _running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def _init_distributed() -> tuple[int, int, int]:
    """(rank, world size, local rank) from torchrun's environment; (0, 1, 0) without it."""
    world = int(os.environ.get("WORLD_SIZE", 1))
    if world == 1:
        return 0, 1, 0
    dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    local = int(os.environ.get("LOCAL_RANK", 0))
    if torch.cuda.is_available():
        torch.cuda.set_device(local)
    return dist.get_rank(), world, local


def _device(config: TrainConfig, local_rank: int) -> torch.device:
    if config.device:
        return torch.device(config.device)
    return torch.device("cuda", local_rank) if torch.cuda.is_available() else torch.device("cpu")


def train(config: TrainConfig, resume=None) -> Path:
    """Train per `config`; returns the path of the last checkpoint (`<out_dir>/last.pt`, for
    resuming); `<out_dir>/best.pt` holds the weights with the best validation mIoU.

    resume: a checkpoint to continue from (its iteration, weights, optimizer, schedule and RNG
    states); `config` should be the checkpoint's own (see `config_for_resume`)."""
    rank, world, local_rank = _init_distributed()
    deterministic = torch.are_deterministic_algorithms_enabled()
    try:
        if config.deterministic and not deterministic:
            torch.use_deterministic_algorithms(True)
        return _train(config, resume, rank, world, _device(config, local_rank))
    finally:
        if config.deterministic and not deterministic:  # a library call leaves global state as it was
            torch.use_deterministic_algorithms(False)
        if world > 1:
            dist.destroy_process_group()


def criterion_for(config: TrainConfig) -> GCNetLoss:
    """The recipe's loss: OHEM (threshold, min_kept per call, class weights) on both heads."""
    return GCNetLoss(config.ohem_thresh, config.min_kept, config.aux_weight, class_weight=config.class_weight)


def with_sync_bn(model: nn.Module, world: int, device: torch.device) -> nn.Module:
    """SyncBN (BN statistics over the whole batch, not each GPU's share) when `world` > 1; the
    recipe's `sync_bn` decides (the release: VOC only). torch's SyncBatchNorm runs on CUDA only:
    other devices keep per-process BN."""
    if world == 1:
        return model
    if device.type != "cuda":
        tqdm.write(f"{world} processes on {device.type}: SyncBN needs CUDA, each process keeps its own BN statistics")
        return model
    return nn.SyncBatchNorm.convert_sync_batchnorm(model)


def _train(config: TrainConfig, resume, rank: int, world: int, device: torch.device) -> Path:
    if config.init_required and not config.init_from and resume is None:
        raise ConfigError(f"the release fine-tunes {config.dataset} from Cityscapes weights: pass --init-from "
                          "CHECKPOINT (the release's Cityscapes .pth, or best.pt of a gcnet cityscapes run), or "
                          "--no-init-required to train from random weights on purpose")
    out = Path(config.out_dir)
    last = out / "last.pt"
    if resume is None and last.exists() and not config.overwrite:
        raise FileExistsError(f"{last} exists: pass --resume to continue that run, --overwrite to "
                              f"start over in {out}, or another --out-dir")
    if config.batch_size % world:
        raise ConfigError(f"--batch-size {config.batch_size} does not split over {world} processes")
    # read first: a bad file fails before any data is touched
    init = load_weights(config.init_from, variant=config.variant) if config.init_from and resume is None else None
    torch.manual_seed(config.seed)  # the same initial weights on every rank and every run

    train_set = dataset_for(config, config.train_splits)
    val_set = dataset_for(config, config.val_split)
    classes, palette = train_set.classes, train_set.palette
    model = build_model(config.variant, len(classes), config.n_paths)
    if init is not None:
        skipped = load_matching(model, init.state_dict())
        if rank == 0 and skipped:
            tqdm.write(f"init_from {config.init_from}: kept the initial {len(skipped)} tensors that do not "
                       f"match in name or shape: {', '.join(skipped[:4])}{' ...' if len(skipped) > 4 else ''}")
    if config.class_weight is not None and len(config.class_weight) != len(classes):
        raise ConfigError(f"--class-weight has {len(config.class_weight)} values but {config.dataset} has "
                          f"{len(classes)} classes")
    model = with_sync_bn(model.to(device), world if config.sync_bn else 1, device)
    net = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None) \
        if world > 1 else model

    optimizer = torch.optim.SGD(model.parameters(), lr=config.lr, momentum=config.momentum,
                                weight_decay=config.weight_decay)
    scheduler = torch.optim.lr_scheduler.PolynomialLR(optimizer, total_iters=config.iters, power=config.poly_power)
    scaler = torch.amp.GradScaler(device.type, enabled=config.amp and device.type == "cuda")
    criterion = criterion_for(config).to(device)
    start, best = 0, -1.0
    if resume is not None:
        state = read_checkpoint(resume)
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        scaler.load_state_dict(state["scaler"])
        start, best = state["iteration"], state["best_miou"]
        _set_rng_state(state["rng"])

    def checkpoint(iteration: int) -> dict:
        return {"format": CHECKPOINT_FORMAT, "model": model.state_dict(), "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(), "scaler": scaler.state_dict(), "iteration": iteration,
                "best_miou": best, "rng": _rng_state(), "config": config.to_dict(),
                "meta": inference_meta(config, model, classes, palette)}

    batch = config.batch_size // world
    end = min(config.iters, config.stop_at or config.iters)
    loader = DataLoader(TrainSamples(train_set, config, batch, rank, world), batch_size=batch,
                        sampler=range(start * batch, end * batch), num_workers=config.workers,
                        pin_memory=device.type == "cuda")
    if rank == 0:
        out.mkdir(parents=True, exist_ok=True)
        for stale in remove_stale_temp_files(last) + remove_stale_temp_files(out / "best.pt"):
            tqdm.write(f"removed {stale}: a checkpoint write that was killed")
    log = CsvLog(out / "log.csv", start) if rank == 0 else None
    # disable=None: tqdm turns itself off where stderr is not a terminal (no bar flooding a redirected log)
    bar = tqdm(total=config.iters, initial=start, desc="train", dynamic_ncols=True,
               disable=True if rank != 0 or not config.progress else None)
    window = {"loss": 0.0, "main": 0.0, "aux": 0.0, "n": 0, "t": time.perf_counter()}
    net.train()
    for it, (images, labels) in enumerate(loader, start=start + 1):
        images = images.to(device, non_blocking=True)
        labels = labels.to(device, non_blocking=True)
        with torch.autocast(device.type, dtype=torch.float16 if device.type == "cuda" else torch.bfloat16,
                            enabled=config.amp):
            outputs = net(images)
        loss, main, aux = criterion(outputs, labels)  # in float32: the criterion casts
        if not _finite_everywhere(loss, world):  # before the step: the weights stay as they were
            raise TrainingDiverged(f"the loss is {loss.item():g} at iteration {it} (main {main.item():g}, aux "
                                   f"{aux.item():g}): training diverged; last good checkpoint: "
                                   f"{last if last.exists() else 'none yet'}. Lower --lr, or check the data")
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        scheduler.step()
        bar.update(1)
        for key, value in (("loss", loss), ("main", main), ("aux", aux)):
            window[key] += value.detach()
        window["n"] += 1

        if it % config.log_every == 0 or it == end:
            _log_train(window, it, config, optimizer, log, bar)
        if (config.val_every and it % config.val_every == 0) or it == config.iters:
            started = time.perf_counter()
            miou = _validate(model, val_set, config, device, rank, world, it, log)
            window["t"] += time.perf_counter() - started  # throughput and ETA count training only
            if miou > best:
                best = miou
                if rank == 0:  # weights for eval/predict only: resume from last.pt
                    save_atomic({"model": model.state_dict(), "iteration": it, "miou": miou,
                                 "meta": inference_meta(config, model, classes, palette)}, out / "best.pt")
            net.train()
        if rank == 0 and (it % config.ckpt_every == 0 or it == end):
            save_atomic(checkpoint(it), last)
    bar.close()
    if start >= end and rank == 0:
        tqdm.write(f"nothing to do: {resume} is at iteration {start} of {config.iters}")
    return last


def _finite_everywhere(loss: torch.Tensor, world: int) -> bool:
    """Whether the loss is finite on every process (all of them stop together, none hangs)."""
    finite = torch.isfinite(loss.detach()).float()
    if world > 1:
        dist.all_reduce(finite, op=dist.ReduceOp.MIN)
    return bool(finite)


def _log_train(window: dict, it: int, config: TrainConfig, optimizer, log: CsvLog | None, bar) -> None:
    """One line and one CSV row of the window's mean losses, LR, throughput and ETA; resets the window."""
    n, now = window["n"], time.perf_counter()
    seconds = now - window["t"]
    loss, main, aux = (float(window[k]) / n for k in ("loss", "main", "aux"))
    lr = optimizer.param_groups[0]["lr"]
    speed = n * config.batch_size / seconds
    eta = (config.iters - it) * seconds / n
    window.update(loss=0.0, main=0.0, aux=0.0, n=0, t=now)
    if log is None:
        return
    bar.set_postfix(loss=f"{loss:.3f}", lr=f"{lr:.2e}")
    bar.write(f"iter {it}/{config.iters}  loss {loss:.4f} (main {main:.4f}, aux {aux:.4f})  lr {lr:.3e}  "
              f"{speed:.1f} img/s  eta {_hms(eta)}")
    log.write(iteration=it, loss=f"{loss:.6f}", main_loss=f"{main:.6f}", aux_loss=f"{aux:.6f}", lr=f"{lr:.6e}",
              images_per_s=f"{speed:.2f}", eta_s=f"{eta:.0f}")


def _validate(model, val_set, config, device, rank, world, it, log) -> float:
    result = evaluate(model, val_set, eval_size=config.eval_size, device=device, rank=rank, world_size=world)
    if log is not None:
        tqdm.write(f"iter {it}: {config.val_split} mIoU {100 * result.miou:.2f}  pixel acc {100 * result.accuracy:.2f}")
        log.write(iteration=it, val_miou=f"{result.miou:.6f}", val_acc=f"{result.accuracy:.6f}")
    return result.miou


def _hms(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "?"
    s = int(seconds)
    return f"{s // 3600}:{s // 60 % 60:02d}:{s % 60:02d}"


# --- command line -------------------------------------------------------------------------

def config_for_args(args) -> tuple[TrainConfig, Path | None, dict[str, str]]:
    """(config, checkpoint to resume or None, where each value came from) from `gcnet train`'s
    arguments. A resumed run starts from the checkpoint's own config; flags and a config file
    still override it (`stop_at` is cleared, or the run would stop where it paused)."""
    overrides = overrides_from_args(args)
    config, sources = resolve(overrides.get("dataset", "demo"), args.config, overrides)
    if args.resume is None:
        return config, None, sources
    resume = Path(config.out_dir) / "last.pt" if args.resume == "auto" else Path(args.resume)
    saved = config_from_dict(read_checkpoint(resume)["config"])
    config, sources = resolve(replace(saved, stop_at=None), args.config, overrides, origin=f"checkpoint {resume}")
    return config, resume, sources


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "train", help="train GCNet on a segmentation dataset",
        description="Train GCNet. Recipes: " + ", ".join(sorted(PRESETS)) + " (--dataset picks the "
        "preset of the same name). Override any field with a flag or a JSON/TOML --config file.")
    p.add_argument("--config", help="JSON or TOML file of recipe overrides (keys as the flags, with _)")
    p.add_argument("--resume", nargs="?", const="auto", metavar="CHECKPOINT",
                   help="continue a run exactly (default checkpoint: <out-dir>/last.pt)")
    p.add_argument("--print-config", action="store_true",
                   help="print the resolved recipe (each value and where it came from) and exit")
    add_config_flags(p)
    p.set_defaults(func=main)


def main(args) -> int:
    config, resume, sources = config_for_args(args)
    rank0 = int(os.environ.get("RANK", 0)) == 0
    if rank0 or args.print_config:
        print(describe(config, sources) + (f"\nresuming {resume}" if resume else ""), flush=True)
    if args.print_config:
        return 0
    last = train(config, resume)
    if rank0:
        print(last)
    return 0
