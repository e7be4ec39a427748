"""Runtime choices made once per run: device, precision, memory layout, seeding, threads.

Everything hardware-dependent is decided here so the loop can stay plain: the loop asks the
``Runtime`` for an autocast context and a grad scaler and never inspects the hardware itself.
"""

from __future__ import annotations

import contextlib
import functools
import os
import random
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from cnnkit.config import RuntimeConfig, from_dict
from cnnkit.data.host import cpu_count
from cnnkit.errors import CnnkitError

PRECISIONS = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


NATIVE_BF16_ENV = "CNNKIT_NATIVE_BF16"  # "1"/"0": force the CPU bf16 answer (tests, odd CPUs)


@dataclass(frozen=True)
class Runtime:
    """The hardware choices of one run, resolved once and passed to everything that computes."""

    device: torch.device
    precision: str  # fp32 | bf16 | fp16
    channels_last: bool
    compile: bool = False  # train through torch.compile
    threads: int = 1  # torch intra-op threads (CPU)
    deterministic: bool = False

    @property
    def memory_format(self) -> torch.memory_format:
        return torch.channels_last if self.channels_last else torch.contiguous_format

    def autocast(self) -> contextlib.AbstractContextManager:
        """Mixed-precision context for forward passes (a no-op in fp32)."""
        dtype = PRECISIONS[self.precision]
        if dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=dtype)

    def grad_scaler(self) -> torch.amp.GradScaler | None:
        """fp16 needs loss scaling to keep small gradients from flushing to zero; bf16 does not."""
        if self.precision == "fp16":
            return torch.amp.GradScaler(self.device.type)
        return None

    def to_device(self, x: torch.Tensor) -> torch.Tensor:
        """Move an input batch (B, C, H, W) to the device in the run's memory layout."""
        x = x.to(self.device, non_blocking=True)
        return x.contiguous(memory_format=self.memory_format) if x.dim() == 4 else x

    def describe(self) -> str:
        layout = "channels_last" if self.channels_last else "NCHW"
        extra = ", compiled" if self.compile else ""
        threads = f", {torch.get_num_threads()} threads" if self.device.type == "cpu" else ""
        return f"{self.device} {self.precision} {layout}{threads}{extra}"


def resolve(cfg: RuntimeConfig, deterministic: bool = False) -> Runtime:
    """Pick device, precision, layout, threads and compilation from the (validated) config
    (``auto`` = best for this machine) and set torch's global state (threads, determinism).

    Call it once per process and command, and pass the ``Runtime`` on: a second call would
    reset the global state and could choose differently."""
    device = resolve_device(cfg.device)
    rt = Runtime(
        device=device,
        precision=_precision(cfg.precision, device),
        channels_last=_channels_last(cfg.channels_last, device),
        compile=_compile(cfg.compile, device),
        threads=cfg.threads or auto_threads(),
        deterministic=deterministic,
    )
    torch.set_num_threads(rt.threads)
    set_deterministic(deterministic)
    return rt


def for_model(meta: dict, device: str = "auto", precision: str | None = None) -> Runtime:
    """The runtime for scoring or predicting with a saved model: ``precision`` when given, else
    the precision the run trained with (its metadata), when this device can run it."""
    if precision is None:
        precision = meta.get("precision") or "auto"  # files from before 0.1.1 record none
        if precision == "fp16" and resolve_device(device).type != "cuda":
            precision = "auto"  # fp16 is a GPU format; score a GPU run's model as auto here
    return resolve(from_dict({"runtime": {"device": device, "precision": precision}}).runtime)


def auto_threads() -> int:
    """Intra-op threads: torch's choice (one per physical core), but never more than the cores
    this process may run on (CPU affinity) or its container's CPU quota; more threads than
    cores make OpenMP spin against itself and steps get many times slower."""
    limit = [torch.get_num_threads(), cpu_count()]
    quota = _cgroup_cpu_quota()
    if quota is not None:
        limit.append(max(1, int(quota)))
    return max(1, min(limit))


def _cgroup_cpu_quota() -> float | None:
    """CPUs granted by the cgroup v2 (cpu.max) or v1 (cfs quota/period) limit, if any."""
    try:
        text = Path("/sys/fs/cgroup/cpu.max").read_text().split()
        if text and text[0] != "max":
            return int(text[0]) / int(text[1])
    except (OSError, ValueError, IndexError):
        pass
    try:
        quota = int(Path("/sys/fs/cgroup/cpu/cpu.cfs_quota_us").read_text())
        period = int(Path("/sys/fs/cgroup/cpu/cpu.cfs_period_us").read_text())
        if quota > 0 and period > 0:
            return quota / period
    except (OSError, ValueError):
        pass
    return None


def _compile(mode: str, device: torch.device) -> bool:
    """``auto`` compiles on CUDA, where fused kernels pay back the warm-up within minutes; on a
    CPU the convolutions already run in oneDNN and the warm-up (a minute or more on few cores)
    rarely pays back (measured in benchmarks/train_step.py)."""
    if mode != "auto":
        return mode == "on"
    return device.type == "cuda"


def resolve_device(name: str) -> torch.device:
    """``auto``: CUDA, else MPS, else CPU; an explicit name must be available here."""
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise CnnkitError(f"unknown device '{name}'; use auto, cpu, cuda, cuda:N or mps") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise CnnkitError(f"device '{name}' requested but CUDA is not available on this machine")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise CnnkitError(f"device '{name}' requested but MPS is not available on this machine")
    return device


def _precision(name: str, device: torch.device) -> str:
    if name != "auto":
        if name == "fp16" and device.type == "cpu":
            raise CnnkitError("precision fp16 is for GPUs; on the CPU use bf16 or fp32")
        return name
    if device.type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    if device.type == "cpu" and cpu_has_native_bf16():
        return "bf16"
    return "fp32"


def _channels_last(mode: str, device: torch.device) -> bool:
    if mode != "auto":
        return mode == "on"
    # Tensor cores and oneDNN convolutions prefer NHWC; MPS gains nothing from it.
    return device.type in ("cuda", "cpu")


def cpu_has_native_bf16() -> bool:
    """True when the CPU does bf16 math in hardware (AVX512-BF16 or AMX); emulated bf16 is slower
    than fp32, so autocast is only worth it with native support.

    ``CNNKIT_NATIVE_BF16=1`` (or ``0``) forces the answer, so both branches of ``precision:
    auto`` can be run on any CPU (bf16 is then emulated, correct but slow)."""
    forced = os.environ.get(NATIVE_BF16_ENV, "").strip()
    if forced in ("0", "1"):
        return forced == "1"
    if forced:
        raise CnnkitError(f"{NATIVE_BF16_ENV} must be 0 or 1, got '{forced}'")
    return _cpu_flags_bf16()


@functools.cache
def _cpu_flags_bf16() -> bool:
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        flags = cpuinfo.read_text(errors="ignore")
        return "avx512_bf16" in flags or "amx_bf16" in flags
    return False


def set_deterministic(enabled: bool) -> None:
    """Ask for deterministic kernels (bit-reproducible on GPU at some speed cost)."""
    torch.use_deterministic_algorithms(enabled, warn_only=True)
    torch.backends.cudnn.benchmark = not enabled
    if enabled:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch (all devices)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def epoch_seed(seed: int, epoch: int) -> int:
    """A seed for one epoch that depends only on (seed, epoch), so a resumed run replays it."""
    return (seed * 1_000_003 + epoch * 7919 + 1) % 2**63


def rng_state() -> dict:
    """All RNG states as tensors and plain values (safe for ``weights_only`` loading)."""
    state = {
        "torch": torch.get_rng_state(),
        "numpy": _numpy_state(),
        "python": _python_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    kind, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((kind, np.asarray(keys.numpy(), dtype=np.uint32), pos, has_gauss, gauss))
    version, internal, gauss_next = state["python"]
    random.setstate((version, tuple(internal), gauss_next))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _numpy_state() -> list:
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    return [kind, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(gauss)]


def _python_state() -> list:
    version, internal, gauss_next = random.getstate()
    return [version, list(internal), gauss_next]
