"""Batched executor of the train ``Augment``: whole uint8 batches on the training device,
normalisation fused at the end.

Per-sample augmentation in Python (one crop, one flip, one tensor conversion per image) costs more
than the forward pass of a small network on 32x32 images. Here a batch (B, C, H, W) uint8 already
on the device is augmented with a handful of tensor operations, whatever B is:

    random_resized_crop   a box of random area (``rrc_scale``) and aspect per image, bilinear-
                          resampled to the input size with ``grid_sample`` (one call for the batch)
    pad_crop              a shift by up to ``pad_crop`` px per image, the uncovered border filled
                          with zeros or mirrored (``pad_mode`` zero | reflect)
    rotate                a turn by an angle uniform in [-rotate, rotate] degrees per image about
                          its centre (``rotate``, one ``grid_sample`` for the batch); the corners
                          it uncovers are zero
    hflip                 random with probability p, or ``"alternate"``: image i flipped by a fixed
                          coin of (seed, i), inverted on odd epochs (``augment.alternate_flips``)
    normalise             (x / 255 - mean) / std in float32, in the run's memory layout
    cutout                a ``cutout`` x ``cutout`` square per image set to the mean (0 after
                          normalising), centre anywhere in the image (DeVries & Taylor, 2017)

Segmentation masks (uint8 (B, H, W)) take the same geometry with the same drawn parameters in
``apply_masks``: nearest resampling for the random resized crop and the rotation, the ignore
value where a shift or a turn uncovers pixels (mirrored with ``pad_mode=reflect``), the same
flips; cutout leaves them alone. The per-sample executor does the same one pair at a time
(``SampleAugment.apply_mask``), with this module's ``rotate`` as its kernel.

Auto-augment policies and random erasing have no batched step (``BATCHED_OPS``): a split whose
spec uses them takes the per-sample executor, ``cnnkit.data.transforms.SampleAugment``.

Randomness comes from a generator seeded by (seed, epoch, step), so a batch's augmentation depends
only on those and the images' dataset indices: resumed runs replay it exactly. ``draw`` makes the
random parameters and ``apply`` uses them, so a test can run the per-sample executor on the same
parameters and compare pixels.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from cnnkit.data.augment import Augment, alternate_flips
from cnnkit.data.loader import mix_seed

RRC_RATIO = (3 / 4, 4 / 3)  # aspect range of random resized crops, as torchvision's
RRC_TRIES = 10
BATCHED_OPS = frozenset({"random_resized_crop", "pad_crop", "rotate", "hflip", "cutout"})


def batchable(aug: Augment) -> bool:
    """True when every image op of ``aug`` has a batched step here."""
    return set(aug.ops()) <= BATCHED_OPS


class BatchAugment:
    """Augment and normalise uint8 batches: ``aug(images, indices, epoch, step)`` -> float32.

    ``aug``: the run's ``Augment`` (``Splits.augment``), or None for evaluation (normalise only);
    its ops must be ``batchable``. ``out_size``: (H, W) of the result; the stored images may be
    larger (random resized crop, or a centre crop for evaluation).
    """

    def __init__(
        self,
        aug: Augment | None,
        mean: list[float],
        std: list[float],
        out_size: tuple[int, int],
        *,
        seed: int = 0,
        memory_format: torch.memory_format = torch.contiguous_format,
    ) -> None:
        self.aug = aug or Augment()
        if not batchable(self.aug):
            unbatched = sorted(set(self.aug.ops()) - BATCHED_OPS)
            raise ValueError(f"no batched step for {unbatched}; use transforms.SampleAugment")
        self.out_size = tuple(out_size)
        self.seed = seed
        self.memory_format = memory_format
        mean_t = torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1)
        std_t = torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1)
        self._scale, self._shift = 1.0 / (255.0 * std_t), mean_t / std_t

    def __call__(
        self, images: torch.Tensor, indices: torch.Tensor, epoch: int = 0, step: int = 0
    ) -> torch.Tensor:
        """images uint8 (B, C, H, W) on the device; indices (B,) int64 dataset indices."""
        params = self.draw(images.shape, indices, epoch, step, images.device)
        return self.apply(images, params)

    def draw(self, shape: torch.Size, indices: torch.Tensor, epoch: int, step: int, device) -> dict:
        """Random parameters for a batch of ``shape`` (B, C, H, W) in (epoch, step)."""
        b, _, h, w = shape
        aug = self.aug
        g = torch.Generator(device=device).manual_seed(mix_seed(self.seed, epoch, step))
        params: dict = {}
        if aug.random_resized_crop:
            params["box"] = _rrc_boxes(b, h, w, aug.rrc_scale, g, device)
        if aug.pad_crop:
            span = 2 * aug.pad_crop + 1
            params["shift"] = torch.randint(0, span, (b, 2), generator=g, device=device)
        if aug.rotate:
            turn = torch.rand(b, generator=g, device=device) * 2 - 1
            params["angle"] = turn * aug.rotate
        if aug.hflip == "alternate":
            params["flip"] = alternate_flips(indices.to(device), epoch, self.seed)
        elif aug.hflip:
            params["flip"] = torch.rand(b, generator=g, device=device) < aug.hflip
        if aug.cutout:
            size = torch.tensor(self.out_size, device=device)
            params["cutout"] = (torch.rand(b, 2, generator=g, device=device) * size).long()
        return params

    def apply(self, images: torch.Tensor, params: dict) -> torch.Tensor:
        """Augment uint8 ``images`` with ``params`` from ``draw``; returns normalised float32."""
        # geometry on uint8 where possible (4x less memory traffic than float32)
        if "box" in params:
            x = _resized_crop(images, params["box"], self.out_size)  # float32 0..255
        else:
            x = _center_crop(images, self.out_size)
        if "shift" in params:
            x = _shift(x, params["shift"], self.aug.pad_crop, self.aug.pad_mode)
        if "angle" in params:
            x = rotate(x, params["angle"])
        if "flip" in params:
            x = torch.where(params["flip"].view(-1, 1, 1, 1), x.flip(3), x)
        x = self._normalise(x)
        if "cutout" in params:
            x = _cutout(x, params["cutout"], self.aug.cutout)
        return x

    def apply_masks(self, masks: torch.Tensor, params: dict, fill: int) -> torch.Tensor:
        """The geometry of ``apply`` with the same ``params`` on masks uint8 (B, H, W): nearest
        resampling, uncovered pixels set to ``fill`` (the ignore value) unless mirrored, cutout
        left out (the pixels keep their class). Returns int64 (B, out_h, out_w)."""
        x = masks[:, None]  # (B, 1, H, W)
        if "box" in params:  # nearest keeps class values; float32 holds 0..255 exactly
            x = _resized_crop(x, params["box"], self.out_size, mode="nearest")
        else:
            x = _center_crop(x, self.out_size).to(torch.float32)
        if "shift" in params:
            x = _shift(x, params["shift"], self.aug.pad_crop, self.aug.pad_mode, float(fill))
        if "angle" in params:
            x = rotate(x, params["angle"], fill=float(fill))
        if "flip" in params:
            x = torch.where(params["flip"].view(-1, 1, 1, 1), x.flip(3), x)
        return x[:, 0].round().long()

    def _normalise(self, x: torch.Tensor) -> torch.Tensor:
        """uint8/float (0..255) -> float32 (x / 255 - mean) / std in the run's memory layout;
        the same two float operations as the per-sample ToNormalizedTensor, so the same bits."""
        scale, shift = self._scale.to(x.device), self._shift.to(x.device)
        x = x.contiguous(memory_format=self.memory_format)  # permute while still small (uint8)
        x = x.to(torch.float32, copy=True)  # keeps the memory format
        return x.mul_(scale).sub_(shift)


def _rrc_boxes(b: int, h: int, w: int, scale, g: torch.Generator, device) -> torch.Tensor:
    """(B, 4) float boxes (top, left, height, width) in pixels, drawn as torchvision's
    RandomResizedCrop does: up to RRC_TRIES tries of area and log-aspect, else the whole image
    clipped to the aspect range."""
    area = h * w
    tries = torch.rand(b, RRC_TRIES, 4, generator=g, device=device)
    target = area * (scale[0] + (scale[1] - scale[0]) * tries[..., 0])
    log_lo, log_hi = math.log(RRC_RATIO[0]), math.log(RRC_RATIO[1])
    aspect = torch.exp(log_lo + (log_hi - log_lo) * tries[..., 1])
    cw = torch.sqrt(target * aspect).round()
    ch = torch.sqrt(target / aspect).round()
    ok = (cw >= 1) & (cw <= w) & (ch >= 1) & (ch <= h)
    first = torch.where(ok.any(1), ok.float().argmax(1), torch.full((b,), -1, device=device))
    pick = first.clamp(min=0)[:, None]
    cw, ch = cw.gather(1, pick)[:, 0], ch.gather(1, pick)[:, 0]
    top = (tries[..., 2].gather(1, pick)[:, 0] * (h - ch + 1)).floor()
    left = (tries[..., 3].gather(1, pick)[:, 0] * (w - cw + 1)).floor()
    # fallback: the largest centred box within the aspect range
    ratio = w / h
    fw = float(w) if ratio <= RRC_RATIO[1] else round(h * RRC_RATIO[1])
    fh = float(h) if ratio >= RRC_RATIO[0] else round(w / RRC_RATIO[0])
    fw, fh = (float(w), float(h)) if RRC_RATIO[0] <= ratio <= RRC_RATIO[1] else (fw, fh)
    fallback = torch.tensor([(h - fh) // 2, (w - fw) // 2, fh, fw], device=device)
    boxes = torch.stack([top, left, ch, cw], dim=1)
    return torch.where((first < 0)[:, None], fallback, boxes)


def _resized_crop(
    images: torch.Tensor, box: torch.Tensor, out_size, mode: str = "bilinear"
) -> torch.Tensor:
    """Resample each box to ``out_size`` (half-pixel centres, edges clamped): for bilinear the
    same sampling as cropping then ``F.interpolate(mode="bilinear", align_corners=False)``;
    ``mode="nearest"`` for masks. float32 (B, C, out_h, out_w)."""
    grid = _crop_grid(images.shape, box, out_size, images.device)
    x = images.to(torch.float32)
    return F.grid_sample(x, grid, mode=mode, padding_mode="border", align_corners=False)


def _crop_grid(shape, box: torch.Tensor, out_size, dev) -> torch.Tensor:
    """grid_sample's (B, out_h, out_w, 2) sampling grid of each box (top, left, height, width)."""
    b, _, h, w = shape
    out_h, out_w = out_size
    top, left, bh, bw = box.unbind(1)
    ys = (torch.arange(out_h, device=dev) + 0.5)[None] * (bh / out_h)[:, None] - 0.5  # (B, out_h)
    xs = (torch.arange(out_w, device=dev) + 0.5)[None] * (bw / out_w)[:, None] - 0.5
    ys = (ys.clamp(min=0) + top[:, None]).minimum((top + bh - 1)[:, None])
    xs = (xs.clamp(min=0) + left[:, None]).minimum((left + bw - 1)[:, None])
    # grid_sample's normalised coordinates with align_corners=False: pixel p -> (2p + 1) / n - 1
    gy = (2 * ys + 1) / h - 1
    gx = (2 * xs + 1) / w - 1
    return torch.stack(
        [gx[:, None, :].expand(b, out_h, out_w), gy[:, :, None].expand(b, out_h, out_w)], dim=3
    )


def _center_crop(images: torch.Tensor, out_size) -> torch.Tensor:
    _, _, h, w = images.shape
    out_h, out_w = out_size
    if (h, w) == (out_h, out_w):
        return images
    top, left = (h - out_h) // 2, (w - out_w) // 2
    return images[:, :, top : top + out_h, left : left + out_w]


def _shift(
    x: torch.Tensor, shift: torch.Tensor, pad: int, mode: str, fill: float = 0.0
) -> torch.Tensor:
    """Crop (H, W) at offset ``shift`` (B, 2) = (dy, dx) in [0, 2 pad] from the padded batch.

    The padded batch's (2 pad + 1)^2 windows are a view (``unfold``); one index picks each
    image's window, on any device. On one CPU thread, uint8 (1024, 3, 32, 32), pad 2: 2.6 ms,
    against 5.9 ms for slice copies of the images grouped by offset."""
    _, _, h, w = x.shape
    if mode == "reflect":
        padded = F.pad(x, (pad, pad, pad, pad), mode="reflect")
    else:  # ``fill``: 0 for images, the ignore value for masks
        padded = F.pad(x, (pad, pad, pad, pad), value=fill)
    windows = padded.unfold(2, h, 1).unfold(3, w, 1)  # (B, C, 2 pad + 1, 2 pad + 1, H, W)
    batch = torch.arange(x.shape[0], device=x.device)
    return windows[batch, :, shift[:, 0], shift[:, 1]]  # (B, C, H, W)


def rotate(x: torch.Tensor, angle: torch.Tensor, fill: float | None = None) -> torch.Tensor:
    """Turn each image of ``x`` (B, C, H, W) counter-clockwise by ``angle`` (B,) degrees about
    its centre, in pixel units whatever the aspect. Bilinear, with zeros where the turn uncovers
    pixels; with ``fill`` (masks), nearest and ``fill`` there. float32 out."""
    b, _, h, w = x.shape
    rad = angle.to(torch.float32) * (math.pi / 180)
    cos, sin = rad.cos(), rad.sin()
    zero = torch.zeros_like(cos)
    # output -> input coordinates, normalised per axis: the pixel rotation scaled by h/w, w/h
    theta = torch.stack(
        [torch.stack([cos, -sin * h / w, zero], 1), torch.stack([sin * w / h, cos, zero], 1)], 1
    )
    grid = F.affine_grid(theta, [b, 1, h, w], align_corners=False)
    x = x.to(torch.float32)
    if fill is None:
        return F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    # values shifted by one so that 0 marks the uncovered pixels
    out = F.grid_sample(x + 1, grid, mode="nearest", padding_mode="zeros", align_corners=False)
    return torch.where(out == 0, fill, out - 1)


def _cutout(x: torch.Tensor, centre: torch.Tensor, size: int) -> torch.Tensor:
    """Zero a size x size square (clipped at the borders) around ``centre`` (B, 2) = (y, x)."""
    _, _, h, w = x.shape
    dev = x.device
    half = size // 2
    y0 = (centre[:, 0] - half)[:, None]
    x0 = (centre[:, 1] - half)[:, None]
    ys, xs = torch.arange(h, device=dev)[None], torch.arange(w, device=dev)[None]
    inside_y = (ys >= y0) & (ys < y0 + size)  # (B, H)
    inside_x = (xs >= x0) & (xs < x0 + size)  # (B, W)
    mask = inside_y[:, None, :, None] & inside_x[:, None, None, :]
    return x.masked_fill(mask, 0.0)
