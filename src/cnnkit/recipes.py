"""Recipes: named presets of the whole config, applied under the user's own settings.

``--recipe speedrun`` (``train.recipe: speedrun``) trains 32x32 images (CIFAR-like) the way the
CIFAR-10 speed-training line of work does (David Page, "How to train your ResNet", 2018;
tysam-code's hlb-CIFAR10; Keller Jordan's airbench, arXiv 2404.00498), with airbench94's
hyperparameters: ``speedrun_net`` (whitened first conv, identity-initialised convs, GELU, fixed
batch-norm scale), Nesterov SGD at batch 1024 with momentum 0.85, a triangular lr schedule, 64x
lr on batch-norm biases, decoupled weight decay, label smoothing 0.2, random crops after 2-pixel
reflect padding, alternating flips (each image flipped every other epoch; pass data.hflip=0 for
data that must not be mirrored, like digits), lookahead every 5 steps, 10 epochs on all training
images (no validation split), and flip + translate test-time augmentation for the final test
score. On a GPU this is the recipe
that reaches 94% on CIFAR-10; on a CPU without bf16 one run of it is slow (about 0.7 GFLOP
per training image), so ``model.kwargs={widths: [32, 128, 128]}`` trades ~4x fewer FLOPs for a
few points. Every key the user sets (flag, config file, override) wins over the preset.
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


def _speedrun(batch_size: int | None) -> dict:
    """The preset; lr and decay follow the batch size when the user picks a number (with
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


RECIPES = {"default": lambda batch_size: {}, "speedrun": _speedrun}


def preset(name: str, batch_size: int | None = None) -> dict:
    """The nested config dict recipe ``name`` sets; ``batch_size``: the user's, if given."""
    if name not in RECIPES:
        raise CnnkitError(f"unknown recipe '{name}'; choose from {', '.join(RECIPES)}")
    return RECIPES[name](batch_size)
