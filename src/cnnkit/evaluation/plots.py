"""The report's figures, drawn with matplotlib and returned as PNG bytes.

Figures are made with ``matplotlib.figure.Figure`` directly, never through ``pyplot``: that
renders with the Agg canvas without touching the process-wide backend (a notebook that imports
cnnkit keeps its own) and without the global figure list that leaks memory in long processes.
"""

from __future__ import annotations

import io
import math
from pathlib import Path

import numpy as np
import torch
from matplotlib import colormaps
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

DPI = 90
MAX_MATRIX_CLASSES = 30  # wider confusion matrices are cut to the most confused classes
ANNOTATE_CELLS = 15  # write the numbers into the cells up to this many classes
CAM_SIDE = 224  # px: overlays of small images (digits are 8x8) are scaled up to be seen
CAM_ALPHA = 0.45  # weight of the heat map over the image
TILE, CAPTION, GAP = 112, 40, 8  # px: image grids (galleries, Grad-CAM); CAPTION fits 3 lines
CAPTION_FONT = 7  # pt, shrunk per caption when it does not fit its cell
CAPTION_CHARS = 32  # longer caption lines lose their middle: shrunk further they are unreadable


def png(fig: Figure) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=DPI)
    return buf.getvalue()


def display_image(x: torch.Tensor, mean, std) -> np.ndarray:
    """A normalised (C, H, W) input back to an (H, W, 3) float image in 0..1."""
    mean = torch.as_tensor(mean, dtype=torch.float32)[:, None, None]
    std = torch.as_tensor(std, dtype=torch.float32)[:, None, None]
    image = (x.detach().float().cpu() * std + mean).clamp(0, 1)
    if image.shape[0] == 1:
        image = image.expand(3, -1, -1)
    return image.permute(1, 2, 0).numpy()


def overlay(image: np.ndarray, cam: torch.Tensor, side: int = CAM_SIDE) -> np.ndarray:
    """(H, W, 3) image in 0..1 blended with a 'jet' heat map of ``cam`` (H, W) in 0..1; the
    result is (S, S', 3) uint8 with its longer side at least ``side`` px."""
    height, width = image.shape[:2]
    scale = max(1, math.ceil(side / max(height, width)))
    size = (height * scale, width * scale)
    pixels = torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1)[None]
    # Nearest keeps the pixels of tiny inputs honest; the heat map itself is smooth.
    pixels = torch.nn.functional.interpolate(pixels, size=size, mode="nearest")[0]
    heat = torch.nn.functional.interpolate(
        cam.detach().float().cpu()[None, None], size=size, mode="bilinear", align_corners=False
    )[0, 0].clamp(0, 1)
    colored = colormaps["jet"](heat.numpy())[..., :3]
    blended = (1 - CAM_ALPHA) * pixels.permute(1, 2, 0).numpy() + CAM_ALPHA * colored
    return (blended * 255).round().astype(np.uint8)


def training_curves(rows: list[dict], metric: str = "acc", title: str = "accuracy") -> Figure:
    """Loss, ``metric`` (a metrics.csv field after train_/val_) and learning rate per epoch,
    from the rows of metrics.csv."""
    epochs = [r["epoch"] for r in rows]
    fig = Figure(figsize=(12, 3.4))
    loss, acc, lr = fig.subplots(1, 3)
    for ax, keys, name in (
        (loss, ("train_loss", "val_loss"), "loss"),
        (acc, (f"train_{metric}", f"val_{metric}"), title),
    ):
        for key in keys:
            values = [r.get(key, math.nan) for r in rows]
            if not all(math.isnan(v) for v in values):
                ax.plot(epochs, values, marker=".", label=key.split("_")[0])
        ax.set_title(name)
        ax.legend()
        ax.grid(alpha=0.3)
    lr.plot(epochs, [r["lr"] for r in rows], marker=".")
    lr.set_title("learning rate (start of epoch)")
    lr.grid(alpha=0.3)
    for ax in (loss, acc, lr):
        ax.set_xlabel("epoch")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    _margins(fig, left=0.6, right=0.15, bottom=0.5, top=0.35, wspace=0.25)
    return fig


def confusion_classes(confusion: np.ndarray, limit: int = MAX_MATRIX_CLASSES) -> list[int]:
    """Indices of the classes to draw: all of them up to ``limit``, else the ``limit`` classes
    involved in the most errors (as true or as predicted class), in their original order."""
    if len(confusion) <= limit:
        return list(range(len(confusion)))
    errors = confusion.sum(0) + confusion.sum(1) - 2 * np.diag(confusion)
    return sorted(np.argsort(-errors, kind="stable")[:limit].tolist())


def confusion_figure(confusion: np.ndarray, classes: list[str], shown: list[int]) -> Figure:
    """Counts and row-normalised rates side by side, for the classes ``shown``."""
    counts = confusion[np.ix_(shown, shown)]
    rows = confusion.sum(1)[shown][:, None]  # normalise by the full row: the true class's images
    rates = np.divide(counts, rows, out=np.zeros(counts.shape), where=rows > 0)
    names = [classes[i][:14] for i in shown]
    side = max(4.0, 0.32 * len(shown) + 2.5)
    fig = Figure(figsize=(2 * side + 1, side))
    for ax, values, title, fmt in zip(
        fig.subplots(1, 2), (counts, rates), ("counts", "row-normalised"), ("d", ".2f"), strict=True
    ):
        image = ax.imshow(values, cmap="Blues")
        if len(shown) > ANNOTATE_CELLS:  # smaller matrices have their numbers in the cells
            fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04)
        ax.set_title(title)
        ax.set_xlabel("predicted")
        ax.set_ylabel("true")
        ax.set_xticks(range(len(names)), names, rotation=90, fontsize=8)
        ax.set_yticks(range(len(names)), names, fontsize=8)
        if len(shown) <= ANNOTATE_CELLS:
            _annotate(ax, values, fmt)
    _margins(fig, left=1.2, right=0.3, bottom=1.3, top=0.4, wspace=0.3)  # room for 14 chars
    return fig


def _annotate(ax, values: np.ndarray, fmt: str) -> None:
    high = values.max() if values.size else 0
    for (i, j), value in np.ndenumerate(values):
        if value:
            color = "white" if value > high / 2 else "black"
            ax.text(j, i, format(value, fmt), ha="center", va="center", fontsize=7, color=color)


def class_bars(classes: list[str], values: list[float], title: str) -> Figure:
    """One horizontal bar per class (0..1, value written at its end); NaN: "absent"."""
    fig = Figure(figsize=(6.5, max(1.6, 0.28 * len(classes) + 0.9)))
    ax = fig.subplots()
    rows = range(len(classes))
    ax.barh(rows, [0.0 if math.isnan(v) else v for v in values], color="C0")
    for row, value in zip(rows, values, strict=True):
        text = "absent" if math.isnan(value) else f"{value:.3f}"
        ax.text(0.01 if math.isnan(value) else value + 0.01, row, text, va="center", fontsize=8)
    ax.set_yticks(list(rows), [name[:18] for name in classes], fontsize=8)
    ax.invert_yaxis()  # first class on top, as in the table
    ax.set_xlim(0, 1.12)
    ax.set_title(title)
    ax.grid(alpha=0.3, axis="x")
    _margins(fig, left=1.4, right=0.2, bottom=0.4, top=0.35)
    return fig


def reliability_figure(calibration: dict) -> Figure:
    """Accuracy against confidence per bin, with the diagonal of perfect calibration."""
    bins = [b for b in calibration["bins"] if b["count"]]
    fig = Figure(figsize=(4.6, 4.2))
    ax = fig.subplots()
    ax.plot([0, 1], [0, 1], "--", color="gray", label="perfectly calibrated")
    width = calibration["bins"][0]["hi"] - calibration["bins"][0]["lo"]
    ax.bar(
        [b["lo"] for b in bins], [b["acc"] for b in bins], width=width, align="edge",
        edgecolor="black", alpha=0.7, label="accuracy",
    )  # fmt: skip
    ax.plot([b["confidence"] for b in bins], [b["acc"] for b in bins], "o", color="darkred",
            markersize=3, label="mean confidence")  # fmt: skip
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.set_xlabel("confidence (top probability)")
    ax.set_ylabel("accuracy")
    ax.set_title(f"reliability (ECE {calibration['ece']:.3f})")
    ax.legend(loc="upper left", fontsize=8)
    _margins(fig, left=0.65, right=0.2, bottom=0.55, top=0.35)
    return fig


def image_grid(images: list[np.ndarray], captions: list[str], cols: int = 6) -> Figure:
    """Images (H, W, 3) in a grid of ``TILE`` px tiles, each with a caption above it.

    Drawn as one mosaic in one axes: a subplot per image costs ~10x more to lay out and render.
    Captions too long for their cell are shortened and shrunk to fit, never into a neighbour.
    """
    cols = max(1, min(cols, len(images)))
    rows = max(1, math.ceil(len(images) / cols))
    cell_w, cell_h = TILE + 2 * GAP, TILE + CAPTION + GAP
    mosaic = np.ones((rows * cell_h, cols * cell_w, 3))
    fig = Figure(figsize=(cols * cell_w / DPI, rows * cell_h / DPI), dpi=DPI)
    ax = fig.add_axes((0, 0, 1, 1))
    texts = []
    for n, (image, caption) in enumerate(zip(images, captions, strict=True)):
        top, left = (n // cols) * cell_h + CAPTION, (n % cols) * cell_w + GAP
        mosaic[top : top + TILE, left : left + TILE] = _tile(image)
        text = "\n".join(shorten(line) for line in caption.split("\n"))
        texts.append(
            ax.text(left + TILE / 2, top - 3, text, ha="center", va="bottom", fontsize=CAPTION_FONT)
        )
    ax.imshow(mosaic, interpolation="nearest")
    ax.set_axis_off()
    # one data unit is one pixel here: the figure is the mosaic's size at DPI
    _shrink_to_fit(fig, texts, width=cell_w - 2, height=CAPTION - 4)
    return fig


FILE_NAME_CHARS = 22  # a longer file name in a caption is cut in the middle: it fits a 7 pt tile


def file_caption(dataset, index: int, default: str) -> str:
    """The file name of ``dataset``'s image ``index`` for a caption, cut in the middle to
    ``FILE_NAME_CHARS``; ``default`` when the dataset has no file paths."""
    paths = getattr(dataset, "paths", None)
    if paths is None:
        return default
    return shorten(Path(paths[index]).name, FILE_NAME_CHARS)


def shorten(line: str, limit: int = CAPTION_CHARS) -> str:
    """``line`` cut in the middle to ``limit`` characters, keeping both ends (a file's extension,
    a probability)."""
    if len(line) <= limit:
        return line
    tail = (limit - 1) // 2
    return line[: limit - 1 - tail] + "…" + line[len(line) - tail :]  # [-0:] would keep it all


def _shrink_to_fit(fig: Figure, texts: list, width: float, height: float) -> None:
    """Shrink each text wider or taller than ``width`` x ``height`` px: class names like
    'automobile' ran into the neighbouring caption. A text's size is proportional to its font
    size, so one measurement each is enough (2% spare for hinting)."""
    renderer = FigureCanvasAgg(fig).get_renderer()
    for text in texts:
        box = text.get_window_extent(renderer)
        scale = min(width / box.width, height / box.height)
        if scale < 1:
            text.set_fontsize(text.get_fontsize() * scale * 0.98)


def _tile(image: np.ndarray) -> np.ndarray:
    """An (H, W, 3) image, uint8 or 0..1 float, scaled (nearest) and centred in TILE x TILE."""
    pixels = torch.from_numpy(np.ascontiguousarray(image)).float()
    if image.dtype == np.uint8:
        pixels = pixels / 255
    height, width = pixels.shape[:2]
    scale = TILE / max(height, width)
    size = (max(1, round(height * scale)), max(1, round(width * scale)))
    resized = torch.nn.functional.interpolate(pixels.permute(2, 0, 1)[None], size=size)[0]
    tile = torch.ones(3, TILE, TILE)
    top, left = (TILE - size[0]) // 2, (TILE - size[1]) // 2
    tile[:, top : top + size[0], left : left + size[1]] = resized
    return tile.permute(1, 2, 0).numpy()


def lr_find_figure(lrs: list[float], losses: list[float], smoothed: list[float], suggestion):
    """Loss against learning rate (log scale), raw and smoothed, with the suggestion marked."""
    fig = Figure(figsize=(6, 4))
    ax = fig.subplots()
    ax.plot(lrs, losses, color="lightgray", label="loss")
    ax.plot(lrs, smoothed, color="C0", label="smoothed")
    if suggestion is not None:
        ax.axvline(suggestion, color="C3", linestyle="--", label=f"suggested lr {suggestion:.2g}")
    finite = [v for v in smoothed if math.isfinite(v)]
    lowest = min([v for v in [*losses, *finite] if math.isfinite(v)], default=0.0)
    if finite:  # the diverging tail would squash the interesting part of the curve
        ax.set_ylim(lowest * 0.95, min(max(finite), finite[0] * 2.0) * 1.05)
    ax.set_xscale("log")
    ax.set_xlabel("learning rate")
    ax.set_ylabel("training loss")
    ax.set_title("learning-rate finder")
    ax.legend()
    ax.grid(alpha=0.3, which="both")
    _margins(fig, left=0.7, right=0.2, bottom=0.55, top=0.35)
    return fig


def _margins(fig: Figure, left: float, right: float, bottom: float, top: float, wspace=0.2):
    """Fixed margins in inches. ``tight_layout`` would measure every label by drawing the
    figure once more, which doubled the report's plotting time."""
    width, height = fig.get_size_inches()
    fig.subplots_adjust(
        left=left / width, right=1 - right / width, bottom=bottom / height,
        top=1 - top / height, wspace=wspace,
    )  # fmt: skip
