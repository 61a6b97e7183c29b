"""`gcnet predict IMAGE... --weights FILE --out DIR`: colour masks and overlays as PNG.

For each image `<stem>.<ext>` it writes `<stem>_mask.png`, a palette PNG whose pixel values are
the class ids and whose colours are the dataset's palette, and `<stem>_overlay.png`, the class
colours blended over the image (background and ignored pixels left as they are). Existing outputs are never replaced without `--overwrite`.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch import nn

from .datasets import read_image
from .errors import require
from .evaluate import add_inference_flags, load_for_inference, segment
from .transforms import eval_transform


def predict_mask(model: nn.Module, image: np.ndarray, eval_size=None, device="cpu") -> np.ndarray:
    """image (H, W, 3) uint8 RGB → (H, W) uint8 class ids, inferred on the whole image resized
    to fit `eval_size` = (long, short) (None: as is)."""
    tensor, _ = eval_transform(image, eval_size=eval_size)
    return segment(model, tensor.to(device), image.shape[:2]).to(torch.uint8).cpu().numpy()


def _pil():
    return require("PIL.Image", "gcnet predict (writing PNGs)")


def mask_image(mask: np.ndarray, palette: np.ndarray) -> "PIL.Image.Image":  # noqa: F821
    """(H, W) uint8 class ids → palette PNG image: colours for viewers, ids for programs."""
    img = _pil().frombytes("P", (mask.shape[1], mask.shape[0]), np.ascontiguousarray(mask).tobytes())
    colours = np.zeros((256, 3), np.uint8)  # ids past the palette (255 = ignore) show black
    colours[: len(palette)] = palette
    img.putpalette(colours.flatten().tolist())
    return img


def overlay(image: np.ndarray, mask: np.ndarray, palette: np.ndarray, alpha: float = 0.5,
            keep=()) -> np.ndarray:
    """The class colours blended over the image: (H, W, 3) uint8. Pixels of the classes in
    `keep` (background) and of ids past the palette (255 = ignore) stay as they are."""
    colours = np.zeros((256, 3), np.float32)
    colours[: len(palette)] = palette
    painted = mask < len(palette)
    if len(keep):
        painted &= ~np.isin(mask, list(keep))
    blended = image * (1 - alpha) + colours[mask] * alpha
    return np.where(painted[..., None], blended, image).round().astype(np.uint8)


def background_ids(classes) -> tuple[int, ...]:
    """Ids of the classes named background (VOC's 0, a folder dataset's 'background'), which the
    overlay leaves as they are."""
    return tuple(i for i, name in enumerate(classes) if name.strip().lower().strip("_") in ("background", "bg"))


def output_paths(image_path: Path, out_dir: Path) -> tuple[Path, Path]:
    stem = Path(image_path).stem
    return out_dir / f"{stem}_mask.png", out_dir / f"{stem}_overlay.png"


def predict_files(model: nn.Module, palette: np.ndarray, images, out_dir, *, eval_size=None, device="cpu",
                  alpha: float = 0.5, overwrite: bool = False, keep=()) -> list[Path]:
    """Mask and overlay PNGs for each image file into `out_dir`; returns the paths written.

    Checks every output name first, so a clash stops the run before anything is written.
    keep: class ids the overlay leaves unpainted (`background_ids`)."""
    out_dir, images = Path(out_dir), [Path(p) for p in images]
    planned = [p for image in images for p in output_paths(image, out_dir)]
    if len(set(planned)) != len(planned):
        raise ValueError("two input images share a file stem; their outputs would collide in " + str(out_dir))
    existing = [p for p in planned if p.exists()]
    if existing and not overwrite:
        raise FileExistsError(f"{existing[0]} exists ({len(existing)} output(s) would be replaced); "
                              "pass --overwrite or another --out")
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for image_path in images:
        image = read_image(image_path, "RGB")
        mask = predict_mask(model, image, eval_size, device)
        mask_path, overlay_path = output_paths(image_path, out_dir)
        mask_image(mask, palette).save(mask_path)
        _pil().fromarray(overlay(image, mask, palette, alpha, keep)).save(overlay_path)
        written += [mask_path, overlay_path]
    return written


def register(subparsers) -> None:
    p = subparsers.add_parser("predict", help="colour masks and overlays for images",
                              description="Segment images with a checkpoint or a deploy file; write "
                              "<stem>_mask.png (palette PNG of class ids) and <stem>_overlay.png.")
    p.add_argument("images", nargs="+", metavar="IMAGE")
    p.add_argument("--weights", "-w", required=True,
                   help="a gcnet train checkpoint, a deploy file (gcnet eval --save-deploy) or converted weights")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--deploy", action="store_true", help="fuse a checkpoint with reparam.fuse first "
                   "(deploy files always are)")
    p.add_argument("--alpha", type=float, default=0.5, help="overlay opacity of the mask")
    p.add_argument("--overwrite", action="store_true", help="replace existing output files")
    add_inference_flags(p)
    p.set_defaults(func=main)


def main(args) -> int:
    _pil()  # before any work: say which extra is missing
    model, info = load_for_inference(args.weights, deploy_form=args.deploy, device=args.device,
                                     variant=args.variant, trust_pickle=args.trust_pickle)
    config = info["config"]
    eval_size = tuple(args.eval_size) if args.eval_size else (config.eval_size if config else None)
    written = predict_files(model, info["palette"], args.images, args.out, eval_size=eval_size,
                            device=args.device, alpha=args.alpha, overwrite=args.overwrite,
                            keep=background_ids(info["classes"]))
    print(f"wrote {len(written)} files to {args.out}")
    return 0
