"""What describes a training split: channels, input size and per-channel mean/std.

In-memory datasets keep their native size (resized to ``data.input_size`` when set). Files and
shards: ``data.input_size`` when set, else from the median shorter side s of up to SIZE_SAMPLE
images (headers only): s <= 40 px -> 32, s <= 80 px -> 64, else 224 (resize the shorter side,
then center-crop). One channel when every sampled image is grayscale, else three. Mean/std are
measured on up to STATS_SAMPLE training images at the input size, decoded as for evaluation.
"""

from __future__ import annotations

from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch

from cnnkit.data import builtins, cache, shards
from cnnkit.data.datasets import TensorImageDataset
from cnnkit.data.host import cpu_count
from cnnkit.data.images import GRAY_MODES, ImageFileError, image_info, load_image
from cnnkit.data.loader import MAX_AUTO_WORKERS
from cnnkit.data.transforms import eval_transform, image_mode
from cnnkit.errors import CnnkitError

SIZE_SAMPLE = 200  # images whose headers decide a folder's input size and channels
STATS_SAMPLE = 500  # images decoded to compute a folder's mean/std

Stats = tuple[tuple[float, ...], tuple[float, ...]]  # (mean, std) per channel, 0..1 units


def geometry(train, input_size: int | None) -> tuple[int, tuple[int, int], str]:
    """(in_chans, (H, W), crop) of a training split; see the module docstring."""
    if isinstance(train, TensorImageDataset):
        _, chans, height, width = train.images.shape
        size = (input_size, input_size) if input_size else (height, width)
        return chans, size, "none"
    if isinstance(train, shards.ShardDataset):
        infos = train.headers(SIZE_SAMPLE)  # the first images of the first shards
    else:
        infos = _headers(even_sample(train.paths, SIZE_SAMPLE))
    chans = 1 if all(mode in GRAY_MODES for _, _, mode in infos) else 3
    if input_size is None:
        side = float(np.median([min(w, h) for w, h, _ in infos]))
        input_size = 32 if side <= 40 else 64 if side <= 80 else 224
    return chans, (input_size, input_size), "center"


# native sides of the built-ins, known without loading them
BUILTIN_SIDES = {"digits": 8, "mnist": 28, "fashion-mnist": 28, "cifar10": 32, "cifar100": 32}


def builtin_side(source: str) -> float | None:
    key = builtins.builtin_key(source)
    return None if key is None else float(BUILTIN_SIDES[key])


def native_side(train) -> float:
    """Median shorter side (px) of up to SIZE_SAMPLE training images, from their headers."""
    if isinstance(train, TensorImageDataset):
        return float(min(train.images.shape[-2:]))
    if isinstance(train, shards.ShardDataset):
        infos = train.headers(SIZE_SAMPLE)
        return float(np.median([min(w, h) for w, h, _ in infos]))
    return median_side(train.paths)


def median_side(paths: Sequence) -> float:
    """Median shorter side (px) of up to SIZE_SAMPLE of ``paths``, evenly spread, from their
    headers (unreadable ones left to the pre-flight check)."""
    infos = _headers(even_sample(paths, SIZE_SAMPLE))
    return float(np.median([min(w, h) for w, h, _ in infos]))


def _headers(paths: Sequence) -> list[tuple[int, int, str]]:
    """(width, height, mode) of the files whose header can be read; bad files are left to the
    pre-flight check, which names every one (raises only when none is readable)."""
    infos, first_error = [], None
    for path in paths:
        try:
            infos.append(image_info(path))
        except ImageFileError as e:
            first_error = first_error or e
    if not infos and first_error is not None:
        raise first_error
    return infos


def given(mean: list | None, std: list | None, in_chans: int) -> Stats:
    """``data.mean``/``data.std`` from the config: both set, one value per channel, std > 0."""
    if mean is None or std is None or len(mean) != in_chans or len(std) != in_chans:
        raise CnnkitError(
            f"data.mean and data.std need {in_chans} value(s) each for this {in_chans}-channel "
            f"data, got mean={mean} std={std}"
        )
    if not all(isinstance(v, int | float) for v in [*mean, *std]) or min(std) <= 0:
        raise CnnkitError(f"data.mean/std must be numbers with std > 0, got {mean} / {std}")
    return tuple(float(v) for v in mean), tuple(float(v) for v in std)


def measured(train, plain: dict) -> Stats:
    """Per-channel mean/std (0..1 units) of up to STATS_SAMPLE training images at the input size
    (resized and cropped as for evaluation; ``plain``: the preprocessing without mean/std)."""
    if isinstance(train, shards.ShardDataset):
        dataset = train.with_transform(eval_transform(plain), image_mode(plain))
        samples = [image for image, _ in shards.first_samples(dataset, STATS_SAMPLE)]
    else:
        samples = _uint8_samples(train, plain, even_sample(range(len(train)), STATS_SAMPLE))
    total = torch.zeros(3, plain["in_chans"], dtype=torch.float64)  # count, sum, sum of squares
    for image in samples:
        pixels = image.double().flatten(1)  # (C, H * W)
        if image.dtype == torch.uint8:
            pixels = pixels / 255.0
        total[0] += pixels.shape[1]
        total[1] += pixels.sum(1)
        total[2] += (pixels**2).sum(1)
    mean = total[1] / total[0]
    std = (total[2] / total[0] - mean**2).clamp_min(1e-12).sqrt()
    return tuple(mean.tolist()), tuple(std.clamp_min(1e-3).tolist())


def _uint8_samples(train, plain: dict, indices: list[int]) -> list[torch.Tensor]:
    """uint8 (C, H, W) images of ``train`` at the eval geometry: from the decoded tensor when it
    holds that geometry, else decoded from the files the same way (so both agree bit for bit)."""
    geometry = cache.stored_geometry(plain, False)
    rows = torch.as_tensor(indices, dtype=torch.long)
    if isinstance(train, TensorImageDataset):
        images = train.images[rows]
        if list(images.shape[-2:]) != list(geometry["size"]):
            images = cache.geometry_ops(geometry)(images)
        return list(images)
    decoded = train.decoded  # a FileImageDataset's, when the pre-flight decoded it
    if decoded is not None and decoded.geometry == geometry:
        return list(decoded.images[rows])
    ops, mode = cache.geometry_ops(geometry), image_mode(plain)

    def one(index: int) -> torch.Tensor:
        image = load_image(train.paths[index], mode)
        return torch.from_numpy(cache.to_geometry(image, geometry, ops).copy())

    with ThreadPoolExecutor(max_workers=min(cpu_count(), MAX_AUTO_WORKERS)) as pool:
        return list(pool.map(one, indices))


def even_sample(items: Sequence, count: int) -> list:
    """Up to ``count`` items spread evenly over ``items`` (deterministic)."""
    if len(items) <= count:
        return list(items)
    return [items[i] for i in np.linspace(0, len(items) - 1, count).round().astype(int)]
