"""The one place where image files are opened and decoded.

Every verb (train, eval, predict, doctor...) reads images through ``load_image`` so that odd files
are treated the same way everywhere: EXIF orientation is applied, transparency is flattened onto
white, 16-bit grayscale is scaled to 8 bits, images over ``MAX_PIXELS`` are refused, and any file
that cannot be decoded raises ``ImageFileError`` naming the file.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from cnnkit.errors import CnnkitError

# Lower-case suffixes that count as images when listing folders; other files are ignored.
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm")

# Same bound as Pillow's decompression-bomb warning (~89.5 megapixels, e.g. 9459 x 9459).
MAX_PIXELS = 89_478_485

MODES = ("RGB", "L")
# Pillow modes that hold no colour: a dataset made only of these is grayscale (in_chans 1).
GRAY_MODES = frozenset({"1", "L", "LA", "La", "I", "I;16", "I;16B", "I;16L", "I;16N", "F"})
_ALPHA_MODES = frozenset({"RGBA", "RGBa", "LA", "La", "PA"})
_WIDE_MODES = frozenset({"I", "I;16", "I;16B", "I;16L", "I;16N", "F"})  # more than 8 bits
# What Pillow raises on files it cannot decode (truncated, corrupt, not an image, too large).
DECODE_ERRORS = (
    UnidentifiedImageError,
    Image.DecompressionBombError,
    OSError,
    ValueError,
    SyntaxError,
    EOFError,
)


class ImageFileError(CnnkitError):
    """An image file that cannot be read; the message names the file.

    It takes a single ``str`` argument so it survives DataLoader worker processes: torch re-raises
    a worker's exception in the main process as ``type(err)(traceback_text)``, which keeps this
    type; ``cnnkit.data.loader`` then restores the original one-line message.
    """


def load_image(path: str | os.PathLike, mode: str = "RGB") -> Image.Image:
    """Decode an image file into a PIL image of ``mode`` ("RGB" or "L"), upright per EXIF.

    Raises ``ImageFileError`` naming the file when it is missing, too large or not a readable image.
    """
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    path = Path(path)
    try:
        with Image.open(path) as img:
            _check_pixels(img, path)
            return decode(img, mode)
    except FileNotFoundError:
        raise ImageFileError(f"image file not found: {path}") from None
    except DECODE_ERRORS as e:
        raise ImageFileError(
            f"cannot read image {path}: {decode_reason(e)}; replace or remove the file"
        ) from None


def decode(img: Image.Image, mode: str = "RGB") -> Image.Image:
    """Decode an opened image (only its header read so far) into ``mode``, upright per EXIF.

    For callers that vet the header first (the server checks format and pixel count before any
    pixel is decoded); animated files give their first frame. Raises one of ``DECODE_ERRORS``.
    """
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    img.load()  # decode now so truncated or corrupt files fail here
    ImageOps.exif_transpose(img, in_place=True)
    return _convert(img, mode)


def image_info(path: str | os.PathLike) -> tuple[int, int, str]:
    """(width, height, Pillow mode) of an image file, read from its header only (fast)."""
    path = Path(path)
    try:
        with Image.open(path) as img:
            return img.width, img.height, img.mode
    except FileNotFoundError:
        raise ImageFileError(f"image file not found: {path}") from None
    except DECODE_ERRORS as e:
        raise ImageFileError(
            f"cannot read image {path}: {decode_reason(e)}; replace or remove the file"
        ) from None


def is_image_file(path: str | os.PathLike) -> bool:
    """True for a visible file whose suffix is in ``IMAGE_EXTENSIONS`` (contents not checked)."""
    name = os.path.basename(path)
    return not name.startswith(".") and name.lower().endswith(IMAGE_EXTENSIONS)


def list_images(folder: str | os.PathLike) -> list[Path]:
    """Image files under ``folder`` (recursively, following links), in sorted order."""
    found = []
    for top, dirs, files in os.walk(folder, followlinks=True):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        found.extend(Path(top, f) for f in sorted(files) if is_image_file(f))
    return found


def _check_pixels(img: Image.Image, path: Path) -> None:
    if img.width * img.height > MAX_PIXELS:
        raise ImageFileError(
            f"image {path} is {img.width}x{img.height} pixels, over the limit of {MAX_PIXELS}; "
            "shrink it or remove it"
        )


def _convert(img: Image.Image, mode: str) -> Image.Image:
    """Convert to ``mode``; alpha is composited onto white, 16-bit/float data scaled to 8 bits."""
    if img.mode in _WIDE_MODES:
        img = _to_8bit(img)
    if img.mode == "P" and "transparency" in img.info:
        img = img.convert("RGBA")
    if img.mode in _ALPHA_MODES:
        rgba = img.convert("RGBA")
        img = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        img.alpha_composite(rgba)
    return img.convert(mode)


def _to_8bit(img: Image.Image) -> Image.Image:
    pixels = np.asarray(img, dtype=np.float64)
    if img.mode.startswith("I"):  # 16-bit integers: 0..65535 -> 0..255
        pixels = pixels / 257.0 if pixels.max(initial=0) > 255 else pixels
    elif pixels.max(initial=0) <= 1.0:  # float images are usually 0..1
        pixels = pixels * 255.0
    return Image.fromarray(np.clip(np.rint(pixels), 0, 255).astype(np.uint8), mode="L")


def decode_reason(e: BaseException) -> str:
    """The first line of a Pillow decoding error, in words a user can act on."""
    if isinstance(e, UnidentifiedImageError):
        return "not an image file that Pillow can decode"
    text = str(e).strip().splitlines()
    return text[0] if text else type(e).__name__
