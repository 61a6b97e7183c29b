"""Segmentation datasets: Cityscapes, CamVid, Pascal VOC 2012, a plain folder layout, and a
generated demo.

Every dataset yields raw samples `(image, label)`: image (H, W, 3) uint8 RGB, label (H, W) uint8
class ids with 255 = ignore (numpy arrays). Augmentation and normalization live in
`gcnet.transforms`, so one dataset object serves training, evaluation and prediction.
Each dataset also carries `classes` (names) and `palette` ((K, 3) uint8 colours) for reports and
colour masks.

    ds = build_dataset("cityscapes", "/data/cityscapes", "val")
    image, label = ds[0]
"""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
from torch.utils.data import ConcatDataset, Dataset

from .errors import ConfigError, require

IGNORE_INDEX = 255

# The official Cityscapes label table (cityscapesScripts `labels.py`): name, id, trainId, colour.
# Ids without a trainId are ignored in training and evaluation (trainId 255).
CITYSCAPES_LABELS = (
    ("unlabeled", 0, 255, (0, 0, 0)), ("ego vehicle", 1, 255, (0, 0, 0)),
    ("rectification border", 2, 255, (0, 0, 0)), ("out of roi", 3, 255, (0, 0, 0)),
    ("static", 4, 255, (0, 0, 0)), ("dynamic", 5, 255, (111, 74, 0)),
    ("ground", 6, 255, (81, 0, 81)), ("road", 7, 0, (128, 64, 128)),
    ("sidewalk", 8, 1, (244, 35, 232)), ("parking", 9, 255, (250, 170, 160)),
    ("rail track", 10, 255, (230, 150, 140)), ("building", 11, 2, (70, 70, 70)),
    ("wall", 12, 3, (102, 102, 156)), ("fence", 13, 4, (190, 153, 153)),
    ("guard rail", 14, 255, (180, 165, 180)), ("bridge", 15, 255, (150, 100, 100)),
    ("tunnel", 16, 255, (150, 120, 90)), ("pole", 17, 5, (153, 153, 153)),
    ("polegroup", 18, 255, (153, 153, 153)), ("traffic light", 19, 6, (250, 170, 30)),
    ("traffic sign", 20, 7, (220, 220, 0)), ("vegetation", 21, 8, (107, 142, 35)),
    ("terrain", 22, 9, (152, 251, 152)), ("sky", 23, 10, (70, 130, 180)),
    ("person", 24, 11, (220, 20, 60)), ("rider", 25, 12, (255, 0, 0)),
    ("car", 26, 13, (0, 0, 142)), ("truck", 27, 14, (0, 0, 70)),
    ("bus", 28, 15, (0, 60, 100)), ("caravan", 29, 255, (0, 0, 90)),
    ("trailer", 30, 255, (0, 0, 110)), ("train", 31, 16, (0, 80, 100)),
    ("motorcycle", 32, 17, (0, 0, 230)), ("bicycle", 33, 18, (119, 11, 32)),
)

# CamVid's 11 classes in the order of PIDNet's and mmseg's CamVid configs (alphabetical), with their
# colours in CamVid's colour-coded labels. The colours of the 21 unused CamVid classes and void
# become 255; any other colour is not a CamVid label.
CAMVID_CLASSES = (
    ("bicyclist", (0, 128, 192)), ("building", (128, 0, 0)), ("car", (64, 0, 128)),
    ("column_pole", (192, 192, 128)), ("fence", (64, 64, 128)), ("pedestrian", (64, 64, 0)),
    ("road", (128, 64, 128)), ("sidewalk", (0, 0, 192)), ("sign_symbol", (192, 128, 128)),
    ("sky", (128, 128, 128)), ("tree", (128, 128, 0)),
)
CAMVID_IGNORED_COLORS = (  # void, Animal, Archway, Bridge, CartLuggagePram, Child, LaneMkgsDriv,
    (0, 0, 0), (64, 128, 64), (192, 0, 128), (0, 128, 64), (64, 0, 192), (192, 128, 64), (128, 0, 192),
    # LaneMkgsNonDriv, Misc_Text, MotorcycleScooter, OtherMoving, ParkingBlock, RoadShoulder,
    (192, 0, 64), (128, 128, 64), (192, 0, 192), (128, 64, 64), (64, 192, 128), (128, 128, 192),
    # SUVPickupTruck, TrafficCone, TrafficLight, Train, Truck_Bus, Tunnel, VegetationMisc, Wall
    (64, 128, 192), (0, 0, 64), (0, 64, 64), (192, 64, 128), (192, 128, 192), (64, 0, 64), (192, 192, 0),
    (64, 192, 0),
)

VOC_CLASSES = ("background", "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat",
               "chair", "cow", "diningtable", "dog", "horse", "motorbike", "person", "pottedplant",
               "sheep", "sofa", "train", "tvmonitor")

DEMO_CLASSES = ("background", "disc", "square", "triangle")
DEMO_PALETTE = np.array([(40, 40, 40), (230, 60, 60), (60, 200, 80), (70, 110, 240)], np.uint8)


def voc_palette(n: int = 256) -> np.ndarray:
    """The VOC colour map: class i's RGB bits are i's bits interleaved, high bits first. (n, 3) uint8."""
    palette = np.zeros((n, 3), np.uint8)
    for i in range(n):
        c, r, g, b = i, 0, 0, 0
        for shift in range(7, -1, -1):
            r |= (c & 1) << shift
            g |= ((c >> 1) & 1) << shift
            b |= ((c >> 2) & 1) << shift
            c >>= 3
        palette[i] = r, g, b
    return palette


def _lookup_table(pairs) -> np.ndarray:
    """A 256-entry uint8 table mapping raw ids to class ids; unlisted ids → IGNORE_INDEX."""
    table = np.full(256, IGNORE_INDEX, np.uint8)
    for raw, cls in pairs:
        table[raw] = cls
    return table


CITYSCAPES_TABLE = _lookup_table((id_, train_id) for _, id_, train_id, _ in CITYSCAPES_LABELS)
_CITYSCAPES_TRAIN = sorted((t, name, color) for name, _, t, color in CITYSCAPES_LABELS if t != IGNORE_INDEX)
CITYSCAPES_CLASSES = tuple(name for _, name, _ in _CITYSCAPES_TRAIN)
CITYSCAPES_PALETTE = np.array([color for _, _, color in _CITYSCAPES_TRAIN], np.uint8)


def read_image(path: Path, mode: str | None = None) -> np.ndarray:
    """A file's pixels, decoded now so a truncated file fails here and names its path.

    mode: PIL mode to convert to ("RGB"), or None to keep the stored values (palette indices)."""
    Image = require("PIL.Image", "reading images")
    try:
        with Image.open(path) as img:
            img.load()
            if mode is not None and img.mode != mode:
                img = img.convert(mode)
            return np.array(img)
    except FileNotFoundError:
        raise FileNotFoundError(f"missing file: {path}") from None
    except Exception as e:
        raise OSError(f"cannot read {path}: {e} (corrupt or not an image?)") from e


class SegmentationFiles(Dataset):
    """(image file, label file) pairs read on access. Subclasses say how a label file becomes ids.

    Returns (image (H, W, 3) uint8, label (H, W) uint8)."""

    classes: tuple[str, ...] = ()
    palette: np.ndarray = np.zeros((0, 3), np.uint8)

    def __init__(self, pairs: list[tuple[Path, Path]], root: Path, split: str):
        if not pairs:
            raise FileNotFoundError(f"no images found for split '{split}' under {root}; "
                                    f"expected the {type(self).__name__} layout (see its docstring)")
        self.pairs, self.root, self.split = pairs, root, split

    def __len__(self) -> int:
        return len(self.pairs)

    def __getitem__(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        image_path, label_path = self.pairs[i]
        image, label = read_image(image_path, "RGB"), self.read_label(label_path)
        if label.ndim != 2:
            raise ValueError(f"{label_path} has {label.shape[2]} channels; this layout's labels hold one "
                             f"class id per pixel (greyscale or palette PNG)")
        if image.shape[:2] != label.shape:
            raise ValueError(f"image {image_path} is {image.shape[1]}x{image.shape[0]} but its label "
                             f"{label_path} is {label.shape[1]}x{label.shape[0]}")
        return image, label

    def read_label(self, path: Path) -> np.ndarray:
        raise NotImplementedError


def _require_dir(path: Path, what: str) -> Path:
    if not path.is_dir():
        raise FileNotFoundError(f"{what} not found: {path} is not a directory")
    return path


def _pair(images, label_of) -> list[tuple[Path, Path]]:
    """Each image with its label path; a missing label is an error naming both."""
    pairs = []
    for image in sorted(images):
        label = label_of(image)
        if not label.is_file():
            raise FileNotFoundError(f"missing label file: {label} (for image {image})")
        pairs.append((image, label))
    return pairs


class Cityscapes(SegmentationFiles):
    """`leftImg8bit/{split}/{city}/*_leftImg8bit.png` with `gtFine/{split}/{city}/*_gtFine_labelIds.png`.

    The 34 label ids map to the 19 trainIds through the official table; the rest become 255."""

    classes, palette = CITYSCAPES_CLASSES, CITYSCAPES_PALETTE

    def __init__(self, root, split: str = "train"):
        root = Path(root)
        images = _require_dir(root / "leftImg8bit" / split, "Cityscapes images")
        labels = _require_dir(root / "gtFine" / split, "Cityscapes labels")

        def label_of(image: Path) -> Path:
            stem = image.name[: -len("_leftImg8bit.png")]
            return labels / image.parent.name / f"{stem}_gtFine_labelIds.png"

        super().__init__(_pair(images.glob("*/*_leftImg8bit.png"), label_of), root, split)

    def read_label(self, path: Path) -> np.ndarray:
        return CITYSCAPES_TABLE[read_image(path)]


class CamVid(SegmentationFiles):
    """The release's layout: `{split}/*.png` with labels in `{split}_labels/` (named `<stem>_L.png`,
    or `<stem>.png`). Splits: train, val, test.

    Each label file is read by its PIL mode: single-channel (greyscale or palette) files hold class
    ids 0..10 (255 = ignore), as the release reads them; RGB files are CamVid's colour coding, the
    11 class colours → 0..10 and the other CamVid colours → 255. Any other value is refused
    (ValueError naming the file), never read as "ignore"."""

    classes = tuple(name for name, _ in CAMVID_CLASSES)
    palette = np.array([color for _, color in CAMVID_CLASSES], np.uint8)

    def __init__(self, root, split: str = "train"):
        root = Path(root)
        images = _require_dir(root / split, "CamVid images")
        labels = _require_dir(root / f"{split}_labels", "CamVid labels")

        def label_of(image: Path) -> Path:
            named_l = labels / f"{image.stem}_L.png"
            return named_l if named_l.is_file() or not (labels / image.name).is_file() else labels / image.name

        super().__init__(_pair(images.glob("*.png"), label_of), root, split)

    def read_label(self, path: Path) -> np.ndarray:
        raw = read_image(path)  # the stored values: (H, W) ids, or (H, W, 3|4) colours
        if raw.ndim == 2:
            wrong = np.setdiff1d(raw, [*range(len(self.classes)), IGNORE_INDEX])
            if wrong.size:
                raise ValueError(f"{path}: single-channel label holds {wrong[:5].tolist()}, not CamVid class "
                                 f"ids (0-{len(self.classes) - 1}, 255 = ignore); relabel the file")
            return raw.astype(np.uint8)
        if raw.shape[2] not in (3, 4):
            raise ValueError(f"{path}: a label with {raw.shape[2]} channels; expected single-channel class ids "
                             f"or RGB colours")
        try:
            return colors_to_ids(raw[..., :3], self.palette, ignored=np.array(CAMVID_IGNORED_COLORS, np.uint8))
        except ValueError as e:
            raise ValueError(f"{path}: {e}") from None


def colors_to_ids(rgb: np.ndarray, palette: np.ndarray, ignored: np.ndarray | None = None) -> np.ndarray:
    """(H, W, 3) uint8 colour-coded label → (H, W) uint8 ids; colours not in `palette` → 255.

    ignored: (M, 3) the only other colours allowed (→ 255); any colour in neither raises ValueError."""
    code = lambda c: (c[..., 0].astype(np.int64) << 16) | (c[..., 1].astype(np.int64) << 8) | c[..., 2]
    table = {int(k): i for i, k in enumerate(code(palette))}
    keys, inverse = np.unique(code(rgb), return_inverse=True)
    if ignored is not None:
        unknown = sorted(set(keys.tolist()) - set(table) - set(code(ignored).tolist()))
        if unknown:
            shown = ", ".join(str((k >> 16, k >> 8 & 255, k & 255)) for k in unknown[:3])
            raise ValueError(f"{len(unknown)} colour(s) that CamVid's colour coding does not use, such as "
                             f"{shown}; expected its colours or single-channel class ids")
    ids = np.array([table.get(int(k), IGNORE_INDEX) for k in keys], np.uint8)
    return ids[inverse].reshape(rgb.shape[:2])


class VOC(SegmentationFiles):
    """Pascal VOC 2012: `JPEGImages/<id>.jpg`, palette PNGs `SegmentationClass/<id>.png`, the ids
    listed in `ImageSets/Segmentation/{split}.txt`. The palette index is the class (0..20); the
    255 object borders stay ignored."""

    classes, palette = VOC_CLASSES, voc_palette(len(VOC_CLASSES))

    def __init__(self, root, split: str = "train"):
        root = Path(root)
        if (root / "VOC2012").is_dir():  # accept the parent of the unpacked VOCdevkit/VOC2012 too
            root = root / "VOC2012"
        listing = root / "ImageSets" / "Segmentation" / f"{split}.txt"
        if not listing.is_file():
            raise FileNotFoundError(f"missing file: {listing} (the VOC split list for '{split}')")
        pairs = []
        for name in listing.read_text().split():
            image, label = root / "JPEGImages" / f"{name}.jpg", root / "SegmentationClass" / f"{name}.png"
            for path in (image, label):
                if not path.is_file():
                    raise FileNotFoundError(f"missing file: {path} (listed in {listing})")
            pairs.append((image, label))
        super().__init__(pairs, root, split)

    def read_label(self, path: Path) -> np.ndarray:
        return read_image(path)


class Folder(SegmentationFiles):
    """Your own data: `images/<stem>.{png,jpg,jpeg}` with `masks/<stem>.png` holding class ids
    (single channel: greyscale or palette indices, 255 = ignore). Splits live in
    `<root>/<split>/images`; without that folder, `<root>/images` is used for every split.
    Class names come from `<root>/classes.txt` (one per line) or from `num_classes`."""

    def __init__(self, root, split: str = "train", num_classes: int | None = None):
        root = Path(root)
        base = root / split if (root / split / "images").is_dir() else root
        images = _require_dir(base / "images", "folder dataset images")
        masks = _require_dir(base / "masks", "folder dataset masks")
        names = root / "classes.txt"
        if names.is_file():
            self.classes = tuple(line.strip() for line in names.read_text().splitlines() if line.strip())
        elif num_classes:
            self.classes = tuple(f"class_{i}" for i in range(num_classes))
        else:
            raise ValueError(f"folder dataset {root}: give the number of classes (--num-classes) "
                             f"or list the class names in {names}")
        self.palette = voc_palette(len(self.classes))
        files = [p for p in images.iterdir() if p.suffix.lower() in (".png", ".jpg", ".jpeg")]
        super().__init__(_pair(files, lambda image: masks / f"{image.stem}.png"), root, split)

    def read_label(self, path: Path) -> np.ndarray:
        mask = read_image(path)
        if mask[mask != IGNORE_INDEX].max(initial=0) >= len(self.classes):
            raise ValueError(f"{path} holds class id {mask[mask != IGNORE_INDEX].max()} but the dataset "
                             f"has {len(self.classes)} classes")
        return mask


class Demo(Dataset):
    """Coloured discs, squares and triangles on striped, noisy backgrounds, made on the fly.

    Sample i of a split is always the same picture (its generator is seeded by (seed, split, i)),
    so nothing is stored and any run can be repeated. Each shape class has its own hue range,
    jittered, and shapes may overlap, so a network learns colour, shape and edges.
    Returns (image (size, size, 3) uint8, label (size, size) uint8 in 0..3)."""

    classes, palette = DEMO_CLASSES, DEMO_PALETTE
    SPLITS = {"train": (0, 2000), "val": (1, 48), "test": (2, 48)}

    def __init__(self, root=None, split: str = "train", size: int = 128, length: int | None = None,
                 seed: int = 0):
        if split not in self.SPLITS:
            raise ValueError(f"demo split must be one of {sorted(self.SPLITS)}, got '{split}'")
        self.split, self.size, self.seed = split, size, seed
        self.split_id, default_length = self.SPLITS[split]
        self.length = length or default_length

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        if not 0 <= i < self.length:
            raise IndexError(i)
        rng = np.random.default_rng([self.seed, self.split_id, i])
        n = self.size
        yy, xx = np.mgrid[0:n, 0:n].astype(np.float32) / n
        image = _background(rng, yy, xx)
        label = np.zeros((n, n), np.uint8)
        for _ in range(rng.integers(1, 4)):
            cls = int(rng.integers(1, len(DEMO_CLASSES)))
            mask = _shape_mask(cls, rng, yy, xx)
            hue = (cls - 1) / 3 + rng.uniform(-0.07, 0.07)
            color = _hsv_to_rgb(hue, rng.uniform(0.6, 1.0), rng.uniform(0.6, 1.0))
            shade = 1 + 0.15 * np.sin(2 * math.pi * (xx * rng.uniform(1, 4) + yy * rng.uniform(1, 4)))
            image[mask] = (color * shade[..., None])[mask]
            label[mask] = cls
        image += rng.normal(0, 0.04, image.shape).astype(np.float32)
        return (np.clip(image, 0, 1) * 255).astype(np.uint8), label


def _background(rng, yy, xx) -> np.ndarray:
    """Two greyish colours in sinusoidal stripes: texture the network must learn to ignore. Muted
    (the shapes are saturated) so that a CPU run learns within minutes."""
    a = rng.uniform(0.1, 0.8) + rng.uniform(-0.08, 0.08, 3)
    b = rng.uniform(0.1, 0.8) + rng.uniform(-0.08, 0.08, 3)
    angle, freq = rng.uniform(0, math.pi), rng.uniform(2, 10)
    t = 0.5 + 0.5 * np.sin(2 * math.pi * freq * (xx * math.cos(angle) + yy * math.sin(angle)))
    return (a * t[..., None] + b * (1 - t[..., None])).astype(np.float32)


def _shape_mask(cls: int, rng, yy, xx) -> np.ndarray:
    cy, cx, r = rng.uniform(0.15, 0.85), rng.uniform(0.15, 0.85), rng.uniform(0.12, 0.28)
    if cls == 1:  # disc
        return (yy - cy) ** 2 + (xx - cx) ** 2 < r * r
    if cls == 2:  # square, rotated
        a = rng.uniform(0, math.pi / 2)
        u = (xx - cx) * math.cos(a) + (yy - cy) * math.sin(a)
        v = -(xx - cx) * math.sin(a) + (yy - cy) * math.cos(a)
        return (np.abs(u) < r * 0.85) & (np.abs(v) < r * 0.85)
    # triangle: inside all three edges of a rotated equilateral triangle
    a = rng.uniform(0, 2 * math.pi)
    corners = [(cx + r * 1.2 * math.cos(a + k * 2 * math.pi / 3), cy + r * 1.2 * math.sin(a + k * 2 * math.pi / 3))
               for k in range(3)]
    inside = np.ones_like(xx, bool)
    for (x0, y0), (x1, y1) in zip(corners, corners[1:] + corners[:1]):
        inside &= (x1 - x0) * (yy - y0) - (y1 - y0) * (xx - x0) > 0
    return inside


def _hsv_to_rgb(h: float, s: float, v: float) -> np.ndarray:
    k = (np.array([5.0, 3.0, 1.0]) + (h % 1.0) * 6) % 6
    return (v - v * s * np.clip(np.minimum(k, 4 - k), 0, 1)).astype(np.float32)


DATASETS = {"cityscapes": Cityscapes, "camvid": CamVid, "voc": VOC, "folder": Folder, "demo": Demo}


def build_dataset(name: str, root=None, splits="train", **options) -> Dataset:
    """Dataset `name` (a key of DATASETS) for one split or several (concatenated, e.g. CamVid's
    train+val). `options` go to the dataset (Folder's `num_classes`, Demo's `size`)."""
    if name not in DATASETS:
        raise ConfigError(f"unknown dataset '{name}'; choose from {sorted(DATASETS)}")
    if name != "demo" and root is None:
        raise ConfigError(f"dataset '{name}' needs a data root (--data-root)")
    splits = [splits] if isinstance(splits, str) else list(splits)
    parts = [DATASETS[name](root, split, **options) for split in splits]
    if len(parts) == 1:
        return parts[0]
    joined = ConcatDataset(parts)
    joined.classes, joined.palette = parts[0].classes, parts[0].palette
    return joined
