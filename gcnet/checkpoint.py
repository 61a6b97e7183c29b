"""Import the release's checkpoints (MMSegmentation names) into our GCNet; `gcnet convert`.

A training-form checkpoint maps key by key (GCNET.md lists the release's names). A deploy-form
checkpoint holds one `reparam_3x3` (3×3 kernel, bias) per GCBlock: it loads into the training
form as an EQUIVALENT point (kernel and bias in the first Path3x3_1x1 with identity 1×1 and
BNs, the other paths and the residual BN zeroed), so that `reparam.fuse(model.eval())` gives
back the release's deploy model. Fine-tune from a training-form checkpoint, not from that point.
Both cases produce our training-form state dict; the deploy model is always `reparam.fuse`.

    model = load("gcnet_s_cityscapes.pth", variant="s")   # release or converted file
    deploy = reparam.fuse(model.eval())
"""
from __future__ import annotations

import json
import pickle
import re
import sys
from dataclasses import asdict, replace
from pathlib import Path

import torch

from reparam.export import write_atomic

from .config import CONFIGS, GCNetConfig
from .model import GCNet


class CheckpointError(ValueError):
    """A checkpoint that does not fit the requested model; the message lists the keys."""


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

def release_config(state_dict: dict, variant: str, **overrides) -> GCNetConfig:
    """The variant's config with n_paths and num_classes read from the checkpoint's shapes."""
    found = {int(m.group(1)) for k in state_dict if (m := re.search(r"\.path_3x3_(\d+)\.", k))}
    guess = {}
    if found:
        guess["n_paths"] = max(found)
    if "decode_head.conv_seg.weight" in state_dict:
        guess["num_classes"] = state_dict["decode_head.conv_seg.weight"].shape[0]
    return replace(_preset(variant), **{**guess, **overrides})


def _preset(variant: str | None) -> GCNetConfig:
    if variant not in CONFIGS:
        raise CheckpointError(f"unknown variant {variant!r} (and none recorded in the file): "
                              f"pass one of {sorted(CONFIGS)}")
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
        lines.append("check --variant (and the overrides) against the checkpoint's model")
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

def read_state_dict(path, trust_pickle: bool = False) -> tuple[dict, dict]:
    """(state dict, metadata) of a .safetensors file or a torch checkpoint (`state_dict` inside or bare).

    Pickled checkpoints load with weights_only=True; MMSegmentation's `meta` may need
    `trust_pickle=True` (runs the file's pickled code: only for files you trust)."""
    path = Path(path)
    if path.suffix == ".safetensors":
        from safetensors import safe_open
        with safe_open(str(path), "pt") as f:
            return {k: f.get_tensor(k) for k in f.keys()}, dict(f.metadata() or {})
    try:
        obj = torch.load(path, map_location="cpu", weights_only=not trust_pickle)
    except pickle.UnpicklingError as e:
        raise CheckpointError(f"{path}: cannot load with weights_only=True ({str(e).splitlines()[0]}); "
                              "if you trust the file, pass --trust-pickle") from e
    meta = obj.get("meta", {}) if isinstance(obj, dict) else {}
    state_dict = obj.get("state_dict", obj.get("model", obj)) if isinstance(obj, dict) else obj
    if not isinstance(state_dict, dict):
        raise CheckpointError(f"{path}: expected a state dict, found {type(state_dict).__name__}")
    return state_dict, meta if isinstance(meta, dict) else {}


def is_release(state_dict: dict) -> bool:
    return any(k.startswith(("backbone.", "decode_head.")) for k in state_dict)


def load(path, variant: str | None = None, trust_pickle: bool = False, **overrides) -> GCNet:
    """A GCNet (training form) from a release checkpoint or from a file `convert` wrote."""
    state_dict, meta = read_state_dict(path, trust_pickle)
    variant = variant or meta.get("variant")
    if is_release(state_dict):
        config = release_config(state_dict, variant, **overrides)
        state_dict = from_release(state_dict, config)
    else:  # a file `convert` wrote: its config is in the metadata
        saved = json.loads(meta.get("config", "{}"))
        saved = {k: tuple(v) if isinstance(v, list) else v for k, v in saved.items()}
        config = replace(_preset(variant), **{**saved, **overrides})
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


def convert(path, variant: str, out, trust_pickle: bool = False, **overrides) -> Path:
    """Release checkpoint (training or deploy form) → our training-form state dict at `out`."""
    model = load(path, variant, trust_pickle, **overrides)
    meta = {"variant": variant, "config": json.dumps(asdict(model.config)), "source": Path(path).name,
            "format": "gcnet training form"}
    return save_state_dict(model.state_dict(), out, meta)


def _convert_command(args) -> int:
    try:
        out = convert(args.path, args.variant, args.out, args.trust_pickle)
    except CheckpointError as e:
        print(f"gcnet convert: {e}", file=sys.stderr)
        return 1
    print(f"wrote {out} (our training form; deploy with reparam.fuse(gcnet.checkpoint.load(...).eval()))")
    return 0


def register(subparsers) -> None:
    p = subparsers.add_parser("convert", help="import a release checkpoint (training or deploy form)")
    p.add_argument("path", help="the release's .pth (a dict with 'state_dict') or a bare state dict")
    p.add_argument("--variant", choices=sorted(CONFIGS), required=True)
    p.add_argument("--out", required=True, help="output file: .safetensors, or anything else for torch.save")
    p.add_argument("--trust-pickle", action="store_true",
                   help="load with weights_only=False (runs pickled code: only for files you trust)")
    p.set_defaults(func=_convert_command)
