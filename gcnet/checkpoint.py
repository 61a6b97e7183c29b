"""Import the release's checkpoints (MMSegmentation names) into our GCNet; `gcnet convert`.

The model is read from the file alone: base width, PPM and head widths, blocks per stage, N
(Path3x3_1x1 per GCBlock) and the number of classes come from the tensors' names and shapes
(`infer_config`); a variant named by the caller is checked against them.

A training-form checkpoint maps key by key (GCNET.md lists the release's names). A deploy-form
checkpoint (`switch_to_deploy()`) holds one `reparam_3x3` (3×3 kernel, bias) per GCBlock: it loads
into the training form as an EQUIVALENT point (kernel and bias in the first Path3x3_1x1 with
identity 1×1 and BNs, the other paths and the residual BN zeroed), so that
`reparam.fuse(model.eval())` gives back the release's deploy model. Such a file does not record N
(any N computes the same function there): N=2, the release's, unless given. Fine-tune from a
training-form checkpoint, not from that point. Both cases produce our training-form state dict.

Files load with torch's `weights_only` unpickler. Objects of other packages in them (the
`message_hub` of an mmengine Runner checkpoint) become inert `Foreign` stand-ins: nothing of
theirs is imported or run, and mmengine need not be installed.

    model = load("gcnet_s_cityscapes.pth")   # release or converted file; load(path, "s") checks it is S
    deploy = reparam.fuse(model.eval())
"""
from __future__ import annotations

import json
import pickle
import re
import zipfile
from dataclasses import asdict, fields, replace
from pathlib import Path

import torch

from reparam.export import write_atomic

from .config import CONFIGS, GCNetConfig
from .errors import CheckpointError
from .model import GCNet

# ---------------------------------------------------------------- names: release ↔ ours

def _gcblock_pairs(release: str, ours: str, n_paths: int) -> list[tuple[str, str]]:
    pairs = [(f"{release}.path_3x3_{k + 1}.", f"{ours}.paths_3x3.{k}.") for k in range(n_paths)]
    return pairs + [(f"{release}.path_1x1.", f"{ours}.path_1x1."),
                    (f"{release}.path_residual.", f"{ours}.residual."),
                    (f"{release}.reparam_3x3.", f"{ours}.reparam_3x3.")]  # deploy form, see _embed


def prefix_pairs(config: GCNetConfig) -> list[tuple[str, str]]:
    """(release prefix, our prefix) for every module the two models share, GCBlock internals included."""
    pairs = [("backbone.stem.0.", "stem.0."), ("backbone.stem.1.", "stem.1.")]
    # the release's stem Sequential continues with the stage-2 then the stage-3 GCBlocks
    trunk = [f"stage2.{i}" for i in range(config.stage_blocks[0])] + \
            [f"stage3.{i}" for i in range(config.stage_blocks[1])]
    for i, ours in enumerate(trunk):
        pairs += _gcblock_pairs(f"backbone.stem.{i + 2}", ours, config.n_paths)
    for branch, release, counts in (("semantic", "semantic_branch_layers", config.semantic_blocks),
                                    ("detail", "detail_branch_layers", config.detail_blocks)):
        for stage, n in enumerate(counts):
            for i in range(n):
                pairs += _gcblock_pairs(f"backbone.{release}.{stage}.{i}", f"{branch}.{stage}.{i}", config.n_paths)
    pairs += [("backbone.compression_1.", "fusion4.compress."), ("backbone.down_1.", "fusion4.down.0."),
              ("backbone.compression_2.", "fusion5.compress."), ("backbone.down_2.", "fusion5.down."),
              ("backbone.spp.", "dappm."),
              ("decode_head.head.0.", "head.bn."), ("decode_head.head.2.", "head.conv."),
              ("decode_head.conv_seg.", "head.cls."),
              ("decode_head.aux_head_c4.0.", "aux_head.bn."), ("decode_head.aux_head_c4.2.", "aux_head.conv."),
              ("decode_head.aux_cls_seg_c4.", "aux_head.cls.")]
    return pairs


def rename(key: str, pairs: list[tuple[str, str]]) -> str | None:
    """`key` with its longest matching prefix replaced; None if no prefix matches."""
    best = max((p for p in pairs if key.startswith(p[0])), key=lambda p: len(p[0]), default=None)
    return None if best is None else best[1] + key[len(best[0]):]


def to_release(state_dict: dict, config: GCNetConfig) -> dict:
    """Our state dict under the release's names (for tests and for sharing weights back)."""
    pairs = [(o, r) for r, o in prefix_pairs(config)]
    return {rename(k, pairs): v for k, v in state_dict.items()}


# ---------------------------------------------------------------- release → ours

STRUCTURE = ("in_channels", "channels", "stage_blocks", "semantic_blocks", "detail_blocks",
             "head_channels", "ppm_channels")
"""The GCNetConfig fields a variant fixes; n_paths and num_classes vary between checkpoints of one variant."""


def _indices(state_dict: dict, prefix: str) -> list[int]:
    """The distinct i of keys `<prefix><i>.…`, sorted."""
    pattern = re.compile(re.escape(prefix) + r"(\d+)\.")
    return sorted({int(m.group(1)) for k in state_dict if (m := pattern.match(k))})


def _out_channels(state_dict: dict, block: str) -> int:
    for name in (f"{block}.reparam_3x3.weight", f"{block}.path_3x3_1.conv1.conv.weight"):
        if name in state_dict:
            return state_dict[name].shape[0]
    raise CheckpointError(f"GCBlock {block} has neither reparam_3x3 nor path_3x3_1 weights")


def is_deploy_layout(state_dict: dict) -> bool:
    return any(".reparam_3x3." in k for k in state_dict)


def infer_config(state_dict: dict) -> GCNetConfig:
    """The GCNetConfig of a release state dict (training or deploy layout), from names and shapes.

    Widths are output channels (stem: C; DAPPM's first 1×1: P; head 3×3: head channels;
    `conv_seg`: classes); block counts are the GCBlock indices per stage; stage 2 is the trunk's
    C-wide blocks, stage 3 the 2C-wide ones; N is the number of `path_3x3_k` (2 in deploy layout)."""
    needed = ("backbone.stem.0.conv.weight", "backbone.spp.scales.0.conv.weight",
              "decode_head.head.2.conv.weight", "decode_head.conv_seg.weight")
    if missing := [k for k in needed if k not in state_dict]:
        raise CheckpointError(f"not a GCNet checkpoint: no {', '.join(missing)}")
    stem = state_dict["backbone.stem.0.conv.weight"]
    c = stem.shape[0]
    trunk = [_out_channels(state_dict, f"backbone.stem.{i}") for i in _indices(state_dict, "backbone.stem.") if i >= 2]
    if trunk != sorted(trunk) or set(trunk) - {c, 2 * c}:
        raise CheckpointError(f"not a GCNet trunk: GCBlock widths {trunk} after a stem of width {c}")
    count = lambda name: tuple(len(_indices(state_dict, f"backbone.{name}.{s}.")) for s in range(3))
    paths = {int(m.group(1)) for k in state_dict if (m := re.search(r"\.path_3x3_(\d+)\.", k))}
    try:
        return GCNetConfig(channels=c, stage_blocks=(trunk.count(c), trunk.count(2 * c)),
                           semantic_blocks=count("semantic_branch_layers"), detail_blocks=count("detail_branch_layers"),
                           head_channels=state_dict["decode_head.head.2.conv.weight"].shape[0],
                           ppm_channels=state_dict["backbone.spp.scales.0.conv.weight"].shape[0],
                           n_paths=max(paths, default=2),
                           num_classes=state_dict["decode_head.conv_seg.weight"].shape[0], in_channels=stem.shape[1])
    except ValueError as e:  # a stage without blocks
        raise CheckpointError(f"not a complete GCNet: {e}") from None


def variant_of(config: GCNetConfig) -> str | None:
    """"s", "m" or "l" when `config` has that variant's structure, else None."""
    return next((name for name, preset in CONFIGS.items()
                 if all(getattr(config, f) == getattr(preset, f) for f in STRUCTURE)), None)


def check_config(found: GCNetConfig, variant: str | None = None, n_paths_known: bool = True,
                 **overrides) -> GCNetConfig:
    """`found` (read from a file), checked against what the caller asked for: the structure of
    `variant` and every field in `overrides`. Raises CheckpointError naming each difference.
    Returns `found`, with `overrides["n_paths"]` where the file does not record N."""
    unknown = set(overrides) - {f.name for f in fields(GCNetConfig)}
    if unknown:
        raise CheckpointError(f"unknown GCNet option(s) {sorted(unknown)}")
    asked = {f: getattr(_preset(variant), f) for f in STRUCTURE} if variant is not None else {}
    asked.update({k: tuple(v) if isinstance(v, list) else v for k, v in overrides.items()})
    if not n_paths_known:
        found = replace(found, n_paths=asked.pop("n_paths", found.n_paths))
    diffs = [f"{k} {getattr(found, k)!r} in the file, {v!r} asked" for k, v in asked.items() if getattr(found, k) != v]
    if diffs:
        what = f"GCNet-{variant.upper()}" if variant else "the GCNet asked for"
        raise CheckpointError(f"holds another model than {what}: " + "; ".join(diffs)
                              + f" (load it without a variant: it is {variant_of(found) or 'no preset'})")
    return found


def _preset(variant: str | None) -> GCNetConfig:
    if variant not in CONFIGS:
        raise CheckpointError(f"unknown variant {variant!r}: pass one of {sorted(CONFIGS)}")
    return CONFIGS[variant]


def from_release(state_dict: dict, config: GCNetConfig) -> dict:
    """The release's training- or deploy-form state dict → our training-form state dict.

    Raises CheckpointError listing missing keys (ours, with the release name that should have
    provided them), unexpected keys and shape mismatches."""
    template = GCNet(config).state_dict()  # names, shapes and dtypes
    pairs = prefix_pairs(config)
    ours, unexpected, deploy = {}, [], {}
    for key, value in state_dict.items():
        name = rename(key, pairs)
        if name is None:
            unexpected.append(key)
        elif ".reparam_3x3." in name:
            block, field = name.split(".reparam_3x3.")
            deploy.setdefault(block, {})[field] = value
        else:
            ours[name] = value
    for block, kb in deploy.items():
        if set(kb) != {"weight", "bias"}:
            raise CheckpointError(f"deploy-form block '{block}' needs reparam_3x3.weight and .bias, got {sorted(kb)}")
        ours.update(_embed(block, kb["weight"], kb["bias"], template))
    unexpected += [_back(k, pairs) for k in ours if k not in template]
    missing = [k for k in template if k not in ours]
    mismatched = [f"{_back(k, pairs)}: {tuple(ours[k].shape)} vs {tuple(template[k].shape)} expected"
                  for k in template if k in ours and ours[k].shape != template[k].shape]
    if missing or unexpected or mismatched:
        lines = [f"the checkpoint does not fit GCNet({config})"]
        for title, keys in (("missing", [f"{_back(k, pairs)} (our {k})" for k in missing]),
                            ("unexpected", unexpected), ("shape mismatch", mismatched)):
            if keys:
                lines.append(f"{len(keys)} {title} key(s):\n  " + "\n  ".join(keys))
        lines.append("its names and shapes do not describe one GCNet: a damaged file, or another model's")
        raise CheckpointError("\n".join(lines))
    return {k: ours[k].to(template[k].dtype) for k in template}


def _back(key: str, pairs) -> str:
    return rename(key, [(o, r) for r, o in pairs]) or key


def _embed(block: str, kernel: torch.Tensor, bias: torch.Tensor, template: dict) -> dict:
    """Training-form values of GCBlock `block` that compute conv3x3(kernel, bias) exactly.

    The first Path3x3_1x1 carries the kernel, its first BN the bias, its 1×1 is the identity;
    every other path and the residual BN are zeroed (γ = β = 0). BNs with running_var = 1 - eps
    have σ = 1, so folding them changes nothing."""
    out = {}
    for key, t in template.items():
        if key.startswith(block + "."):
            out[key] = (torch.ones if key.endswith("running_var") else torch.zeros)(t.shape, dtype=t.dtype)
    first = f"{block}.paths_3x3.0"
    c = kernel.shape[0]
    out[f"{first}.conv1.conv.weight"] = kernel
    out[f"{first}.conv1.bn.bias"] = bias
    out[f"{first}.conv2.conv.weight"] = torch.eye(c, dtype=kernel.dtype).reshape(c, c, 1, 1)
    for bn in (f"{first}.conv1.bn", f"{first}.conv2.bn"):
        out[f"{bn}.weight"] = torch.ones(c, dtype=kernel.dtype)
        out[f"{bn}.running_var"] = torch.full((c,), 1 - 1e-5, dtype=kernel.dtype)  # BatchNorm2d's eps
    return out


# ---------------------------------------------------------------- files

class Foreign:
    """Stands for an object of a class a checkpoint names but we do not import (mmengine's
    MessageHub, numpy arrays in it, ...): it records its constructor arguments and state, runs
    nothing of the original class, and is never used for weights."""

    def __init__(self, *args, **kwargs):
        self.args, self.kwargs, self.state, self.items = args, kwargs, None, []

    def __setstate__(self, state):
        self.state = state

    def __setitem__(self, key, value):
        self.items.append((key, value))

    def append(self, value):
        self.items.append(value)

    def extend(self, values):
        self.items.extend(values)


def _first_line(e: Exception) -> str:
    text = re.sub(r"\x1b\[[0-9;]*m", "", str(e)).strip()  # torch colours its weights_only advice
    return (text.splitlines() or [type(e).__name__])[0]


def _torch_load(path: Path, trust_pickle: bool, mmap: bool):
    mmap = mmap and zipfile.is_zipfile(path)  # the legacy format cannot be memory-mapped
    if trust_pickle:
        return torch.load(path, map_location="cpu", weights_only=False, mmap=mmap)
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except pickle.UnpicklingError:
        if not zipfile.is_zipfile(path):
            raise
        foreign = torch.serialization.get_unsafe_globals_in_checkpoint(path)
        if not foreign:
            raise
    # The same hardened unpickler, each foreign global replaced by an inert stand-in of its own
    # (it still refuses what torch blocks outright, such as os.system).
    stand_ins = [(type(name.rsplit(".", 1)[-1], (Foreign,), {"__qualname__": name}), name) for name in foreign]
    with torch.serialization.safe_globals(stand_ins):
        return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)


def read_object(path, trust_pickle: bool = False, mmap: bool = False):
    """What a torch checkpoint file holds, on the CPU, objects of other packages as `Foreign`.

    trust_pickle: plain pickle (runs code from the file: only for files you trust). mmap: map
    zip-format files instead of reading them (cheap when only metadata is needed). Every way a
    file can fail (missing, empty, truncated, not a checkpoint) is one CheckpointError line."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: {'not a file' if path.exists() else 'no such file'}")
    if path.stat().st_size == 0:
        raise CheckpointError(f"{path}: the file is empty")
    try:
        return _torch_load(path, trust_pickle, mmap)
    except Exception as e:
        raise CheckpointError(f"{path}: not a readable checkpoint, truncated or of another format "
                              f"({type(e).__name__}: {_first_line(e)})") from e


def read_state_dict(path, trust_pickle: bool = False) -> tuple[dict, dict]:
    """(state dict, metadata) of a .safetensors file or a torch checkpoint: `state_dict` (the
    release's, mmengine's), `model` (a `gcnet train` checkpoint's) or a bare state dict."""
    path = Path(path)
    if path.suffix == ".safetensors":
        from safetensors import safe_open
        if not path.is_file():
            raise CheckpointError(f"{path}: {'not a file' if path.exists() else 'no such file'}")
        try:
            with safe_open(str(path), "pt") as f:
                return {k: f.get_tensor(k) for k in f.keys()}, dict(f.metadata() or {})
        except Exception as e:
            raise CheckpointError(f"{path}: not a readable safetensors file ({_first_line(e)})") from e
    obj = read_object(path, trust_pickle)
    meta = obj.get("meta", {}) if isinstance(obj, dict) else {}
    state_dict = obj.get("state_dict", obj.get("model", obj)) if isinstance(obj, dict) else obj
    if not isinstance(state_dict, dict) or not all(isinstance(v, torch.Tensor) for v in state_dict.values()):
        raise CheckpointError(f"{path}: holds no state dict (a dict of tensors, or one under 'state_dict' or "
                              f"'model'), found {type(state_dict).__name__}")
    return state_dict, meta if isinstance(meta, dict) else {}


def is_release(state_dict: dict) -> bool:
    return any(k.startswith(("backbone.", "decode_head.")) for k in state_dict)


def load(path, variant: str | None = None, trust_pickle: bool = False, **overrides) -> GCNet:
    """A GCNet (training form) from a release checkpoint (either layout) or a file `convert` or
    `gcnet train` wrote, its config read from the file. `variant` and `overrides` (GCNetConfig
    fields) are checked against the file: a difference is a CheckpointError."""
    state_dict, meta = read_state_dict(path, trust_pickle)
    try:
        if is_release(state_dict):
            config = check_config(infer_config(state_dict), variant, not is_deploy_layout(state_dict), **overrides)
            state_dict = from_release(state_dict, config)
        elif "config" in meta:  # a file `convert` or `gcnet train` wrote
            saved = {k: tuple(v) if isinstance(v, list) else v for k, v in json.loads(meta["config"]).items()}
            config = check_config(GCNetConfig(**saved), variant, **overrides)
        else:
            config = replace(_preset(variant), **overrides)
    except CheckpointError as e:
        raise CheckpointError(f"{path}: {e}") from None
    model = GCNet(config)
    try:
        model.load_state_dict(state_dict)
    except RuntimeError as e:
        raise CheckpointError(f"{path} does not fit GCNet({config}): {e}") from e
    return model


def save_state_dict(state_dict: dict, out, metadata: dict | None = None) -> Path:
    """Write `state_dict` to `out` (.safetensors, else torch.save) atomically: temp file, then os.replace."""
    tensors = {k: v.detach().contiguous().clone() for k, v in state_dict.items()}
    meta = {k: str(v) for k, v in (metadata or {}).items()}
    if Path(out).suffix == ".safetensors":
        from safetensors.torch import save_file
        write = lambda tmp: save_file(tensors, tmp, metadata=meta)
    else:
        write = lambda tmp: torch.save({"state_dict": tensors, "meta": meta}, tmp)
    return write_atomic(out, True, write)


def convert(path, out, variant: str | None = None, trust_pickle: bool = False, **overrides) -> Path:
    """Release checkpoint (training or deploy layout) → our training-form state dict at `out`,
    with the config in its metadata. `variant`/`overrides`: checked against the file."""
    return _save_converted(load(path, variant, trust_pickle, **overrides), path, out)


def _save_converted(model: GCNet, source, out) -> Path:
    meta = {"config": json.dumps(asdict(model.config)), "source": Path(source).name, "format": "gcnet training form"}
    if name := variant_of(model.config):
        meta["variant"] = name
    return save_state_dict(model.state_dict(), out, meta)


def describe(config: GCNetConfig) -> str:
    """One line: the variant (or every structural field) and what varies between its checkpoints."""
    name = variant_of(config)
    structure = f"GCNet-{name.upper()}" if name else \
        "GCNet (" + ", ".join(f"{f}={getattr(config, f)}" for f in STRUCTURE) + ")"
    return f"{structure}, n_paths={config.n_paths}, {config.num_classes} classes"


def _convert_command(args) -> int:
    model = load(args.path, args.variant, args.trust_pickle)
    if args.deploy:
        from .evaluate import inference_info, save_deploy  # evaluate imports this module
        out = save_deploy(model, inference_info({}, model.config.num_classes), args.out, overwrite=True)
        print(f"wrote {out}: {describe(model.config)}, the deploy form (reparam.save, "
              f"{out.stat().st_size / 1e6:.1f} MB; gcnet eval/predict load it as is)")
        return 0
    out = _save_converted(model, args.path, args.out)
    print(f"wrote {out}: {describe(model.config)}, our training form "
          "(deploy with reparam.fuse(gcnet.checkpoint.load(...).eval()))")
    return 0


def register(subparsers) -> None:
    p = subparsers.add_parser("convert", help="import a release checkpoint (training or deploy layout)")
    p.add_argument("path", help="the release's .pth (a dict with 'state_dict') or a bare state dict")
    p.add_argument("--variant", choices=sorted(CONFIGS),
                   help="check that the file holds this variant (default: read everything from the file)")
    p.add_argument("--out", required=True, help="output file: .safetensors, or anything else for torch.save")
    p.add_argument("--deploy", action="store_true",
                   help="write the deploy form instead: the fused weights (reparam.save, safetensors)")
    p.add_argument("--trust-pickle", action="store_true",
                   help="load with plain pickle (runs code from the file: only for files you trust)")
    p.set_defaults(func=_convert_command)
