"""Joint image and mask augmentation with small rotations, on both paths: batched on the device
(images decoded in memory, ``MaskLoader``) and per sample (images over the decode budget, read
from their files, ``MaskSamples``). The images are coloured by class (red, green, blue shapes on
black), so a pixel's class can be read back from its colour after augmentation."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from cnnkit.config import DataConfig
from cnnkit.data import masks
from cnnkit.data.augment import Augment
from cnnkit.data.batchaug import BatchAugment
from cnnkit.data.memory import MaskLoader, run_loader
from cnnkit.data.transforms import SampleAugment, make_preprocessing
from cnnkit.tasks.segmentation import IGNORE

COLOURS = np.array([[0, 0, 0], [255, 0, 0], [0, 255, 0], [0, 0, 255]], np.uint8)


def colour_pairs(root, count: int = 8, side: int = 40):
    """Rectangles of classes 1-3 on background 0; the image is the class's colour."""
    rng = np.random.default_rng(0)
    for name in ("images", "masks"):
        (root / name).mkdir(parents=True, exist_ok=True)
    for i in range(count):
        mask = np.zeros((side, side), np.uint8)
        for cls in (1, 2, 3):
            y, x = rng.integers(0, side - 12, 2)
            mask[y : y + 12, x : x + 10] = cls
        Image.fromarray(COLOURS[mask]).save(root / "images" / f"c{i}.png")
        Image.fromarray(mask).save(root / "masks" / f"c{i}.png")
    (root / "classes.txt").write_text("background\nred\ngreen\nblue\n")
    return root


def assert_aligned(images: torch.Tensor, got: torch.Tensor, mean, std) -> None:
    """images: normalised float (B, 3, H, W); got: int64 masks (B, H, W). Every pixel whose
    colour is a class's pure colour (not a blend at an edge) has that class in the mask, unless
    the mask ignores it (rotated or shifted in from outside)."""
    rgb = images * torch.tensor(std).view(1, 3, 1, 1) + torch.tensor(mean).view(1, 3, 1, 1)
    rgb = (rgb * 255).round().permute(0, 2, 3, 1)  # (B, H, W, 3)
    distance = (rgb[..., None, :] - torch.tensor(COLOURS).float()).abs().amax(-1)  # (B,H,W,4)
    nearest = distance.argmin(-1)
    pure = distance.amin(-1) <= 6
    valid = got != IGNORE
    share = float((valid & pure).sum() / valid.sum())
    assert share > 0.7, share  # only edges blend (zoomed, then turned: a band of 1-2 px)
    wrong = (nearest != got) & valid & pure
    assert not wrong.any(), f"{int(wrong.sum())} pixels: a class in the image, another in the mask"


AUGMENTS = [
    Augment(rotate=30.0),
    Augment(rotate=15.0, pad_crop=4, hflip=0.5),
    Augment(random_resized_crop=True, rrc_scale=(0.4, 1.0), rotate=20.0, hflip=0.5),
]


@pytest.mark.parametrize("aug", AUGMENTS, ids=lambda a: "-".join(a.ops()))
@pytest.mark.parametrize("path", ["batched", "per_sample"])
def test_masks_follow_their_rotated_images(tmp_path, aug, path):
    data = colour_pairs(tmp_path / "d")
    cache = "on" if path == "batched" else "off"  # off: the images are read per sample
    splits = masks.build(DataConfig(source=str(data), val_fraction=0, decode_cache=cache), seed=0)
    assert splits.train.in_memory == (path == "batched")
    pre = splits.preprocessing
    cfg = DataConfig(source=str(data), num_workers=0)
    loader = run_loader(
        splits.train, pre, aug, cfg, 8, train=True, seed=3, device=torch.device("cpu")
    )
    assert isinstance(loader, MaskLoader) == (path == "batched")
    loader.set_epoch(1) if hasattr(loader, "set_epoch") else loader.sampler.set_epoch(1)
    images, got = next(iter(loader))
    assert images.shape == (8, 3, 40, 40) and got.shape == (8, 40, 40)
    assert_aligned(images, got, pre["mean"], pre["std"])
    ignored = (got == IGNORE).float().mean()
    assert 0.005 < ignored < 0.4  # the corners the turn uncovered, and only those


def test_both_executors_turn_by_the_same_angle():
    """The per-sample ``apply_mask`` and the batched ``apply_masks`` give the same masks for the
    same drawn parameters (shift, turn, flip; nearest, ignore value on uncovered pixels)."""
    aug = Augment(rotate=25.0, pad_crop=3, hflip=0.5)
    g = torch.Generator().manual_seed(0)
    mask = torch.randint(0, 4, (6, 24, 20), generator=g, dtype=torch.uint8)
    batch = BatchAugment(aug, [0.0], [1.0], (24, 20), seed=2)
    params = batch.draw((6, 1, 24, 20), torch.arange(6), epoch=0, step=1, device="cpu")
    ours = batch.apply_masks(mask, params, fill=IGNORE)
    sample = SampleAugment(aug, make_preprocessing(1, (24, 20), [0.0], [1.0], "none"))
    for i in range(6):
        one = {
            "shift": tuple(params["shift"][i].tolist()),
            "angle": float(params["angle"][i]),
            "flip": bool(params["flip"][i]),
        }
        assert torch.equal(sample.apply_mask(mask[i], one, IGNORE), ours[i])
    assert (ours == IGNORE).any() and params["angle"].abs().max() <= 25.0
