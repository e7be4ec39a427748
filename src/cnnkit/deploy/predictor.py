"""Batched top-k prediction for image files, folders and glob patterns.

Uses only the model and the preprocessing stored in its model file, so predictions match what
the model saw at evaluation time during training.
"""

from __future__ import annotations

import glob
from collections.abc import Iterable
from pathlib import Path

import torch
from PIL import Image
from torch import nn

from cnnkit.config import RuntimeConfig
from cnnkit.data import load_image
from cnnkit.data.images import list_images
from cnnkit.data.transforms import eval_transform
from cnnkit.engine import runtime
from cnnkit.errors import CnnkitError

GLOB_CHARS = set("*?[")


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
    """A loaded model plus its preprocessing, ready to classify images in batches."""

    def __init__(self, model: nn.Module, device: str = "auto"):
        meta = getattr(model, "meta", None)
        if meta is None:
            raise CnnkitError(
                "Predictor needs a model from cnnkit.load_model (it carries "
                "the classes and preprocessing)"
            )
        self.rt = runtime.resolve(RuntimeConfig(device=device))
        self.model = model.to(self.rt.device, memory_format=self.rt.memory_format).eval()
        self.classes = meta["classes"]
        self.transform = eval_transform(meta["preprocessing"])
        self.mode = "L" if meta["in_chans"] == 1 else "RGB"

    @torch.inference_mode()
    def predict(self, inputs, top_k: int = 5, batch_size: int = 64) -> list[dict]:
        """One dict per image: ``{"input": name, "top": [{"class", "index", "prob"}, ...]}``."""
        items = expand_inputs(inputs)
        k = max(1, min(top_k, len(self.classes)))
        results = []
        for start in range(0, len(items), batch_size):
            chunk = items[start : start + batch_size]
            batch = torch.stack([self.transform(self._image(item)) for item in chunk])
            with self.rt.autocast():
                probs = self.model(self.rt.to_device(batch)).float().softmax(1)
            top = probs.topk(k, dim=1)
            for item, p, idx in zip(chunk, top.values.cpu(), top.indices.cpu(), strict=True):
                results.append(
                    {
                        "input": item if isinstance(item, str) else "<image>",
                        "top": [
                            {"class": self.classes[i], "index": int(i), "prob": float(v)}
                            for v, i in zip(p.tolist(), idx.tolist(), strict=True)
                        ],
                    }
                )
        return results

    def _image(self, item: str | Image.Image) -> Image.Image:
        if isinstance(item, Image.Image):
            return item.convert(self.mode)
        return load_image(item, mode=self.mode)
