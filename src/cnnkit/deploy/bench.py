"""Inference speed of one model across runtimes: batch-1 latency and batch-N throughput.

Runtimes (rows): eager fp32 (what ``cnnkit predict`` runs), eager bf16 (only where the CPU has
native bf16; emulated bf16 is slower than fp32, so it is skipped with the reason), torch.compile,
ONNX Runtime fp32 and ONNX Runtime int8 (static, calibrated on the run's training images when the
model sits in its run folder, else on random inputs: speed does not depend on the ranges, accuracy
does, and ``cnnkit export --format int8`` is what measures that). An ``.onnx`` file is benched as
itself. All runtimes use torch's thread count, and ratios to eager fp32 in the same run are the
figures to compare, since absolute times drift with machine load.
"""

from __future__ import annotations

import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from torch import nn

from cnnkit.deploy.export import OPSET, parity_data, write_int8, write_onnx
from cnnkit.deploy.formats import OnnxModel, load_model
from cnnkit.engine import runtime
from cnnkit.errors import CnnkitError
from cnnkit.modelfile import model_path

WARMUP = 5


def bench(
    run_or_model: str | Path,
    batch_size: int = 64,
    seconds: float = 2.0,
    runtimes: list[str] | None = None,
) -> list[dict]:
    """One row per runtime: latency_p50_ms, latency_p99_ms (batch 1), throughput (images/s at
    ``batch_size``), speedup (throughput / eager fp32's), note."""
    path = model_path(run_or_model)
    model = load_model(path, device="cpu")
    shape = (model.meta["in_chans"], *model.meta["input_size"])
    names = runtimes or list(RUNTIMES)
    if not hasattr(model, "default_cfg"):  # an exported file: bench it as it is
        names = ["file"]
    rows = []
    with tempfile.TemporaryDirectory(prefix="cnnkit-bench-") as tmp:
        for name in names:
            rows.append(_measure(name, model, path, Path(tmp), shape, batch_size, seconds))
    base = next((r["throughput"] for r in rows if r["runtime"] == "eager fp32"), None)
    for r in rows:
        r["speedup"] = r["throughput"] / base if base and r["throughput"] else None
    return rows


def _measure(name, model, path, tmp, shape, batch_size, seconds) -> dict:
    row = {"runtime": RUNTIME_NAMES.get(name, name), "batch_size": batch_size, "note": ""}
    start = time.perf_counter()
    try:
        run, note = RUNTIMES.get(name, _as_file)(model, path, tmp, shape)
    except Exception as e:  # noqa: BLE001 - a runtime that fails here is a row, not a crash
        return row | _empty(f"unavailable: {type(e).__name__}: {str(e).splitlines()[0][:120]}")
    if run is None:
        return row | _empty(note)
    one = torch.randn(1, *shape)
    many = torch.randn(batch_size, *shape)
    for _ in range(WARMUP):
        run(one)
    prepare = time.perf_counter() - start
    times = _timed(run, one, seconds)
    run(many)
    batches = _timed(run, many, seconds)
    row.update(
        latency_p50_ms=1e3 * float(np.percentile(times, 50)),
        latency_p99_ms=1e3 * float(np.percentile(times, 99)),
        throughput=batch_size / float(np.mean(batches)),
        note=f"{note}; ready in {prepare:.1f} s".lstrip("; "),
    )
    return row


def _timed(run: Callable, x: torch.Tensor, seconds: float) -> list[float]:
    """Per-call seconds, for ``seconds`` of wall time but at least 10 calls."""
    times, end = [], time.perf_counter() + seconds
    while len(times) < 10 or time.perf_counter() < end:
        t = time.perf_counter()
        run(x)
        times.append(time.perf_counter() - t)
    return times


def _empty(note: str) -> dict:
    return {"latency_p50_ms": None, "latency_p99_ms": None, "throughput": None, "note": note}


def _eager(model: nn.Module, dtype: torch.dtype | None) -> Callable:
    cl = model.to(memory_format=torch.channels_last)

    @torch.inference_mode()
    def run(x):
        x = x.contiguous(memory_format=torch.channels_last)
        if dtype is None:
            return cl(x)
        with torch.autocast("cpu", dtype=dtype):
            return cl(x)

    return run


def _eager_fp32(model, path, tmp, shape):
    return _eager(model, None), "channels_last"


def _eager_bf16(model, path, tmp, shape):
    if not runtime.cpu_has_native_bf16():
        return None, "skipped: this CPU has no native bf16 (emulated bf16 is slower than fp32)"
    return _eager(model, torch.bfloat16), "autocast bf16, channels_last"


def _compiled(model, path, tmp, shape):
    compiled = torch.compile(model)
    return torch.inference_mode()(compiled), "inductor, default mode"


def _ort_fp32(model, path, tmp, shape):
    write_onnx(model, tmp / "fp32.onnx")
    return OnnxModel(tmp / "fp32.onnx"), f"opset {_opset()}"


def _ort_int8(model, path, tmp, shape):
    try:
        calibration, note = parity_data(path, model.meta, None).calibration, "calibrated on train"
    except CnnkitError:
        calibration = [(torch.randn(*shape), 0) for _ in range(64)]
        note = "calibrated on random inputs (speed only)"
    write_int8(model, tmp / "int8.onnx", calibration)
    return OnnxModel(tmp / "int8.onnx"), f"static QDQ, {note}"


def _as_file(model, path, tmp, shape):
    return model, f"{path.name} as exported"


def _opset() -> int:

    return OPSET


RUNTIMES = {
    "eager": _eager_fp32,
    "bf16": _eager_bf16,
    "compile": _compiled,
    "ort": _ort_fp32,
    "int8": _ort_int8,
}
RUNTIME_NAMES = {
    "eager": "eager fp32",
    "bf16": "eager bf16",
    "compile": "torch.compile fp32",
    "ort": "ORT fp32",
    "int8": "ORT int8",
    "file": "file",
}
