"""`gcnet eval`: mIoU with a per-class IoU table, whole-image inference at the dataset's
evaluation size; `--deploy` scores the `reparam.fuse`d model instead, `--tta` the release's
test-time augmentation (six scales × horizontal flip, `tta_probabilities`).

    model, info = load_for_inference("runs/gcnet-demo/last.pt", deploy_form=True)
    result = evaluate(model, dataset_for(info["config"], "val"))
    print(result.table())
"""
from __future__ import annotations

import copy
import json
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

import reparam
import reparam.deploy

from .checkpoint import check_config, load as load_weights, read_object, read_state_dict, variant_of
from .config import GCNetConfig
from .datasets import IGNORE_INDEX, VOC, CamVid, Cityscapes, voc_palette
from .errors import CheckpointError
from .model import GCNet
from .presets import TrainConfig, config_from_dict, dataset_for
from .transforms import eval_transform, resize


@dataclass(frozen=True)
class EvalResult:
    confusion: torch.Tensor  # (K, K) int64 pixel counts; rows: true class, columns: predicted
    classes: tuple[str, ...]

    @property
    def iou(self) -> torch.Tensor:
        """(K,) float64 IoU per class; NaN where a class is neither present nor predicted."""
        c = self.confusion.double()
        tp = c.diag()
        union = c.sum(0) + c.sum(1) - tp
        return torch.where(union > 0, tp / union.clamp(min=1), torch.nan)

    @property
    def miou(self) -> float:
        return float(self.iou.nanmean())

    @property
    def accuracy(self) -> float:
        c = self.confusion.double()
        return float(c.diag().sum() / c.sum().clamp(min=1))

    def table(self) -> str:
        width = max(len("mean"), *(len(n) for n in self.classes))
        lines = [f"{'class':<{width}}  IoU %"]
        lines += [f"{name:<{width}}  {'  n/a' if np.isnan(v) else f'{100 * v:5.2f}'}"
                  for name, v in zip(self.classes, self.iou.tolist())]
        lines += [f"{'mean':<{width}}  {100 * self.miou:5.2f}", f"{'pixel acc':<{width}}  {100 * self.accuracy:5.2f}"]
        return "\n".join(lines)


def confusion_matrix(pred: torch.Tensor, label: torch.Tensor, num_classes: int,
                     ignore_index: int = IGNORE_INDEX) -> torch.Tensor:
    """pred, label: int64 of the same shape → (K, K) counts; ignored pixels do not count."""
    valid = label != ignore_index
    index = label[valid] * num_classes + pred[valid]
    return torch.bincount(index, minlength=num_classes ** 2).reshape(num_classes, num_classes)


# The release's multi-scale test (mmseg's TestTimeAug): these image ratios, each as is and flipped.
TTA_SCALES = (0.5, 0.75, 1.0, 1.25, 1.5, 1.75)


def _logits_at(model: nn.Module, image: torch.Tensor, size) -> torch.Tensor:
    """image (3, h, w) normalized → logits (K, H, W) at `size`, resized bilinearly as mmseg does."""
    logits = model(image[None])
    if tuple(logits.shape[2:]) != tuple(size):
        logits = F.interpolate(logits, size=tuple(size), mode="bilinear", align_corners=False)
    return logits[0]


@torch.no_grad()
def tta_probabilities(model: nn.Module, image: torch.Tensor, size, scales=TTA_SCALES,
                      flip: bool = True) -> torch.Tensor:
    """mmseg's TestTimeAug + SegTTAModel.merge_preds: for each ratio r the image is resized
    (bilinear) to (⌊r·h + ½⌋, ⌊r·w + ½⌋), predicted as is and, with `flip`, flipped horizontally
    (logits flipped back); each prediction's logits are resized to `size` and softmaxed; the result
    is the mean of those probabilities. image (3, h, w) normalized → (K, H, W)."""
    h, w = image.shape[1:]
    probabilities = []
    for r in scales:
        scaled, _ = resize(image, None, (max(1, int(h * r + 0.5)), max(1, int(w * r + 0.5))))
        probabilities.append(_logits_at(model, scaled, size).softmax(0))
        if flip:
            probabilities.append(_logits_at(model, scaled.flip(-1), size).flip(-1).softmax(0))
    return torch.stack(probabilities).mean(0)


@torch.no_grad()
def segment(model: nn.Module, image: torch.Tensor, size, tta: bool = False) -> torch.Tensor:
    """Class per pixel at `size` = (H, W): image (3, h, w) normalized → (H, W) int64.

    The eval-mode model gives logits at its input size; a label of another size gets the
    logits resized bilinearly, as mmseg does before its argmax. tta: the argmax of
    `tta_probabilities` instead (12 forward passes)."""
    return (tta_probabilities(model, image, size) if tta else _logits_at(model, image, size)).argmax(0)


class _EvalSamples(Dataset):
    def __init__(self, dataset, indices, eval_size):
        self.dataset, self.indices, self.eval_size = dataset, indices, eval_size

    def __len__(self):
        return len(self.indices)

    def __getitem__(self, i):
        return eval_transform(*self.dataset[self.indices[i]], eval_size=self.eval_size)


def _single(batch):
    return batch[0]


@torch.no_grad()
def evaluate(model: nn.Module, dataset, *, eval_size=None, tta: bool = False, device="cpu", workers: int = 0,
             progress: bool = False, rank: int = 0, world_size: int = 1) -> EvalResult:
    """Confusion matrix of `model` over `dataset` (raw samples, see gcnet.datasets), one whole
    image at a time, resized to fit `eval_size` = (long, short) when given.

    tta: the release's multi-scale + flip test (`tta_probabilities`); its scales multiply the image
    as stored, as mmseg's TestTimeAug does, so `eval_size` is not used.

    With several processes, each scores the images rank, rank + world_size, ... and the
    matrices are summed, so every image counts exactly once. The model's mode is restored."""
    was_training = model.training
    model.eval()
    num_classes = len(dataset.classes)
    samples = _EvalSamples(dataset, range(rank, len(dataset), world_size), None if tta else eval_size)
    loader = DataLoader(samples, batch_size=1, num_workers=workers, collate_fn=_single)
    confusion = torch.zeros(num_classes, num_classes, dtype=torch.int64, device=device)
    # disable=None: tqdm turns itself off where stderr is not a terminal (a redirected log)
    for image, label in tqdm(loader, desc="eval", disable=None if progress else True, dynamic_ncols=True):
        label = label.to(device)
        confusion += confusion_matrix(segment(model, image.to(device), label.shape, tta), label, num_classes)
    if world_size > 1:
        dist.all_reduce(confusion)
    model.train(was_training)
    return EvalResult(confusion.cpu(), tuple(dataset.classes))


def deploy(model: nn.Module, example_size=(64, 64)) -> tuple[nn.Module, "reparam.Report"]:
    """(`reparam.fuse`d eval-mode copy, fuse report). The example input lets the report state
    the fused model's max relative error against the original."""
    device = next(model.parameters()).device
    example = torch.randn(1, 3, *example_size, device=device)
    return reparam.fuse_with_report(model.eval(), (example,))


DEPLOY_FORMAT = "gcnet deploy: training-form weights, fused on load"  # files written before reparam.save


def _read_meta(path, trust_pickle: bool) -> dict:
    """A weights file's metadata. Torch files are memory-mapped, so the tensors (a training
    checkpoint's optimizer state among them) are not read just to find the class names."""
    if Path(path).suffix == ".safetensors":
        return read_state_dict(path)[1]
    obj = read_object(path, trust_pickle, mmap=True)
    meta = obj.get("meta") if isinstance(obj, dict) else None
    return meta if isinstance(meta, dict) else {}


def deploy_metadata(path) -> dict | None:
    """The metadata of a deploy file `save_deploy` wrote (config, classes, palette, ...), or None
    when `path` is another kind of file."""
    try:
        return reparam.deploy.read_metadata(path)["metadata"]
    except (ValueError, OSError):
        return None


def inference_info(meta: dict, num_classes: int) -> dict:
    """classes, palette ((K, 3) uint8) and the training config (or None) from a file's metadata.
    Files without class names (the release's): the benchmark with that many classes, if any."""
    known = {len(d.classes): d for d in (Cityscapes, CamVid, VOC)}.get(num_classes)
    load = lambda v: json.loads(v) if isinstance(v, str) else v
    classes = load(meta["classes"]) if "classes" in meta else \
        known.classes if known else [f"class_{i}" for i in range(num_classes)]
    palette = load(meta["palette"]) if "palette" in meta else \
        known.palette if known else voc_palette(num_classes)
    train_config = load(meta["train_config"]) if "train_config" in meta else None
    return {"classes": tuple(classes), "palette": np.array(palette, np.uint8),
            "config": config_from_dict(train_config) if train_config else None}


def load_for_inference(path, *, deploy_form: bool = False, device="cpu", variant: str | None = None,
                       trust_pickle: bool = False) -> tuple[nn.Module, dict]:
    """(eval-mode model, metadata) from a deploy file (`save_deploy`: loaded as it is, nothing
    fused or computed), a `gcnet train` checkpoint or any weights file `gcnet.checkpoint.load`
    reads (release checkpoints).

    metadata: classes, palette ((K, 3) uint8), and the training config where the file has it.
    deploy_form: fuse with `reparam.fuse`; deploy files are always the fused form.
    variant: "s", "m" or "l" to check that the file holds that variant (every file records its model)."""
    deploy_meta = deploy_metadata(path)
    if deploy_meta is not None:
        config = GCNetConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in deploy_meta["config"].items()})
        try:
            check_config(config, variant)
            model = reparam.load(path, lambda: GCNet(config), device=device)
        except (CheckpointError, ValueError) as e:
            raise CheckpointError(f"{path}: {e}") from None
        return model, inference_info(deploy_meta, config.num_classes)
    meta = _read_meta(path, trust_pickle)
    model = load_weights(path, variant=variant, trust_pickle=trust_pickle)
    info = inference_info(meta, model.config.num_classes)
    model.to(device).eval()
    if deploy_form or meta.get("format") == DEPLOY_FORMAT:
        model, _ = deploy(model)
    return model, info


def save_deploy(model: GCNet, info: dict, out, *, overwrite: bool = False) -> Path:
    """The deploy file of `model` (a training-form GCNet): `reparam.save` of `reparam.fuse(model.eval())`,
    the fused weights only (GCNet-S: 9.2 M parameters), with the config, classes, palette and
    training recipe in its metadata. `load_for_inference` loads it without fusing or computing
    anything, and it holds no pickled code.

    Args:
        model: the training-form model (not changed: an eval-mode copy is fused).
        info: `load_for_inference`'s metadata (classes, palette, config).
        out: the file to write (safetensors, whatever its suffix).
        overwrite: replace an existing file.

    Raises:
        FileExistsError: `out` exists and `overwrite` is False.
    """
    out = Path(out)
    if out.exists() and not overwrite:
        raise FileExistsError(f"{out} exists; pass --overwrite to replace it")
    meta = {"config": asdict(model.config), "variant": variant_of(model.config) or "",
            "classes": list(info["classes"]), "palette": np.asarray(info["palette"]).tolist()}
    if info.get("config") is not None:
        meta["train_config"] = info["config"].to_dict()
    fused = reparam.fuse(copy.deepcopy(model).eval())  # as `reparam.load` rebuilds it: no example inputs
    out.parent.mkdir(parents=True, exist_ok=True)
    return reparam.save(fused, out, build=f"gcnet.GCNet({variant_of(model.config) or 'config'})", metadata=meta)


# --- command line -------------------------------------------------------------------------

def register(subparsers) -> None:
    p = subparsers.add_parser("eval", help="mIoU of a checkpoint (or its fused deploy form)",
                              description="Score a checkpoint on a dataset split: per-class IoU, mIoU, "
                              "pixel accuracy. Dataset, split and eval size default to the training run's.")
    p.add_argument("checkpoint", help="a gcnet train checkpoint, a deploy file or a converted weights file")
    p.add_argument("--dataset", help="dataset name (default: the checkpoint's)")
    p.add_argument("--data-root", help="dataset root (default: the checkpoint's)")
    p.add_argument("--split", help="split to score (default: the checkpoint's validation split)")
    p.add_argument("--num-classes", type=int, help="folder datasets without classes.txt")
    p.add_argument("--deploy", action="store_true", help="score the reparam.fuse'd model")
    p.add_argument("--save-deploy", metavar="PATH", help="also write the deploy file (the fused weights, "
                   "reparam.save) that gcnet eval and predict load as is")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --save-deploy file")
    p.add_argument("--tta", action="store_true", help="the release's multi-scale test: image ratios "
                   f"{', '.join(map(str, TTA_SCALES))}, each as is and flipped, softmax averaged (12 passes per image)")
    p.add_argument("--workers", type=int, default=2)
    add_inference_flags(p)
    p.set_defaults(func=main)


def add_inference_flags(p) -> None:
    """The flags `gcnet eval` and `gcnet predict` share."""
    p.add_argument("--eval-size", type=int, nargs=2, metavar=("LONG", "SHORT"),
                   help="resize images to fit LONG×SHORT keeping their aspect ratio (default: the recipe's)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--variant", choices=("s", "m", "l"), help="check that the weights are this variant "
                   "(default: whatever the file holds)")
    p.add_argument("--trust-pickle", action="store_true",
                   help="load with weights_only=False (runs pickled code: only for files you trust)")


def main(args) -> int:
    if args.save_deploy and Path(args.save_deploy).exists() and not args.overwrite:  # fail before any work
        raise FileExistsError(f"{args.save_deploy} exists; pass --overwrite to replace it")
    model, info = load_for_inference(args.checkpoint, deploy_form=args.deploy and not args.save_deploy,
                                     device=args.device, variant=args.variant, trust_pickle=args.trust_pickle)
    if args.save_deploy:
        if deploy_metadata(args.checkpoint) is not None:
            raise CheckpointError(f"{args.checkpoint} is a deploy file already; --save-deploy needs the training form")
        path = save_deploy(model, info, args.save_deploy, overwrite=args.overwrite)
        print(f"wrote {path} ({path.stat().st_size / 1e6:.1f} MB: the fused weights; gcnet eval/predict load it as is)")
        if args.deploy:
            model, _ = load_for_inference(path, device=args.device)  # score the file just written
    config = info["config"] or TrainConfig(eval_size=None)
    chosen = {"dataset": args.dataset, "data_root": args.data_root, "num_classes": args.num_classes,
              "eval_size": tuple(args.eval_size) if args.eval_size else None}
    config = replace(config, **{k: v for k, v in chosen.items() if v is not None})
    split = args.split or config.val_split
    dataset = dataset_for(config, split)
    result = evaluate(model, dataset, eval_size=config.eval_size, tta=args.tta, device=args.device,
                      workers=args.workers, progress=not args.quiet)
    deployed = args.deploy or deploy_metadata(args.checkpoint) is not None
    form = "deploy (reparam.fuse)" if deployed else "training form"
    test = ", multi-scale + flip (--tta)" if args.tta else ""
    print(f"{args.checkpoint}, {form}{test}, {config.dataset} {split} ({len(dataset)} images)")
    print(result.table())
    return 0
