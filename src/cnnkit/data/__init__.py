"""Data: sources (built-ins, folders, CSV) -> Splits, transforms, and exactly resumable loaders.

``build(cfg.data, seed)`` returns ``Splits`` whose datasets yield (x float32 (C, H, W), y int);
``make_loader`` turns one into a DataLoader whose epoch ``e`` depends only on (seed, e).
"""

from cnnkit.data.images import IMAGE_EXTENSIONS, ImageFileError, list_images, load_image
from cnnkit.data.loader import EpochSampler, make_loader
from cnnkit.data.sources import BUILTINS, Splits, build, build_eval
from cnnkit.data.transforms import batch_mix, eval_transform, image_mode, train_transform

__all__ = [
    "BUILTINS",
    "IMAGE_EXTENSIONS",
    "EpochSampler",
    "ImageFileError",
    "Splits",
    "batch_mix",
    "build",
    "build_eval",
    "eval_transform",
    "image_mode",
    "list_images",
    "load_image",
    "make_loader",
    "train_transform",
]
