"""Export a model file to ONNX, TorchScript or int8 ONNX, and prove it before calling it done.

Every export is written to a temporary file next to the target, checked against the PyTorch model
on real images, and only then moved into place (a failed check leaves no file behind):

- logits on a batch of validation images: max abs difference, relative to the logit scale
  (max |logit| of the reference); fp32 formats must stay within ``FP32_TOLERANCE``;
- top-1 agreement with the PyTorch model over the whole validation split: 100% for fp32 formats,
  at least ``INT8_MIN_AGREEMENT`` for int8; plus both accuracies, so the int8 cost is printed.
  A segmentation model is compared per pixel (its argmax class maps; accuracy over the pixels
  that are not ignored): fp32 formats must agree on at least ``DENSE_MIN_AGREEMENT`` of them, as
  a near-tie between two classes somewhere in 10^5 pixels may flip under any reordering of sums.

int8 is onnxruntime's static post-training quantization (QDQ, per-channel int8 weights, uint8
activations, MinMax ranges from training images). Weights use 7 bits (``reduce_range``): CPUs
without VNNI (this one: AVX2 only) multiply u8 x s8 with an instruction whose 16-bit sums saturate,
which cost a digits model 39% top-1 agreement; with 7-bit weights it keeps >= 99%.

PyTorch's PT2E X86 quantizer was the other candidate. It is no longer in torch (2.14 here: it
moved to the separate torchao package) and reaches int8 kernels only through torch.compile, while
ORT int8 needs no compiler and ran at 2.3x (resnet20, 32 px) and 3.1x (resnet18, 224 px) eager
fp32 on this AVX2 CPU (batch 64, 1 thread; benchmarks/bench_export.py), so ORT it is.

The 99% agreement gate is strict for weakly trained models, whose many near-tied predictions flip
under any rounding: a resnet20 trained 3 epochs on CIFAR-10 (56% test accuracy) kept its accuracy
(-0.03 points) but agreed on only 96.6% of validation images, and its int8 export is refused.
"""

from __future__ import annotations

import contextlib
import json
import logging
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn

from cnnkit import data
from cnnkit.config import load
from cnnkit.data import masks
from cnnkit.deploy.formats import (
    TORCHSCRIPT_META,
    load_exported,
    load_model,
    onnx_metadata,
    require,
)
from cnnkit.errors import CnnkitError
from cnnkit.fileio import commit
from cnnkit.modelfile import model_path

FP32_TOLERANCE = 1e-4  # max |logit diff| / max |logit|, fp32 formats
INT8_MIN_AGREEMENT = 0.99  # top-1 (segmentation: per-pixel) agreement with the fp32 model
DENSE_MIN_AGREEMENT = 0.999  # per-pixel agreement of fp32 formats, segmentation
OPSET = (
    20  # newest opset of torch's TorchScript-based ONNX exporter (the dynamo one needs onnxscript)
)
LOGIT_BATCH = 64  # images in the logit comparison
CALIBRATION_IMAGES = 256  # training images used to set int8 activation ranges
SUFFIXES = {"onnx": ".onnx", "torchscript": ".torchscript.pt", "int8": ".int8.onnx"}


@dataclass
class Parity:
    """How an exported file compares with the PyTorch model it came from."""

    max_abs_diff: float  # on LOGIT_BATCH real images
    logit_scale: float  # max |logit| of the reference on the same images
    agreement: float  # top-1 agreement on the validation split (per pixel: segmentation), 0..1
    images: int  # validation images compared
    acc_reference: float | None  # accuracy of the PyTorch model (None without labels)
    acc_exported: float | None
    pixels: int | None = None  # segmentation: pixels compared (agreement is per pixel)
    passed: bool = False
    problems: list[str] = field(default_factory=list)

    @property
    def relative_diff(self) -> float:
        return self.max_abs_diff / max(self.logit_scale, 1e-12)

    def describe(self) -> str:
        unit, share = ("top-1", ".2%") if self.pixels is None else ("per-pixel", ".3%")
        text = (
            f"max |logit diff| {self.max_abs_diff:.3g} ({self.relative_diff:.2g} of the logit "
            f"scale {self.logit_scale:.3g}); {unit} agreement {self.agreement:{share}} on "
            f"{self.images} validation images"
        )
        if self.pixels is not None:
            text += f" ({self.pixels} pixels)"
        if self.acc_reference is not None:
            change = 100 * (self.acc_exported - self.acc_reference)
            what = "accuracy" if self.pixels is None else "pixel accuracy"
            text += (
                f"; {what} {self.acc_reference:.2%} -> {self.acc_exported:.2%} "
                f"({change:+.2f} points)"
            )
        return text


@dataclass
class ExportResult:
    path: Path
    format: str
    parity: Parity
    calibration: str | None = None  # int8: what set the activation ranges


@dataclass
class ParityData:
    """Real images for the checks: calibration (training images) and validation (labelled)."""

    calibration: torch.utils.data.Dataset
    validation: torch.utils.data.Dataset
    source: str


def export(
    run_or_model: str | Path,
    fmt: str,
    out: str | Path | None = None,
    data_source: str | None = None,
    max_val_images: int | None = None,
) -> ExportResult:
    """Export to ``fmt`` (onnx | torchscript | int8), check parity, then move into place.

    Images for the checks come from the model's run folder (training split for calibration,
    validation split, else test, for agreement), or from ``data_source`` (labelled images) when
    the model file stands alone. Raises ``CnnkitError`` with the figures when a check fails.
    """
    if fmt not in SUFFIXES:
        raise CnnkitError(f"unknown export format '{fmt}'; use one of {', '.join(SUFFIXES)}")
    source = model_path(run_or_model)
    model = load_model(source, device="cpu")
    if not hasattr(model, "default_cfg"):
        raise CnnkitError(f"{source} is already exported; export from the .safetensors file")
    # the graph is traced from the fp32 model and runs in fp32 (int8: fp32 in and out), whatever
    # precision the run trained in; its file says so, and predict/eval use that
    model.meta = {**model.meta, "precision": "fp32"}
    target = Path(out) if out is not None else _default_target(source, fmt)
    if target.suffix.lower() != SUFFIXES[fmt][-len(target.suffix) :].lower():
        raise CnnkitError(f"--out {target}: a {fmt} file must end in {SUFFIXES[fmt]}")
    images = parity_data(source, model.meta, data_source, max_val_images)
    # Same folder (os.replace stays atomic), same suffix (the loader dispatches on it).
    tmp = target.with_name(f".{target.stem}.tmp{target.suffix}")
    try:
        calibration = WRITERS[fmt](model, tmp, images)
        parity = check_parity(model, load_exported(tmp), images, fmt)
        if not parity.passed:
            raise CnnkitError(
                f"{fmt} export of {source} failed its parity check ({'; '.join(parity.problems)}): "
                f"{parity.describe()}; nothing was written"
            )
        commit(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)
    return ExportResult(path=target, format=fmt, parity=parity, calibration=calibration)


def _default_target(source: Path, fmt: str) -> Path:
    return source.with_name(source.stem + SUFFIXES[fmt])


def parity_data(
    source: Path, meta: dict, data_source: str | None, max_val_images: int | None = None
) -> ParityData:
    """Calibration and validation images, preprocessed exactly as the model file says."""

    pre = meta["preprocessing"]
    if data_source is not None:
        val = masks.eval_data(data_source, meta)
        return ParityData(val, _limit(val, max_val_images, pre), str(data_source))
    run_dir = source.parent
    if not (run_dir / "config.yaml").is_file():
        raise CnnkitError(
            f"{source} is not inside a run folder, so there are no images for the parity check; "
            "pass --data with labelled images (folder of class subfolders, CSV or built-in)"
        )
    cfg = load(run_dir / "config.yaml")
    splits = masks.build_splits(cfg.data, cfg.train.task, cfg.train.seed)
    val, name = (splits.val, "val") if splits.val is not None else (splits.test, "test")
    if val is None:
        raise CnnkitError(f"run {run_dir} has no val or test split; pass --data for the check")
    if isinstance(val, masks.MaskDataset):  # decoded at the input size, never augmented
        return ParityData(splits.train, _limit(val, max_val_images, pre), f"{run_dir} ({name})")
    transform, mode = data.eval_transform(pre), data.image_mode(pre)
    train = splits.train.with_transform(transform, mode)  # no augmentation for calibration
    val = val.with_transform(transform, mode)
    return ParityData(train, _limit(val, max_val_images, pre), f"{run_dir} ({name} split)")


def _limit(dataset, count: int | None, pre: dict):
    """At most ``count`` images spread evenly over ``dataset`` (folders are sorted by class, so
    the first ones would be a few classes only), with the eval transform (subsets drop it)."""

    if count is None or count >= len(dataset):
        return dataset
    picks = np.linspace(0, len(dataset) - 1, max(count, 1)).round().astype(int).tolist()
    if isinstance(dataset, masks.MaskDataset):
        return dataset.subset(picks)
    return dataset.subset(picks).with_transform(data.eval_transform(pre), data.image_mode(pre))


def write_onnx(model: nn.Module, path: Path) -> None:
    """fp32 ONNX with a dynamic batch axis and the model file's metadata."""
    onnx = require("onnx", "ONNX export")
    example = torch.zeros(2, *_input_shape(model.meta))  # (B, C, H, W); B is dynamic
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the legacy exporter's deprecation notice
        torch.onnx.export(
            model,
            (example,),
            str(path),
            dynamo=False,
            opset_version=OPSET,
            input_names=["input"],
            output_names=["logits"],
            dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}},
        )
    proto = onnx.load(str(path))
    task = model.meta.get("task", "classification")
    proto.doc_string = f"cnnkit {model.meta['arch']} ({task}); preprocessing in metadata"
    for key, value in onnx_metadata(model.meta).items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = key, value
    onnx.save(proto, str(path))


def write_torchscript(model: nn.Module, path: Path) -> None:
    """A traced TorchScript archive with the metadata as an extra file (loads in LibTorch).

    torch marks TorchScript deprecated in favour of torch.export, but TorchScript is still what
    LibTorch (C++) and mobile runtimes load; its FutureWarnings are silenced here and on load."""
    example = torch.zeros(1, *_input_shape(model.meta))
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        traced = torch.jit.trace(model, example)
        torch.jit.save(traced, str(path), _extra_files={TORCHSCRIPT_META: _meta_json(model.meta)})


def write_int8(model: nn.Module, path: Path, calibration) -> str:
    """Static int8 ONNX: fp32 export, ORT pre-processing, QDQ quantization with real images."""
    quant = require("onnxruntime.quantization", "int8 export")
    from onnxruntime.quantization.shape_inference import quant_pre_process

    fp32 = path.with_name(path.stem + ".fp32.onnx")
    pre = path.with_name(path.stem + ".pre.onnx")
    try:
        write_onnx(model, fp32)
        with _quiet():
            # ONNX's own shape inference is all a CNN's quantization needs. ORT's symbolic one
            # cannot follow a U-Net's pad-to-16-and-crop, and on failing it dumps
            # sym_shape_infer_temp.onnx and its weights into the working directory.
            quant_pre_process(str(fp32), str(pre), skip_symbolic_shape=True)
            quant.quantize_static(
                str(pre),
                str(path),
                _CalibrationReader(calibration, CALIBRATION_IMAGES),
                quant_format=quant.QuantFormat.QDQ,
                per_channel=True,
                activation_type=quant.QuantType.QUInt8,
                weight_type=quant.QuantType.QInt8,
                calibrate_method=quant.CalibrationMethod.MinMax,
                reduce_range=True,  # 7-bit weights: see the module docstring
            )
    finally:
        fp32.unlink(missing_ok=True)
        pre.unlink(missing_ok=True)
    _copy_metadata(model.meta, path)
    count = min(CALIBRATION_IMAGES, len(calibration))
    return f"MinMax ranges from {count} training images"


def _copy_metadata(meta: dict, path: Path) -> None:
    onnx = require("onnx", "ONNX export")
    proto = onnx.load(str(path))
    del proto.metadata_props[:]
    for key, value in onnx_metadata({**meta, "quantization": "int8 static QDQ"}).items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = key, value
    onnx.save(proto, str(path))


class _CalibrationReader:
    """Feeds ORT's calibrator batches of real training images (evenly spread over the split)."""

    def __init__(self, dataset, count: int, batch_size: int = 32) -> None:
        count = min(count, len(dataset))
        picks = np.linspace(0, len(dataset) - 1, count).round().astype(int).tolist()
        self.batches = (
            torch.stack([dataset[i][0] for i in picks[s : s + batch_size]]).numpy()
            for s in range(0, count, batch_size)
        )

    def get_next(self) -> dict | None:
        batch = next(self.batches, None)
        return None if batch is None else {"input": batch}

    def rewind(self) -> None:  # ORT may call it; one pass is all MinMax needs
        pass


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """ORT's quantizer logs advice meant for its developers at warning level."""
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        root.setLevel(level)


WRITERS = {
    "onnx": lambda model, path, images: write_onnx(model, path),
    "torchscript": lambda model, path, images: write_torchscript(model, path),
    "int8": lambda model, path, images: write_int8(model, path, images.calibration),
}


@torch.inference_mode()
def check_parity(reference: nn.Module, exported: nn.Module, images: ParityData, fmt: str) -> Parity:
    """Compare ``exported`` with ``reference`` on real images; sets ``passed`` and ``problems``."""

    dense = isinstance(images.validation, masks.MaskDataset)  # targets: masks (B, H, W)
    loader = data.make_loader(images.validation, LOGIT_BATCH, train=False, seed=0, num_workers=0)
    agree = correct_ref = correct_exp = seen = compared = labelled = 0
    max_diff = scale = 0.0
    for step, (x, y) in enumerate(loader):
        ref, got = reference(x).float(), exported(x).float()
        if step == 0:  # the logit comparison: one batch is enough to see numeric drift
            max_diff = (ref - got).abs().max().item()
            scale = ref.abs().max().item()
        ref_top, got_top = ref.argmax(1), got.argmax(1)
        valid = y != masks.IGNORE if dense else torch.ones_like(y, dtype=torch.bool)
        agree += (ref_top == got_top).sum().item()
        correct_ref += ((ref_top == y) & valid).sum().item()
        correct_exp += ((got_top == y) & valid).sum().item()
        seen, compared = seen + len(y), compared + y.numel()
        labelled += valid.sum().item()
    compared, labelled = max(compared, 1), max(labelled, 1)
    parity = Parity(
        max_abs_diff=max_diff,
        logit_scale=scale,
        agreement=agree / compared,
        images=seen,
        acc_reference=correct_ref / labelled,
        acc_exported=correct_exp / labelled,
        pixels=compared if dense else None,
    )
    _judge(parity, fmt)
    return parity


def _judge(parity: Parity, fmt: str) -> None:
    if fmt == "int8":
        if parity.agreement < INT8_MIN_AGREEMENT:
            what = "per-pixel" if parity.pixels is not None else "top-1"
            parity.problems.append(f"{what} agreement below {INT8_MIN_AGREEMENT:.0%}")
    else:
        if parity.relative_diff > FP32_TOLERANCE:
            parity.problems.append(f"logits differ by more than {FP32_TOLERANCE:g} of their scale")
        if parity.pixels is not None and parity.agreement < DENSE_MIN_AGREEMENT:
            parity.problems.append(f"per-pixel agreement below {DENSE_MIN_AGREEMENT:.1%}")
        elif parity.pixels is None and parity.agreement < 1.0:
            parity.problems.append("top-1 differs from the PyTorch model on some images")
    parity.passed = not parity.problems


def _input_shape(meta: dict) -> tuple[int, int, int]:
    return (meta["in_chans"], *meta["input_size"])


def _meta_json(meta: dict) -> str:
    return json.dumps(meta)
