"""Batched top-k prediction for image files, folders and glob patterns, from any model format.

Uses only the model and the preprocessing stored in its model file, so predictions match what
the model saw at evaluation time during training.
"""

from __future__ import annotations

import glob
import io
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from cnnkit import tasks
from cnnkit.data import load_image
from cnnkit.data.images import list_images
from cnnkit.data.masks import overlay, voc_palette
from cnnkit.data.transforms import eval_transform, image_mode
from cnnkit.deploy.formats import load_model
from cnnkit.engine import runtime
from cnnkit.errors import CnnkitError
from cnnkit.evaluation.tta import with_tta
from cnnkit.fileio import atomic_write_bytes

GLOB_CHARS = set("*?[")


def palette_png(mask: np.ndarray) -> bytes:
    """PNG bytes of a class-index mask (H, W) uint8 as a palette image: the pixel values stay
    the class indices, viewers show VOC's colours (class 0 black, 1 dark red, 2 green...)."""
    image = Image.fromarray(mask.astype(np.uint8), mode="P")
    image.putpalette(voc_palette())
    return _png(image)


def overlay_png(image: Image.Image, mask: np.ndarray) -> bytes:
    """PNG bytes of ``image`` with the class colours of ``mask`` (H, W) blended over it."""
    return _png(Image.fromarray(overlay(np.asarray(image.convert("RGB")), mask)))


def _png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def predict(
    run_or_model: str | Path | nn.Module,
    inputs,
    *,
    top_k: int = 5,
    batch_size: int = 64,
    device: str = "auto",
    precision: str | None = None,
    mask_dir: str | Path | None = None,
    tta: str = "none",
) -> list[dict]:
    """Top-k classes for image files, folders or glob patterns (or PIL images); ``precision``:
    default, the precision the run trained with; ``tta``: none, flip or flip_translate (the
    probabilities of the mean logits over those views). A segmentation model gives each image's
    class pixel fractions instead, and writes palette mask PNGs into ``mask_dir`` when given."""
    model = run_or_model if isinstance(run_or_model, nn.Module) else load_model(run_or_model)
    predictor = Predictor(model, device=device, precision=precision, tta=tta)
    if predictor.task.name == "segmentation":
        return predictor.segment(inputs, batch_size=batch_size, mask_dir=mask_dir)
    return predictor.predict(inputs, top_k=top_k, batch_size=batch_size)


def expand_inputs(inputs: Iterable[str | Path | Image.Image]) -> list[str | Image.Image]:
    """Files stay, folders become their images (recursively, sorted), globs are expanded."""
    out: list[str | Image.Image] = []
    for item in inputs:
        if isinstance(item, Image.Image):
            out.append(item)
            continue
        text = str(item)
        path = Path(text)
        if path.is_dir():
            found = list_images(path)
            if not found:
                raise CnnkitError(f"no images found in folder {path}")
            out.extend(str(p) for p in found)
        elif path.is_file():
            out.append(text)
        elif GLOB_CHARS & set(text):
            matches = sorted(glob.glob(text, recursive=True))
            if not matches:
                raise CnnkitError(f"no files match {text}")
            out.extend(m for m in matches if Path(m).is_file())
        else:
            raise CnnkitError(f"input not found: {text}")
    return out


class Predictor:
    """A loaded model plus its preprocessing, ready to classify images in batches.

    ``model`` is anything ``cnnkit.load_model`` returns: a PyTorch model from ``.safetensors`` or
    an exported ``.onnx``/TorchScript file; each carries the same ``.meta`` and preprocessing.
    The server calls the steps one by one (``preprocess`` per image in request threads,
    ``probabilities`` per micro-batch, ``top``); ``predict`` chains them for files.
    """

    def __init__(
        self,
        model: nn.Module,
        device: str = "auto",
        precision: str | None = None,
        tta: str = "none",
    ):
        meta = getattr(model, "meta", None)
        if meta is None:
            raise CnnkitError(
                "Predictor needs a model from cnnkit.load_model (it carries "
                "the classes and preprocessing)"
            )
        self.rt = runtime.for_model(meta, device, precision)  # default: the run's precision
        self.task = tasks.get(meta.get("task", "classification"))  # files before 0.1.1: none
        model = model.to(self.rt.device, memory_format=self.rt.memory_format).eval()
        self.model = with_tta(model, tta)
        self.meta = meta
        self.classes = meta["classes"]
        self.transform = eval_transform(meta["preprocessing"])
        self.mode = image_mode(meta["preprocessing"])

    def predict(self, inputs, top_k: int = 5, batch_size: int = 64) -> list[dict]:
        """One dict per image: ``{"input": name, "top": [{"class", "index", "prob"}, ...]}``."""
        items = expand_inputs(inputs)
        results = []
        for start in range(0, len(items), batch_size):
            chunk = items[start : start + batch_size]
            batch = torch.stack([self.preprocess(self._image(item)) for item in chunk])
            tops = self.top(self.probabilities(batch), top_k)
            for item, top in zip(chunk, tops, strict=True):
                results.append({"input": item if isinstance(item, str) else "<image>", "top": top})
        return results

    def preprocess(self, image: Image.Image) -> torch.Tensor:
        """A decoded image -> the normalised float tensor (C, H, W) the model expects."""
        return self.transform(image.convert(self.mode))

    @torch.inference_mode()
    def probabilities(self, batch: torch.Tensor) -> torch.Tensor:
        """Softmax over classes for a preprocessed batch (B, C, H, W), as float32 on the CPU."""
        with self.rt.autocast():
            logits = self.model(self.rt.to_device(batch))
        return logits.float().softmax(1).cpu()

    def top(self, probs: torch.Tensor, top_k: int) -> list[list[dict]]:
        """The ``top_k`` classes of each row of ``probs`` (B, num_classes), best first."""
        return self.task.predict(probs, self.classes, top_k)

    def segment(
        self, inputs, batch_size: int = 16, mask_dir: str | Path | None = None
    ) -> list[dict]:
        """One dict per image: ``{"input", "size": [w, h], "fractions": {class: share of the
        pixels}}``, plus ``"mask"``, the palette PNG written into ``mask_dir`` (class indices
        at the image's own size: ``full_mask``), and
        ``"overlay"``, the image with its class colours blended over it, beside the mask."""
        items = expand_inputs(inputs)
        results = []
        for start in range(0, len(items), batch_size):
            chunk = [self._image(item) for item in items[start : start + batch_size]]
            batch = torch.stack([self.preprocess(image) for image in chunk])
            probs = self.probabilities(batch)  # (B, K, h, w)
            for offset, (image, small) in enumerate(zip(chunk, probs, strict=True)):
                item = items[start + offset]
                results.append(self._segmented(item, image, small, start + offset, mask_dir))
        return results

    @staticmethod
    def full_mask(probs: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        """The uint8 class map (H, W) at an image's ``size`` (width, height) of one image's
        probabilities (K, h, w) at the model's input size: each class's probability is resized
        bilinearly, then the most probable class taken per pixel (smooth boundaries at the
        image's own resolution, not the input size's blocks). One class plane at a time, so a
        large image costs two float planes, not K."""
        width, height = size
        if (height, width) == tuple(probs.shape[-2:]):
            return probs.argmax(0).to(torch.uint8)
        best = torch.full((height, width), -1.0)
        mask = torch.zeros((height, width), dtype=torch.uint8)
        for k, plane in enumerate(probs):
            up = F.interpolate(plane[None, None], size=(height, width), mode="bilinear")[0, 0]
            better = up > best
            best = torch.where(better, up, best)
            mask[better] = k
        return mask

    def fractions(self, mask: torch.Tensor) -> dict[str, float]:
        """Each class's share of the pixels of a class map."""
        counts = torch.bincount(mask.flatten().long(), minlength=len(self.classes)).tolist()
        return {c: n / mask.numel() for c, n in zip(self.classes, counts, strict=True)}

    def _segmented(self, item, image: Image.Image, small: torch.Tensor, index: int, mask_dir):
        full = self.full_mask(small, image.size)
        name = item if isinstance(item, str) else "<image>"
        out = {"input": name, "size": list(image.size), "fractions": self.fractions(full)}
        if mask_dir is not None:
            stem = Path(item).stem if isinstance(item, str) else f"image-{index}"
            path = Path(mask_dir) / f"{stem}.png"
            atomic_write_bytes(path, palette_png(full.numpy()))
            overlay = Path(mask_dir) / f"{stem}_overlay.png"
            atomic_write_bytes(overlay, overlay_png(image, full.numpy()))
            out["mask"], out["overlay"] = str(path), str(overlay)
        return out

    def _image(self, item: str | Image.Image) -> Image.Image:
        if isinstance(item, Image.Image):
            return item.convert(self.mode)
        return load_image(item, mode=self.mode)
