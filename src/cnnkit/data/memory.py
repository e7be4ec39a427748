"""Loaders for a run: in memory with batched augmentation when the data fits, else streaming.

``run_loader`` is what training and evaluation call. When the split's images fit the decode
budget (see ``cnnkit.data.cache``) they are held as one uint8 tensor (N, C, H, W) - on the GPU
when training there and it fits - and ``MemoryLoader`` cuts batches from it and augments them
with ``BatchAugment`` on the device: no worker processes, no per-sample Python. Augmentations
that exist only per sample (auto-augment policies, random erasing) keep the DataLoader, fed from
the decoded tensor. Data over the budget streams from the files through DataLoader workers.

Batch order is the same permutation of (seed, epoch) as ``EpochSampler`` gives the DataLoader,
so both paths visit the same images in the same batches; only the augmentation draws differ.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import torch
from torch.utils.data import Dataset

from cnnkit.config import DataConfig
from cnnkit.data import cache
from cnnkit.data.augment import Augment
from cnnkit.data.batchaug import BatchAugment, batchable
from cnnkit.data.datasets import FileImageDataset, TensorImageDataset
from cnnkit.data.host import cache_root
from cnnkit.data.loader import EpochSampler, auto_workers, make_loader
from cnnkit.data.masks import IGNORE, MaskDataset, MaskSamples
from cnnkit.data.transforms import SampleAugment, image_mode

GPU_FRACTION = 0.3  # share of free GPU memory that decoded images may take on the device


class MemoryLoader:
    """Batches (float32 normalised images on ``device``, int64 labels) from a uint8 tensor.

    ``len(loader)`` batches per epoch; call ``set_epoch(e)`` (or ``loader.sampler.set_epoch``)
    before iterating epoch e. Train loaders shuffle and drop the last partial batch.
    """

    def __init__(
        self,
        images: torch.Tensor,
        targets,
        batch_size: int,
        augment: BatchAugment,
        *,
        train: bool,
        seed: int,
        device: torch.device,
        drop_last: bool | None = None,
        rank: int = 0,
        world_size: int = 1,
        weights=None,
    ) -> None:
        self.images = images  # uint8 (N, C, H, W), on the CPU or already on the device
        if isinstance(targets, torch.Tensor):  # masks (N, H, W) uint8: kept small until a batch
            self.targets = targets
        else:
            self.targets = torch.as_tensor(list(targets), dtype=torch.long)
        self.batch_size, self.augment, self.device = batch_size, augment, torch.device(device)
        self.sampler = EpochSampler(
            len(self.targets),
            shuffle=train,
            seed=seed,
            rank=rank,
            world_size=world_size,
            weights=weights,
        )
        if drop_last is None:
            drop_last = train and len(self.targets) > batch_size * world_size
        self.drop_last = drop_last
        if self.images.device.type == "cpu" and self.device.type == "cuda":
            self.targets = self.targets.pin_memory()

    def set_epoch(self, epoch: int) -> None:
        self.sampler.set_epoch(epoch)

    def __len__(self) -> int:
        n = len(self.sampler)
        return n // self.batch_size if self.drop_last else -(-n // self.batch_size)

    @property
    def num_images(self) -> int:
        return len(self.targets)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        epoch = self.sampler.epoch
        order = torch.tensor(self.sampler.indices(), dtype=torch.long)
        on_device = self.images.device == self.device
        first = self.sampler.start // self.batch_size  # steps already done (resumed mid-epoch)
        for step in range(len(self)):
            index = order[step * self.batch_size : (step + 1) * self.batch_size]
            if on_device:
                images = self.images[index.to(self.device)]
            else:
                images = self.images[index]
                if self.device.type == "cuda":
                    images = images.pin_memory()
                images = images.to(self.device, non_blocking=True)
            labels = self.targets[index].to(self.device, non_blocking=True)
            yield self._batch(images, labels, index, epoch, first + step)

    def _batch(self, images, labels, index, epoch: int, step: int):
        return self.augment(images, index, epoch, step), labels


class MaskLoader(MemoryLoader):
    """A ``MemoryLoader`` whose targets are masks uint8 (N, H, W): each batch's images and masks
    go through the same drawn augmentation (``BatchAugment.apply_masks``); yields (float32
    images, int64 masks (B, H, W) with IGNORE on ignored pixels)."""

    def _batch(self, images, masks, index, epoch: int, step: int):
        params = self.augment.draw(images.shape, index, epoch, step, images.device)
        out = self.augment.apply(images, params)
        return out, self.augment.apply_masks(masks, params, fill=IGNORE)


def run_loader(
    dataset: Dataset,
    preprocessing: dict,
    aug: Augment | None,
    cfg: DataConfig,
    batch_size: int,
    *,
    train: bool,
    seed: int,
    device: torch.device,
    memory_format: torch.memory_format = torch.contiguous_format,
    note: Callable[[str], None] = cache.stderr_note,
    rank: int = 0,
    world_size: int = 1,
    weights=None,
):
    """The fastest loader for ``dataset`` (a split from ``cnnkit.data.build``/``build_eval``,
    or a segmentation split from ``cnnkit.data.masks.build``).

    ``aug``: the train augmentation (``Splits.augment``), or None for evaluation.
    ``weights``: per-sample weights for class-balanced sampling (with replacement).
    """
    kw = dict(train=train, seed=seed, rank=rank, world_size=world_size, weights=weights)
    if isinstance(dataset, MaskDataset) and not dataset.in_memory:  # over the decode budget
        augment = SampleAugment(aug, preprocessing, seed) if aug is not None else None
        samples = MaskSamples(dataset, augment, preprocessing["mean"], preprocessing["std"])
        return make_loader(samples, batch_size, num_workers=cfg.num_workers, **kw)
    if isinstance(dataset, MaskDataset):
        return _mask_loader(dataset, preprocessing, aug, batch_size, device, memory_format, kw)
    images = _images(dataset, preprocessing, aug, cfg, note)
    if images is None:
        return make_loader(
            dataset,
            batch_size,
            num_workers=cfg.num_workers,
            pin_memory=device.type == "cuda",
            **kw,
        )
    if aug is not None and not batchable(aug):
        # the per-sample executor works on uint8 tensors as on PIL images (resizes to the stored
        # size are no-ops)
        memory = TensorImageDataset(images, dataset.targets, dataset.transform)
        return make_loader(memory, batch_size, num_workers=cfg.num_workers, **kw)
    images = _maybe_to_gpu(images, device)
    augment = BatchAugment(
        aug,
        preprocessing["mean"],
        preprocessing["std"],
        tuple(preprocessing["input_size"]),
        seed=seed,
        memory_format=memory_format,
    )
    return MemoryLoader(images, dataset.targets, batch_size, augment, device=device, **kw)


def _mask_loader(dataset, preprocessing, aug, batch_size, device, memory_format, kw) -> MaskLoader:
    images, masks = _maybe_to_gpu(dataset.images, device), dataset.masks
    if images.device != masks.device:
        masks = masks.to(images.device)
    augment = BatchAugment(
        aug,
        preprocessing["mean"],
        preprocessing["std"],
        tuple(preprocessing["input_size"]),
        seed=kw["seed"],
        memory_format=memory_format,
    )
    return MaskLoader(images, masks, batch_size, augment, device=device, **kw)


def _images(dataset, preprocessing: dict, aug: Augment | None, cfg: DataConfig, note):
    """The split as uint8 (N, C, H, W) at the stored geometry, or None when it must stream
    (always for datasets cnnkit did not make, such as a task's own)."""
    if not isinstance(dataset, FileImageDataset | TensorImageDataset):
        return None
    geometry = cache.stored_geometry(preprocessing, aug is not None and aug.random_resized_crop)
    mode = image_mode(preprocessing)
    decoded = dataset.decoded if isinstance(dataset, FileImageDataset) else None
    if decoded is not None and decoded.geometry == geometry and dataset.mode == mode:
        return decoded.images  # decoded once by data.build (its pre-flight check)
    nbytes = cache.decoded_bytes(len(dataset), mode, geometry)
    budget = cache.DecodeBudget(cfg.decode_cache, cfg.cache_memory)
    if not budget.take(nbytes):
        if budget.limited:
            note(
                f"note: {len(dataset)} images take {nbytes / 2**30:.1f} GiB decoded, over the "
                "decode budget; streaming them from the files (raise data.cache_memory to decode "
                "once)"
            )
        return None
    if isinstance(dataset, TensorImageDataset):
        return _resized(dataset.images, geometry)
    return cache.decoded_images(
        dataset.paths,
        dataset.mode,
        geometry,
        cache_root(cfg.cache_dir),
        workers=auto_workers(dataset),
        note=note,
    )


def _resized(images: torch.Tensor, geometry: dict) -> torch.Tensor:
    """Images held in memory, brought to the stored geometry once (in chunks)."""
    if list(images.shape[-2:]) == list(geometry["size"]):
        return images
    ops = cache.geometry_ops(geometry)
    return torch.cat([ops(chunk) for chunk in images.split(4096)])


def _maybe_to_gpu(images: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Move the decoded images to the GPU when they take under GPU_FRACTION of its free memory."""
    if device.type != "cuda":
        return images
    free, _ = torch.cuda.mem_get_info(device)
    if images.numel() * images.element_size() < GPU_FRACTION * free:
        return images.to(device)
    return images
