"""Training recipes: one `TrainConfig` dataclass, presets that match GCNET.md, and overrides.

Precedence: preset < config file (JSON or TOML, keys = field names) < command-line flags.
Every TrainConfig is checked when it is made (`ConfigError` naming the flag), so no run starts
with a value that cannot work; `resolve` also says where each value came from.

    config = make_config("cityscapes", file="my.toml", overrides={"iters": 1000})
"""
from __future__ import annotations

import argparse
import json
import tomllib
import types
import typing
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path

from torch.utils.data import Dataset

from .config import N_PATHS_HELP
from .datasets import DATASETS, build_dataset
from .errors import ConfigError


@dataclass(frozen=True)
class TrainConfig:
    """Everything one training run depends on; saved in every checkpoint."""
    dataset: str = "demo"                     # a key of gcnet.datasets.DATASETS
    data_root: str | None = None
    train_splits: tuple[str, ...] = ("train",)
    val_split: str = "val"
    num_classes: int | None = None            # folder datasets without a classes.txt
    variant: str = "s"                        # GCNet-S/M/L
    n_paths: int = 2                          # Path3x3_1x1 per GCBlock (N_PATHS_HELP: which N reaches which mIoU)
    init_from: str | None = None              # checkpoint to start from (CamVid, VOC: Cityscapes weights)
    init_required: bool = False               # refuse to start from random weights (CamVid, VOC)
    crop_size: tuple[int, int] = (1024, 1024)  # (h, w)
    cat_max_ratio: float = 0.75               # RandomCrop: re-draw while one class covers this much
    photometric: bool = True                  # PhotoMetricDistortion
    base_size: tuple[int, int] | None = None  # (long, short) the random rescale multiplies; None: image size
    ratio_range: tuple[float, float] = (0.5, 2.0)
    eval_size: tuple[int, int] | None = None  # (long, short) keep-ratio resize for inference; None: as is
    batch_size: int = 12                      # in total, over all processes
    iters: int = 120_000
    lr: float = 0.01
    momentum: float = 0.9
    weight_decay: float = 5e-4
    poly_power: float = 0.9
    ohem_thresh: float = 0.9
    min_kept: int = 131_072                   # per loss call: all images of one process's batch
    class_weight: tuple[float, ...] | None = None  # per class, for both losses (Cityscapes: the release's)
    aux_weight: float = 0.4
    amp: bool = False
    sync_bn: bool = False                     # with several GPUs: BN statistics over all of them (SyncBN)
    workers: int = 4                          # data-loading processes per training process
    seed: int = 0
    deterministic: bool = False               # torch.use_deterministic_algorithms (slower on GPU)
    log_every: int = 50
    val_every: int = 0                        # 0: validate once, at the end
    ckpt_every: int = 1000
    out_dir: str = "runs/gcnet"
    stop_at: int | None = None                # pause after this iteration (checkpoint saved); --resume later
    overwrite: bool = False                   # start afresh in an out_dir that holds a run
    progress: bool = True                     # tqdm progress bar
    device: str | None = None                 # None: cuda when available, else cpu

    def __post_init__(self):
        for name, ok, requirement in _RULES:
            value = getattr(self, name)
            if not ok(value):
                shown = " ".join(map(str, value)) if isinstance(value, tuple) else value
                raise ConfigError(f"--{name.replace('_', '-')} must be {requirement}, got {shown}")

    def to_dict(self) -> dict:
        return asdict(self)


def _sizes(n: int, optional: bool = False):
    return lambda v: (optional and v is None) or (isinstance(v, tuple) and len(v) == n and all(x >= 1 for x in v))


_RULES = (  # (field, test, what the flag must be)
    ("dataset", lambda v: v in DATASETS, f"one of {', '.join(sorted(DATASETS))}"),
    ("train_splits", lambda v: len(v) >= 1, "at least one split"),
    ("num_classes", lambda v: v is None or v >= 1, "at least 1"),
    ("variant", lambda v: v in ("s", "m", "l"), "s, m or l"),
    ("n_paths", lambda v: v >= 1, "at least 1"),
    ("crop_size", _sizes(2), "two sizes of at least 1 (H W)"),
    ("cat_max_ratio", lambda v: 0 < v <= 1, "in (0, 1] (1: no re-draw)"),
    ("base_size", _sizes(2, optional=True), "two sizes of at least 1 (LONG SHORT)"),
    ("ratio_range", lambda v: len(v) == 2 and 0 < v[0] <= v[1], "LOW HIGH with 0 < LOW <= HIGH"),
    ("eval_size", _sizes(2, optional=True), "two sizes of at least 1 (LONG SHORT)"),
    ("batch_size", lambda v: v >= 1, "at least 1"),
    ("iters", lambda v: v >= 1, "at least 1"),
    ("lr", lambda v: v > 0, "positive"),
    ("momentum", lambda v: 0 <= v < 1, "in [0, 1)"),
    ("weight_decay", lambda v: v >= 0, "0 or more"),
    ("poly_power", lambda v: v >= 0, "0 or more"),
    ("ohem_thresh", lambda v: 0 < v <= 1, "in (0, 1]"),
    ("min_kept", lambda v: v >= 0, "0 or more"),
    ("class_weight", lambda v: v is None or (len(v) >= 1 and min(v) >= 0), "one weight of 0 or more per class"),
    ("aux_weight", lambda v: v >= 0, "0 or more"),
    ("workers", lambda v: v >= 0, "0 or more"),
    ("seed", lambda v: v >= 0, "0 or more"),
    ("log_every", lambda v: v >= 1, "at least 1"),
    ("val_every", lambda v: v >= 0, "0 (validate at the end only) or more"),
    ("ckpt_every", lambda v: v >= 1, "at least 1"),
    ("stop_at", lambda v: v is None or v >= 1, "at least 1"),
)


# The release's Cityscapes configs weight the 19 trainIds in both losses (GCNET.md).
CITYSCAPES_CLASS_WEIGHT = (0.8373, 0.918, 0.866, 1.0345, 1.0166, 0.9969, 0.9754, 1.0489, 0.8786, 1.0023,
                           0.9539, 0.9843, 1.1116, 0.9037, 1.0865, 1.0955, 1.0865, 1.1529, 1.0507)

# BN as each release config's norm_cfg: plain BN (per-GPU statistics) for Cityscapes and CamVid,
# SyncBN for VOC only.
PRESETS = {
    "cityscapes": TrainConfig(dataset="cityscapes", crop_size=(1024, 1024), base_size=(2048, 1024),
                              batch_size=12, iters=120_000, lr=0.01, class_weight=CITYSCAPES_CLASS_WEIGHT,
                              out_dir="runs/gcnet-cityscapes"),
    # CamVid as the release's config: train/ only (the paper says train+val), test/ for evaluation,
    # fine-tuned from Cityscapes weights. Its crop_size = (960, 720) is (H, W) in mmseg: 960-high,
    # 720-wide crops of the 720×960 frames (the paper's text says 720×960).
    "camvid": TrainConfig(dataset="camvid", train_splits=("train",), val_split="test",
                          crop_size=(960, 720), base_size=(960, 720), batch_size=12, iters=7_800,
                          lr=0.001, init_required=True, out_dir="runs/gcnet-camvid"),
    "voc": TrainConfig(dataset="voc", crop_size=(512, 512), base_size=(2048, 512),
                       eval_size=(2048, 512), batch_size=16, iters=24_400, lr=0.001, init_required=True,
                       sync_bn=True, out_dir="runs/gcnet-voc"),
    # min_kept per batch of 8 (the 32,768 per image it was before counting per call)
    "folder": TrainConfig(dataset="folder", crop_size=(512, 512), batch_size=8, iters=20_000,
                          lr=0.01, min_kept=262_144, out_dir="runs/gcnet-folder"),
    # Small enough for a CPU: 128×128 pictures, min_kept 1/8 of a batch's pixels; no photometric
    # distortion: the demo's classes differ by hue.
    "demo": TrainConfig(dataset="demo", crop_size=(128, 128), batch_size=8, iters=300, lr=0.05,
                        min_kept=16_384, photometric=False, workers=0, log_every=20, val_every=100,
                        ckpt_every=100, out_dir="runs/gcnet-demo"),
}


def _hints() -> dict[str, typing.Any]:
    return typing.get_type_hints(TrainConfig)


def _base_type(hint):
    """`X | None` → X."""
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        return next(a for a in typing.get_args(hint) if a is not type(None))
    return hint


def coerce(name: str, value):
    """A config value from a file or the command line, converted to the field's type."""
    hints = _hints()
    if name not in hints:
        raise ConfigError(f"unknown config key '{name}'; known keys: {', '.join(sorted(hints))}")
    if value is None:
        return None
    kind = _base_type(hints[name])
    try:
        if typing.get_origin(kind) is tuple:
            item = typing.get_args(kind)[0]
            return tuple(item(v) for v in ([value] if isinstance(value, str) else value))
        if kind is bool and not isinstance(value, bool):
            raise ValueError
        return kind(value)
    except (TypeError, ValueError):
        raise ConfigError(f"{name}: {value!r} is not a {getattr(kind, '__name__', kind)}") from None


def read_config_file(path) -> dict:
    """Overrides from a .json or .toml file whose keys are TrainConfig field names."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"missing config file: {path}")
    try:
        text = path.read_text()
        data = tomllib.loads(text) if path.suffix == ".toml" else json.loads(text)
    except (OSError, UnicodeDecodeError, ValueError) as e:  # TOMLDecodeError, JSONDecodeError are ValueErrors
        raise ConfigError(f"config file {path}: {e}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path}: expected a table of recipe keys, found {type(data).__name__}")
    return {k: coerce(k, v) for k, v in data.items()}


def make_config(preset: str | TrainConfig = "demo", file=None, overrides: dict | None = None) -> TrainConfig:
    """A preset (by name, or a whole config such as a checkpoint's) with a file's and then
    explicit overrides applied."""
    return resolve(preset, file, overrides)[0]


def resolve(preset: str | TrainConfig = "demo", file=None, overrides: dict | None = None,
            origin: str | None = None) -> tuple[TrainConfig, dict[str, str]]:
    """`make_config`, and where each field's value came from: "preset NAME" (or `origin`, for
    a whole config such as a checkpoint's), "config file PATH" or "flag --NAME"."""
    if isinstance(preset, str):
        if preset not in PRESETS:
            raise ConfigError(f"unknown preset '{preset}'; choose from {sorted(PRESETS)}")
        origin, preset = origin or f"preset {preset}", PRESETS[preset]
    sources = {f.name: origin or "given config" for f in fields(TrainConfig)}
    values = read_config_file(file) if file else {}
    sources.update({k: f"config file {file}" for k in values})
    flags = {k: coerce(k, v) for k, v in (overrides or {}).items()}
    sources.update({k: f"flag --{k.replace('_', '-')}" for k in flags})
    return replace(preset, **{**values, **flags}), sources


def describe(config: TrainConfig, sources: dict[str, str]) -> str:
    """The resolved recipe, one field a line: name, value, where it came from."""
    width = max(len(f.name) for f in fields(TrainConfig))
    values = {f.name: getattr(config, f.name) for f in fields(TrainConfig)}
    shown = {k: " ".join(map(str, v)) if isinstance(v, tuple) else str(v) for k, v in values.items()}
    value_width = min(max(len(v) for v in shown.values()), 24)
    return "recipe (preset < config file < flags):\n" + "\n".join(
        f"  {k:<{width}}  {v:<{value_width}}  {sources[k]}" for k, v in shown.items())


def config_from_dict(data: dict) -> TrainConfig:
    """The inverse of `TrainConfig.to_dict` (checkpoints store lists where tuples were)."""
    known = {f.name for f in fields(TrainConfig)}
    return TrainConfig(**{k: coerce(k, v) for k, v in data.items() if k in known})


FLAG_HELP = {"n_paths": N_PATHS_HELP}  # the flags whose value a user must choose knowingly


def add_config_flags(parser: argparse.ArgumentParser) -> None:
    """One `--flag` per TrainConfig field. Unset flags stay out of the namespace, so they never
    override a preset or config file."""
    group = parser.add_argument_group("recipe overrides (default: the preset's value)")
    for f in fields(TrainConfig):
        kind = _base_type(_hints()[f.name])
        flag = "--" + f.name.replace("_", "-")
        helps = {"help": FLAG_HELP[f.name]} if f.name in FLAG_HELP else {}
        if kind is bool:
            group.add_argument(flag, action=argparse.BooleanOptionalAction, default=argparse.SUPPRESS, **helps)
        elif typing.get_origin(kind) is tuple:
            args = typing.get_args(kind)
            nargs = "+" if args[-1] is Ellipsis else len(args)
            group.add_argument(flag, nargs=nargs, type=args[0], default=argparse.SUPPRESS, metavar=f.name.upper(),
                               **helps)
        else:
            group.add_argument(flag, type=kind, default=argparse.SUPPRESS, **helps)


def overrides_from_args(args: argparse.Namespace) -> dict:
    """The TrainConfig fields given on the command line."""
    return {f.name: getattr(args, f.name) for f in fields(TrainConfig) if hasattr(args, f.name)}


def dataset_for(config: TrainConfig, splits) -> Dataset:
    """The config's dataset for `splits` (a name or a list of names)."""
    options = {"folder": {"num_classes": config.num_classes},
               "demo": {"size": max(config.crop_size)}}.get(config.dataset, {})  # demo: drawn at crop size
    return build_dataset(config.dataset, config.data_root, splits, **options)
