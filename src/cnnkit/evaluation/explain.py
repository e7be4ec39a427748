"""``explain``: Grad-CAM overlays for image files, written as PNG next to each other in a folder.

Images are read and preprocessed exactly as ``predict`` does (the preprocessing stored in the
model file), so the map explains the prediction ``predict`` would make. Each overlay shows the
image the model saw (resized/cropped, scaled up when small) under the heat map.
"""

from __future__ import annotations

import io
from pathlib import Path

import torch
from PIL import Image

from cnnkit.data.images import load_image
from cnnkit.data.transforms import eval_transform, image_mode
from cnnkit.deploy.formats import load_model
from cnnkit.deploy.predictor import expand_inputs
from cnnkit.engine import runtime
from cnnkit.errors import CnnkitError
from cnnkit.evaluation import plots
from cnnkit.evaluation.gradcam import METHODS, compute_cams
from cnnkit.fileio import atomic_write_bytes


def explain(
    run_or_model: str | Path,
    inputs: list[str | Path],
    out_dir: str | Path,
    *,
    method: str = "gradcam",
    target: str | None = None,
    device: str = "auto",
    batch_size: int = 32,
    precision: str | None = None,
) -> list[dict]:
    """Write one overlay PNG per input image into ``out_dir``; return, per image, the input,
    the explained class and its probability, and the overlay's path.

    ``target``: a class name to explain for every image (default: each image's prediction).
    ``precision``: default, the precision the run trained with.
    """
    if method not in METHODS:
        raise CnnkitError(f"unknown CAM method '{method}'; choose from {', '.join(METHODS)}")
    model = load_model(run_or_model, device=device)
    if model.meta.get("task", "classification") != "classification":
        raise CnnkitError(
            f"cnnkit explain draws class activation maps of classifiers; {run_or_model} is a "
            f"{model.meta['task']} model, whose predicted masks are the explanation: cnnkit "
            "predict RUN IMAGES --out DIR writes them with overlays"
        )
    rt = runtime.for_model(model.meta, device, precision)
    model = model.to(memory_format=rt.memory_format)
    classes, pre = model.meta["classes"], model.meta["preprocessing"]
    target_index = _class_index(target, classes)
    items = [str(item) for item in expand_inputs(inputs)]
    out = Path(out_dir)
    names: set[str] = set()
    results = []
    for start in range(0, len(items), batch_size):
        chunk = items[start : start + batch_size]
        batch = torch.stack([eval_transform(pre)(load_image(p, image_mode(pre))) for p in chunk])
        targets = None if target_index is None else torch.full((len(chunk),), target_index)
        cams = compute_cams(
            model, rt.to_device(batch), targets, method=method, autocast=rt.autocast()
        )
        for j, path in enumerate(chunk):
            image = plots.display_image(batch[j], pre["mean"], pre["std"])
            file = out / _unique_name(Path(path).stem, method, names)
            atomic_write_bytes(file, _png(plots.overlay(image, cams.maps[j])))
            index = int(cams.targets[j])
            prob = float(cams.probs[j, index])
            results.append(
                {"input": path, "class": classes[index], "prob": prob, "overlay": str(file)}
            )
    return results


def _class_index(target: str | None, classes: list[str]) -> int | None:
    if target is None:
        return None
    if target not in classes:
        shown = ", ".join(classes[:10]) + (", ..." if len(classes) > 10 else "")
        raise CnnkitError(f"--class '{target}' is not one of the model's classes ({shown})")
    return classes.index(target)


def _unique_name(stem: str, method: str, taken: set[str]) -> str:
    """``<stem>.<method>.png``; images with the same name from different folders get -2, -3..."""
    tag = method.replace("++", "pp")
    name, n = f"{stem}.{tag}.png", 1
    while name in taken:
        n += 1
        name = f"{stem}-{n}.{tag}.png"
    taken.add(name)
    return name


def _png(pixels) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG")
    return buf.getvalue()
