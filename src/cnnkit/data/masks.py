"""Segmentation data: images paired with masks by file stem -> ``Splits`` of ``MaskDataset``.

Layout: ``root/images/`` + ``root/masks/`` (or ``image/`` + ``label/``, ``images/`` +
``labels/``, ``image/`` + ``mask/``; ``data.image_dir``/``data.mask_dir`` name others), either at
the root or per split under ``root/train/``, ``root/val/``, ``root/test/``. Without a val split
one is carved from train (``data.val_fraction``, seeded by the run seed, as for classification).

Masks hold one value per pixel (``images.load_mask``): class indices (8-bit grayscale PNG),
palette indices (VOC-style "P" PNGs), or 0/255 (binary: 255 becomes class 1, there is then no
ignored value; a class file may name the two classes). ``data.ignore_index`` (default 255)
marks pixels that are not scored. Class names come from ``classes.txt`` (one per line) or
``classes.json`` (a list) in the root, else ``class_0``... up to the largest value found
(``background``/``foreground`` for binary masks).

Every pair is checked while it is decoded: a missing mask, an image and mask of different sizes,
or mask values outside the classes raise ``CnnkitError`` naming the file.

Each split is decoded once per run, resized to the input size (images bilinear, masks
nearest): uint8 masks (N, H, W), with IGNORE (255) on ignored pixels, are always kept; uint8
images (N, C, H, W) are kept when they fit the decode budget (``data.decode_cache``,
``data.cache_memory``, as for classification). Training batches of kept images are cut from
them and augmented jointly on the device (``memory.MaskLoader``); images over the budget are
read from their files again per sample and augmented with their masks by the per-sample
executor (``MaskSamples``, through DataLoader workers). Both run the one ``Augment`` spec.
"""

from __future__ import annotations

import functools
import hashlib
import json
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as TF

from cnnkit.config import DataConfig
from cnnkit.data import augment
from cnnkit.data.augment import Augment
from cnnkit.data.batchaug import BATCHED_OPS
from cnnkit.data.cache import DecodeBudget, decoded_bytes
from cnnkit.data.images import GRAY_MODES, decode, image_info, load_mask, mode_for
from cnnkit.data.loader import EpochDataset
from cnnkit.data.readers import (  # noqa: F401 - the pair layout, re-exported for callers
    BINARY_CLASSES,
    PAIR_DIRS,
    VAL_DIRS,
    is_mask_source,
    match_pairs,
    pair_dirs,
    read_class_names,
    stratified_split,
)
from cnnkit.data.splits import Splits
from cnnkit.data.splits import build as build_classes
from cnnkit.data.splits import build_eval as build_classes_eval
from cnnkit.data.stats import median_side
from cnnkit.data.transforms import SampleAugment, ToNormalizedTensor, make_preprocessing
from cnnkit.errors import CnnkitError

IGNORE = 255  # stored mask value of ignored pixels (the loss and metrics skip it)
OVERLAY_ALPHA = 0.5  # weight of the class colour over the image in overlays


class MaskDataset(Dataset):
    """Decoded pairs: uint8 masks (N, H, W) and uint8 images (N, C, H, W), or None when the
    images are read from ``paths`` per sample (``image``); ``stats`` (N, C, 3) float64 per
    image and channel: pixel count, sum and sum of squares (0..1 units), for the mean and std
    of any subset. An item is (float32 normalised image (C, H, W), int64 mask (H, W));
    ``targets`` are the masks."""

    def __init__(self, images, masks, paths: Sequence[Path], mean, std, stats) -> None:
        self.images, self.masks, self.paths = images, masks, list(paths)
        self.mean, self.std, self.stats = tuple(mean), tuple(std), stats
        self._normalise = v2.Normalize(self.mean, self.std)

    @property
    def targets(self) -> torch.Tensor:
        return self.masks

    @property
    def in_memory(self) -> bool:
        return self.images is not None

    @property
    def nbytes(self) -> int:
        return (self.images.numel() if self.in_memory else 0) + self.masks.numel()

    def __len__(self) -> int:
        return len(self.masks)

    def image(self, index: int) -> torch.Tensor:
        """uint8 (C, H, W) at the masks' size: from memory, or decoded from its file again."""
        if self.in_memory:
            return self.images[index]
        return _read_image(self.paths[index], self.stats.shape[1], tuple(self.masks.shape[-2:]))

    def __getitem__(self, index: int):
        image = self._normalise(self.image(index).float() / 255.0)
        return image, self.masks[index].long()

    def subset(self, indices: Sequence[int]) -> MaskDataset:
        rows = torch.as_tensor(list(indices), dtype=torch.long)
        paths = [self.paths[i] for i in indices]
        images = self.images[rows] if self.in_memory else None
        return MaskDataset(images, self.masks[rows], paths, self.mean, self.std, self.stats[rows])

    def with_stats(self, mean, std) -> MaskDataset:
        return MaskDataset(self.images, self.masks, self.paths, mean, std, self.stats)


class MaskSamples(EpochDataset):
    """The per-sample path of a split: item i is its pair with the same drawn geometry applied
    to image and mask (``SampleAugment.draw``, ``apply``, ``apply_mask``), or, with ``augment``
    None, the pair normalised (evaluation). The loaders seed the RNG per (seed, epoch, index)."""

    def __init__(self, dataset: MaskDataset, augment: SampleAugment | None, mean, std) -> None:
        self.dataset, self.augment = dataset, augment
        self.normalise = ToNormalizedTensor(list(mean), list(std))

    @property
    def epoch_dependent(self) -> bool:
        return self.augment is not None and self.augment.epoch_dependent

    @property
    def nbytes(self) -> int:
        return self.dataset.nbytes

    def __len__(self) -> int:
        return len(self.dataset)

    def sample(self, index: int, epoch: int):
        image, mask = self.dataset.image(index), self.dataset.masks[index]
        if self.augment is None:
            return self.normalise(image), mask.long()
        params = self.augment.draw(image, index, epoch)
        return self.augment.apply(image, params), self.augment.apply_mask(mask, params, IGNORE)


def list_pairs(images: Path, masks: Path) -> list[tuple[Path, Path]]:
    """(image, mask) files matched by stem; an image without its mask is an error."""
    found = match_pairs(images, masks)
    if found.doubles:
        first, second = found.doubles[0]
        raise CnnkitError(f"two masks for stem '{second.stem}': {first}, {second}")
    if found.missing:
        image = found.missing[0]
        raise CnnkitError(
            f"no mask for image {image}: masks are matched by file stem, and {masks} has "
            f"no {image.stem}.*"
        )
    if not found.pairs:
        raise CnnkitError(f"no images in {images}")
    return found.pairs


def build(cfg: DataConfig, seed: int, note: Callable[[str], None] | None = None):
    """The segmentation ``Splits`` of ``cfg.source`` (see the module docstring)."""
    note = note or (lambda text: None)
    root = Path(cfg.source).expanduser()
    listed = _split_pairs(root, cfg)
    train_pairs = listed["train"]
    in_chans = 1 if _all_gray([img for img, _ in train_pairs]) else 3
    size = _input_size(cfg, train_pairs[0][0])
    names = read_class_names(root)
    budget = DecodeBudget(cfg.decode_cache, cfg.cache_memory)
    decoded = {
        name: _decode_pairs(
            pairs,
            in_chans,
            size,
            budget.take(decoded_bytes(len(pairs), mode_for(in_chans), {"size": size})),
        )
        for name, pairs in listed.items()
    }
    ignore = cfg.ignore_index
    two = names is None or len(names) == 2  # a class file may name the binary classes
    binary = two and _binary([d[1] for d in decoded.values()])
    classes = (names or BINARY_CLASSES) if binary else names or _inferred(decoded, ignore)
    masks = {name: _checked_masks(d, classes, ignore, binary, size) for name, d in decoded.items()}
    note(f"decoded {sum(len(p) for p in listed.values())} image/mask pairs at {size[0]}x{size[1]}")
    streamed = [name for name, d in decoded.items() if d[0] is None]
    if streamed:
        note(
            f"note: the {', '.join(streamed)} images are over the decode budget; they are read "
            "from their files per sample (raise data.cache_memory to keep them in memory)"
        )
    data = {
        name: MaskDataset(d[0], masks[name], [p for p, _ in d[2]], (0.0,), (1.0,), d[3])
        for name, d in decoded.items()
    }
    train, val = data["train"], data.get("val")
    if val is None and cfg.val_fraction > 0:
        keep, held = stratified_split([0] * len(train), cfg.val_fraction, seed)
        train, val = train.subset(keep), train.subset(held) if held else None
    mean, std = _mean_std(train.stats)
    pre = make_preprocessing(in_chans, size, mean, std, "none")
    return Splits(
        train=train.with_stats(mean, std),
        val=val.with_stats(mean, std) if val is not None else None,
        test=data["test"].with_stats(mean, std) if "test" in data else None,
        classes=list(classes),
        in_chans=in_chans,
        input_size=size,
        mean=mean,
        std=std,
        name=root.name or "masks",
        preprocessing=pre,
        fingerprint=_fingerprint(listed, classes, ignore, size),
        augment=resolve_augment(cfg, size),
    )


def build_eval(source: str, classes: list[str], preprocessing: dict) -> MaskDataset:
    """The labelled pairs of ``source`` to score a trained model on: its test/ pairs, else its
    val/ pairs, else those at its root; decoded at the model's input size, checked against its
    ``classes`` (0/255 masks when it has two) and normalised as the model was trained."""
    root = Path(source).expanduser()
    listed = _split_pairs(root, DataConfig(source=str(root)))
    pairs = listed.get("test") or listed.get("val") or listed["train"]
    size = tuple(preprocessing["input_size"])
    decoded = _decode_pairs(pairs, preprocessing["in_chans"], size, keep=True)
    binary = len(classes) == 2 and _binary([decoded[1]])
    checked = _checked_masks(decoded, classes, IGNORE, binary, size)
    mean, std = preprocessing["mean"], preprocessing["std"]
    return MaskDataset(decoded[0], checked, [p for p, _ in pairs], mean, std, decoded[3])


def eval_data(source: str, meta: dict):
    """``source`` as labelled data for the model whose file metadata is ``meta``: pairs
    (``build_eval``) for a segmentation model, else ``splits.build_eval``."""
    if meta.get("task") == "segmentation":
        return build_eval(source, meta["classes"], meta["preprocessing"])
    return build_classes_eval(source, meta["classes"], meta["preprocessing"])


def train_pairs(cfg: DataConfig) -> list[tuple[Path, Path]]:
    """The training (image, mask) pairs of ``cfg.source``, from the file listing."""
    return _split_pairs(Path(cfg.source).expanduser(), cfg)["train"]


def peek(cfg: DataConfig) -> tuple[float, int]:
    """(median shorter side in px, number of training pairs) of ``cfg.source``, from the file
    listing and up to ``stats.SIZE_SAMPLE`` image headers: what ``model: auto`` chooses by."""
    pairs = train_pairs(cfg)
    return median_side([image for image, _ in pairs]), len(pairs)


def build_splits(cfg: DataConfig, task: str, seed: int, note=None) -> Splits:
    """The ``Splits`` of a run's data: ``build`` here for segmentation, ``splits.build`` else."""
    return (build if task == "segmentation" else build_classes)(cfg, seed=seed, note=note)


def resolve_augment(cfg: DataConfig, size: tuple[int, int]) -> Augment:
    """The train ``Augment`` of a segmentation run: the ops that move pixels (random scale and
    crop, shift, flips) are applied to the masks too; cutout only to the images. Ops with no
    mask counterpart are refused."""
    aug = augment.resolve(cfg, size)
    unsupported = sorted(set(aug.ops()) - BATCHED_OPS) + [
        name for name in ("mixup", "cutmix") if getattr(aug, name)
    ]
    if unsupported:
        raise CnnkitError(
            f"segmentation does not support {', '.join(unsupported)} yet (image and mask must "
            "move together); turn them off"
        )
    return aug


def _split_pairs(root: Path, cfg: DataConfig) -> dict[str, list[tuple[Path, Path]]]:
    """{"train": pairs, and "val"/"test" when present} from the layout or cfg.val/cfg.test."""
    if not root.is_dir():
        raise CnnkitError(f"data folder not found: {root}")
    found = pair_dirs(root, cfg)
    out = {}
    if found is not None:
        out["train"] = list_pairs(*found)
    else:
        train = pair_dirs(root / "train", cfg)
        if train is None:
            names = " or ".join(f"{a}/+{b}/" for a, b in PAIR_DIRS)
            raise CnnkitError(f"{root} has no image and mask folders ({names}, or in train/)")
        out["train"] = list_pairs(*train)
        for name, options in (("val", VAL_DIRS), ("test", ("test",))):
            for option in options:
                if (pair := pair_dirs(root / option, cfg)) is not None:
                    out[name] = list_pairs(*pair)
                    break
    for name, given in (("val", cfg.val), ("test", cfg.test)):
        if given is not None:
            pair = pair_dirs(Path(given).expanduser(), cfg)
            if pair is None:
                raise CnnkitError(f"data.{name} {given} has no image and mask folders")
            out[name] = list_pairs(*pair)
    return out


def _all_gray(paths: list[Path]) -> bool:
    return all(image_info(p)[2] in GRAY_MODES for p in paths[:200])


def _input_size(cfg: DataConfig, first: Path) -> tuple[int, int]:
    if cfg.input_size is not None:
        return cfg.input_size, cfg.input_size
    width, height, _ = image_info(first)
    return height, width


def _decode_pairs(pairs, in_chans: int, size: tuple[int, int], keep: bool):
    """(uint8 images (N, C, H, W) at ``size`` or None when not ``keep``, raw masks [np (h, w)],
    pairs, stats (N, C, 3)) with each pair's sizes checked; masks are resized later, once their
    values are known good."""
    images = torch.empty((len(pairs), in_chans, *size), dtype=torch.uint8) if keep else None
    stats = torch.empty((len(pairs), in_chans, 3), dtype=torch.float64)
    masks = []
    for i, (image_path, mask_path) in enumerate(pairs):
        image = _decode(image_path, in_chans)
        mask = load_mask(mask_path)
        if tuple(image.shape[1:]) != mask.shape:
            raise CnnkitError(
                f"mask {mask_path} is {mask.shape[1]}x{mask.shape[0]} but its image "
                f"{image_path} is {image.shape[2]}x{image.shape[1]}; they must match"
            )
        image = TF.resize(image, list(size), antialias=True)
        stats[i] = _pixel_stats(image)
        if keep:
            images[i] = image
        masks.append(mask)
    return images, masks, pairs, stats


def _decode(path: Path, in_chans: int) -> torch.Tensor:
    """uint8 (C, h, w) of an image file at its own size."""
    image = torch.from_numpy(np.array(decode(path, mode_for(in_chans))[0]))
    return image.reshape(*image.shape[:2], -1).permute(2, 0, 1)


def _read_image(path: Path, in_chans: int, size: tuple[int, int]) -> torch.Tensor:
    """uint8 (C, H, W) of an image file at ``size``, as ``_decode_pairs`` stores it."""
    return TF.resize(_decode(path, in_chans), list(size), antialias=True)


def _pixel_stats(image: torch.Tensor) -> torch.Tensor:
    """(C, 3): pixel count, sum and sum of squares per channel of uint8 (C, H, W), 0..1 units."""
    x = image.reshape(image.shape[0], -1).double() / 255.0
    count = torch.full((x.shape[0],), float(x.shape[1]), dtype=torch.float64)
    return torch.stack([count, x.sum(1), (x * x).sum(1)], dim=1)


def _binary(all_masks: list[list[np.ndarray]]) -> bool:
    """True when every mask holds only 0 and 255 (and some 255): 0/255 binary masks."""
    values = set()
    for masks in all_masks:
        for mask in masks:
            values.update(np.unique(mask).tolist())
            if not values <= {0, 255}:
                return False
    return 255 in values


def _inferred(decoded: dict, ignore: int) -> list[str]:
    top = max(
        int(np.where(mask == ignore, 0, mask).max(initial=0))
        for _, masks, _, _ in decoded.values()
        for mask in masks
    )
    return [f"class_{i}" for i in range(max(top + 1, 2))]


def _checked_masks(
    decoded, classes: list[str], ignore: int, binary: bool, size: tuple[int, int]
) -> torch.Tensor:
    """uint8 masks (N, H, W) at the images' size (nearest), IGNORE on ignored pixels; a value
    that is neither a class nor ``ignore`` is an error naming the file."""
    _, masks, pairs, _ = decoded
    out = torch.empty((len(masks), *size), dtype=torch.uint8)
    k = len(classes)
    for i, (mask, (_, path)) in enumerate(zip(masks, pairs, strict=True)):
        if binary:
            mask = (mask == 255).astype(np.uint8)
        else:
            bad = np.unique(mask[(mask >= k) & (mask != ignore)])
            if bad.size:
                raise CnnkitError(
                    f"mask {path} has values {bad[:8].tolist()} outside the {k} classes "
                    f"(0..{k - 1}, ignore {ignore}); fix the mask, the class file, or "
                    "data.ignore_index"
                )
            mask = np.where(mask == ignore, IGNORE, mask).astype(np.uint8)
        # nearest with half-pixel centres, as the image's resize (plain nearest is half a
        # source pixel off)
        resized = TF.resize(
            torch.from_numpy(mask)[None], list(out.shape[-2:]), v2.InterpolationMode.NEAREST_EXACT
        )
        out[i] = resized[0]
    return out


def _mean_std(stats: torch.Tensor) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean and std (0..1 units) of the images whose ``stats`` (N, C, 3) these are."""
    count, total, squares = stats.sum(0).unbind(1)  # (C,) each
    mean = total / count
    std = ((squares - count * mean * mean) / (count - 1).clamp(min=1)).clamp(min=0).sqrt()
    std = std.clamp(min=1e-3)
    return tuple(round(v, 4) for v in mean.tolist()), tuple(round(v, 4) for v in std.tolist())


def _fingerprint(listed: dict, classes, ignore: int, size) -> str:
    """Changes when a file is added, removed or modified, or the classes or geometry change."""
    h = hashlib.sha256(json.dumps([list(classes), ignore, list(size)]).encode())
    for name in sorted(listed):
        for image, mask in listed[name]:
            for path in (image, mask):
                stat = path.stat()
                h.update(f"{name}|{path}|{stat.st_size}|{stat.st_mtime_ns}\n".encode())
    return h.hexdigest()[:16]


@functools.cache
def _voc_colours() -> tuple[int, ...]:
    """256 RGB colours, PASCAL VOC's: the bits of the class index spread over R, G and B."""
    colours = []
    for index in range(256):
        r = g = b = 0
        c = index
        for shift in range(7, -1, -1):
            r |= (c & 1) << shift
            g |= ((c >> 1) & 1) << shift
            b |= ((c >> 2) & 1) << shift
            c >>= 3
        colours += [r, g, b]
    return tuple(colours)


def voc_palette() -> list[int]:
    """PASCAL VOC's 256 RGB colours as a flat list (computed once, a new list per call)."""
    return list(_voc_colours())


def overlay(image: np.ndarray, mask: np.ndarray, alpha: float = OVERLAY_ALPHA) -> np.ndarray:
    """An image (H, W, 3) uint8 with each pixel's class colour (``voc_palette``) blended over it;
    ignored pixels (IGNORE) keep the image's own colour. ``mask``: (H, W) class indices."""
    colours = np.asarray(voc_palette(), dtype=np.float32).reshape(256, 3)[mask]
    weight = np.where(mask == IGNORE, 0.0, alpha)[..., None]
    blended = (1 - weight) * image.astype(np.float32) + weight * colours
    return blended.round().astype(np.uint8)
