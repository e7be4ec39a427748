"""Recipes: named presets of the whole config, applied under the user's own settings.

``--recipe airbench94`` trains 32x32 images (CIFAR-like) the way the CIFAR-10 speed-training line
of work does (David Page, "How to train your ResNet", 2018; tysam-code's hlb-CIFAR10; Keller
Jordan's airbench, arXiv 2404.00498), with airbench94's hyperparameters: ``speedrun_net``
(whitened first conv, identity-initialised convs, GELU, fixed batch-norm scale), Nesterov SGD at
batch 1024 with momentum 0.85, a triangular lr schedule, 64x lr on batch-norm biases, decoupled
weight decay, label smoothing 0.2, random crops after 2-pixel reflect padding, alternating flips
(each image flipped every other epoch; pass data.hflip=0 for data that must not be mirrored,
like digits), lookahead every 5 steps, 10 epochs on all training images (no validation split),
and flip + translate test-time augmentation for the final test score.

``--recipe speedrun`` reaches the same accuracy with fewer training FLOPs (benchmarks/cifar10.py
measures both): the same net and augmentation with airbench94_muon's optimizer (Keller Jordan,
2024: Muon for the conv filters, Nesterov SGD for biases and head, batch 2000, the whitening
bias trained for the first 3 epochs only, a linear decay to 0, no lookahead), 8 epochs, and
progressive resizing (fastai's, from "Fast.ai DAWNBench", 2018): the first epochs train on
batches shrunk to 24 then 28 px, the last at 32. About 0.7 GFLOP per training image at 32 px,
0.4 at 24, so on a CPU without bf16 ``model.kwargs={widths: [32, 128, 128]}`` trades ~4x fewer
FLOPs for a few points. Every key the user sets (flag, config file, override) wins over the
preset.
"""

from __future__ import annotations

from cnnkit.errors import CnnkitError

SPEEDRUN_BATCH = 1024
SPEEDRUN_MOMENTUM = 0.85
# airbench94 states lr 11.5 and weight decay 0.0153 "per 1024 examples" on a summed loss, scaled
# by 1024 * (1 + 1 / (1 - momentum)) images (its "kilostep"). cnnkit's loss is the batch mean,
# so lr per image x batch is the lr here; the decay is the shrink per step at peak lr.
_KILOSTEP = 1024 * (1 + 1 / (1 - SPEEDRUN_MOMENTUM))
SPEEDRUN_LR_PER_IMAGE = 11.5 / _KILOSTEP  # 1.5 at batch 1024
SPEEDRUN_WD_PER_IMAGE = 0.0153 / _KILOSTEP  # 0.002 per step at batch 1024
SPEEDRUN_SIDE = 32
# airbench94_muon: batch 2000, summed loss; SGD lr 0.053 for biases and 0.67 for the head, whose
# output it scales by 1/256. Per image of a batch-mean loss that is 0.053 for the biases; for the
# head, an lr on W of y = s W x moves s W by lr s^2, so 0.67 / 256^2 becomes 0.67 / 256^2 * 81
# with speedrun_net's s = 1/9. Decay 2e-6 per image and step, the shrink per step at peak lr.
MUON_BATCH = 2000
MUON_BIAS_LR_PER_IMAGE = 0.053
MUON_HEAD_LR_PER_IMAGE = 0.67 / 256**2 * 81
MUON_WD_PER_IMAGE = 2e-6
MUON_EPOCHS = 8
MUON_PROGRESSIVE_MIN = 0.75  # 24 px for the first epochs, 28, then 32: see benchmarks/cifar10.py
MUON_PROGRESSIVE_EPOCHS = 0.75


def _airbench94(batch_size: int | None) -> dict:
    """airbench94's recipe; lr and decay follow the batch size when the user picks a number (with
    ``auto`` they stay those of batch 1024)."""
    batch = batch_size if isinstance(batch_size, int) else SPEEDRUN_BATCH
    return {
        "data": {
            "batch_size": batch_size or SPEEDRUN_BATCH,
            "input_size": SPEEDRUN_SIDE,
            "pad_crop": 2,
            "pad_mode": "reflect",
            "hflip": "alternate",
            "val_fraction": 0.0,
        },
        "model": {"name": "speedrun_net"},
        "optim": {
            "name": "sgd",
            "lr": SPEEDRUN_LR_PER_IMAGE * batch,
            "momentum": SPEEDRUN_MOMENTUM,
            "nesterov": True,
            "weight_decay": SPEEDRUN_WD_PER_IMAGE * batch,
            "decoupled_wd": True,
            "norm_bias_lr_mult": 64.0,
            "scheduler": "triangle",
        },
        "train": {
            "epochs": 10,
            "label_smoothing": 0.2,
            "lookahead": True,
            "lookahead_every": 5,
            "tta": "flip_translate",
        },
    }


def _speedrun(batch_size: int | None) -> dict:
    """airbench94_muon's optimizer (Muon for the conv filters, the whitening bias trained for the
    first 3 epochs only, a linear decay, batch 2000) with progressive resizing; the head and
    bias lrs are airbench94_muon's, converted from its summed loss and 1/256 head scale to
    cnnkit's batch-mean loss and speedrun_net's 1/9 (``MUON_*`` above)."""
    batch = batch_size if isinstance(batch_size, int) else MUON_BATCH
    recipe = _airbench94(batch_size or MUON_BATCH)  # the same net, data and augmentation
    recipe["optim"].update(
        name="muon",
        lr=MUON_HEAD_LR_PER_IMAGE * batch,
        weight_decay=MUON_WD_PER_IMAGE * batch,
        norm_bias_lr_mult=MUON_BIAS_LR_PER_IMAGE / MUON_HEAD_LR_PER_IMAGE,
        scheduler="linear",
        muon_lr=0.24,
        muon_momentum=0.6,
        whiten_bias_epochs=3,
    )
    recipe["train"].update(
        epochs=MUON_EPOCHS,
        lookahead=False,
        progressive_min=MUON_PROGRESSIVE_MIN,
        progressive_epochs=MUON_PROGRESSIVE_EPOCHS,
    )
    return recipe


RECIPES = {"default": lambda batch_size: {}, "speedrun": _speedrun, "airbench94": _airbench94}


def preset(name: str, batch_size: int | None = None) -> dict:
    """The nested config dict recipe ``name`` sets; ``batch_size``: the user's, if given."""
    if name not in RECIPES:
        raise CnnkitError(f"unknown recipe '{name}'; choose from {', '.join(RECIPES)}")
    return RECIPES[name](batch_size)
