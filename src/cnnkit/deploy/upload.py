"""Vetting uploaded image bytes before any pixel is decoded (used by the server).

Order matters, cheapest and safest first: the format comes from the file's magic bytes (415 for
anything but JPEG/PNG/WebP/BMP/GIF), the size from its header (413 over ``max_pixels``: a
decompression bomb is refused without being decoded), and only then does
``data.images.decode_opened`` decode it, first frame only (400 with Pillow's reason when it cannot).
"""

from __future__ import annotations

import io
import warnings

from PIL import Image

from cnnkit.data.images import DECODE_ERRORS, decode_opened, decode_reason

# Magic bytes -> the Pillow formats allowed to open such a file (cameras write JPEG as MPO).
MAGIC = (
    (b"\xff\xd8\xff", ("JPEG", "MPO")),
    (b"\x89PNG\r\n\x1a\n", ("PNG",)),
    (b"GIF87a", ("GIF",)),
    (b"GIF89a", ("GIF",)),
    (b"BM", ("BMP",)),
)
ACCEPTED = "JPEG, PNG, WebP, BMP or GIF"


class UploadError(Exception):
    """A request the server refuses, with the HTTP status to answer and a reason for the user."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status, self.message = status, message


def sniff(data: bytes) -> tuple[str, ...] | None:
    """Pillow format names for ``data``'s magic bytes, or None when it is not an accepted format."""
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return ("WEBP",)
    for magic, formats in MAGIC:
        if data.startswith(magic):
            return formats
    return None


def open_checked(data: bytes, name: str, max_pixels: int) -> Image.Image:
    """Open ``data`` reading only its header; refuse other formats and oversized images."""
    formats = sniff(data)
    if formats is None:
        raise UploadError(415, f"{name}: unsupported image format; send {ACCEPTED}")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # our limit rules
            img = Image.open(io.BytesIO(data), formats=formats)
    except Image.DecompressionBombError as e:
        raise UploadError(413, f"{name}: {e}") from None
    except DECODE_ERRORS as e:
        raise UploadError(400, f"{name}: cannot decode image: {decode_reason(e)}") from None
    if img.width * img.height > max_pixels:
        img.close()
        raise UploadError(
            413,
            f"{name}: {img.width}x{img.height} pixels is over the server's limit of {max_pixels}",
        )
    return img


def decode_checked(img: Image.Image, name: str, mode: str) -> Image.Image:
    """Decode a vetted image (first frame) into ``mode``; 400 with the reason when it fails."""
    try:
        with img:
            return decode_opened(img, mode)
    except DECODE_ERRORS as e:
        raise UploadError(400, f"{name}: cannot decode image: {decode_reason(e)}") from None
