"""The few helpers ``fit`` calls by name: EMA of weights, best-metric tracking with early stopping,
progress display and metric logging. Each keeps its state in plain values for the checkpoint."""

from __future__ import annotations

import copy
import csv
import io
import math
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import nn

from cnnkit.config import TrainConfig
from cnnkit.errors import CnnkitError
from cnnkit.fileio import atomic_write_bytes

# Metrics where smaller is better; everything else (accuracy...) is maximised.
MINIMIZED = {"val_loss", "train_loss"}


class Ema:
    """Exponential moving average of a model's weights: ``ema = d * ema + (1 - d) * w``.

    ``d`` warms up as ``min(decay, (1 + n) / (10 + n))`` after ``n`` updates, so short runs are
    not dominated by the random initial weights. Buffers (batch-norm statistics) are copied rather
    than averaged. The average is what gets evaluated and saved when EMA is on.
    """

    def __init__(self, model: nn.Module, decay: float):
        self.decay = decay
        self.updates = 0
        self.module = copy.deepcopy(model).eval().requires_grad_(False)
        self._param_names = {n for n, _ in self.module.named_parameters()}

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        self.updates += 1
        d = min(self.decay, (1 + self.updates) / (10 + self.updates))
        ema_state = self.module.state_dict()
        for name, value in model.state_dict().items():
            if name in self._param_names and value.dtype.is_floating_point:
                ema_state[name].lerp_(value, 1.0 - d)
            else:
                ema_state[name].copy_(value)

    def state_dict(self) -> dict:
        return {"module": self.module.state_dict(), "updates": self.updates}

    def load_state_dict(self, state: dict) -> None:
        self.module.load_state_dict(state["module"])
        self.updates = state["updates"]


class Lookahead:
    """Lookahead on the weights (Zhang et al. 2019, as airbench schedules it): every ``every``
    optimizer steps, ``slow = d * slow + (1 - d) * fast`` and then ``fast = slow``.

    ``d`` grows as ``0.95**every * (t / total_steps)**3``: near 0 early (plain SGD), strong
    averaging late. After step ``total_steps`` the model is left holding the slow weights.
    All floating-point state is averaged, batch-norm statistics included. The model itself is
    what gets evaluated (``module``), as with ``Ema``.
    """

    BASE = 0.95  # per-step decay the schedule ends at

    def __init__(self, model: nn.Module, every: int, total_steps: int):
        if every < 1:
            raise CnnkitError(f"train.lookahead_every must be >= 1, got {every}")
        self.module, self.every, self.total_steps = model, every, max(total_steps, 1)
        self.updates = 0
        self.slow = {k: v.detach().clone() for k, v in _float_state(model).items()}

    def decay(self, step: int) -> float:
        return self.BASE**self.every * (step / self.total_steps) ** 3

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        """Count a step. ``model`` may be a DDP or compiled wrapper: the pull works on the
        unwrapped ``module`` it was built with, which shares the wrapper's parameters."""
        self.updates += 1
        if self.updates % self.every == 0:
            self._pull(self.decay(self.updates))
        if self.updates == self.total_steps:
            self._pull(1.0)

    def _pull(self, decay: float) -> None:
        for name, fast in _float_state(self.module).items():
            slow = self.slow[name]
            slow.lerp_(fast, 1.0 - decay)
            fast.copy_(slow)

    def state_dict(self) -> dict:
        # the slow weights under "module", as in Ema's state, so checkpoint checks treat both alike
        return {"module": dict(self.slow), "updates": self.updates}

    def load_state_dict(self, state: dict) -> None:
        for name, value in state["module"].items():
            self.slow[name].copy_(value)
        self.updates = state["updates"]


def _float_state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v for k, v in model.state_dict().items() if v.dtype.is_floating_point}


def weight_averager(model: nn.Module, tc: TrainConfig, total_steps: int) -> Ema | Lookahead | None:
    """The run's weight averaging: ``Ema``, ``Lookahead`` or none (they do not combine)."""
    if tc.ema and tc.lookahead:
        raise CnnkitError("train.ema and train.lookahead both average the weights; pick one")
    if tc.lookahead:
        return Lookahead(model, tc.lookahead_every, total_steps)
    return Ema(model, tc.ema_decay) if tc.ema else None


class BestTracker:
    """Remembers the best value of the monitored metric and counts epochs since it improved."""

    def __init__(self, monitor: str, patience: int | None):
        self.monitor, self.patience = monitor, patience
        self.best: float | None = None
        self.best_epoch = -1
        self.bad_epochs = 0

    def update(self, metrics: dict, epoch: int) -> bool:
        """Record an epoch's metrics; True when it is the best so far."""
        value = metrics[self.monitor]
        better = self.best is None or (
            value < self.best if self.monitor in MINIMIZED else value > self.best
        )
        if better and not math.isnan(value):
            self.best, self.best_epoch, self.bad_epochs = value, epoch, 0
            return True
        self.bad_epochs += 1
        return False

    @property
    def should_stop(self) -> bool:
        return self.patience is not None and self.bad_epochs >= self.patience

    def score(self, metrics: dict) -> float:
        """The monitored value oriented so that larger is better (for ReduceLROnPlateau)."""
        value = metrics[self.monitor]
        return -value if self.monitor in MINIMIZED else value

    def state_dict(self) -> dict:
        return {"best": self.best, "best_epoch": self.best_epoch, "bad_epochs": self.bad_epochs}

    def load_state_dict(self, state: dict) -> None:
        self.best, self.best_epoch = state["best"], state["best_epoch"]
        self.bad_epochs = state["bad_epochs"]


class MetricsLog:
    """``metrics.csv`` (one row per epoch, rewritten atomically) and optional TensorBoard."""

    def __init__(self, run_dir: Path, tensorboard: bool = False, write: bool = True):
        self.path = run_dir / "metrics.csv"
        self.rows: list[dict] = []
        self.write = write  # False in distributed ranks other than 0: rows kept, no files
        use_tb = tensorboard and write
        self.writer = _tensorboard_writer(run_dir / "tensorboard") if use_tb else None

    def append(self, row: dict) -> None:
        self.rows.append(row)
        if not self.write:
            return
        buf = io.StringIO()
        writer = csv.DictWriter(buf, fieldnames=list(row))
        writer.writeheader()
        writer.writerows(self.rows)
        atomic_write_bytes(self.path, buf.getvalue().encode())
        if self.writer is not None:
            for key, value in row.items():
                if key != "epoch":
                    self.writer.add_scalar(key, value, row["epoch"])
            self.writer.flush()

    def hparams(self, hparams: dict, metrics: dict) -> None:
        """The run's config with its final metrics, so TensorBoard's HParams tab compares runs
        (NaN and None metrics, such as a missing validation split's, are left out)."""
        if self.writer is None:
            return
        shown = {
            f"hparam/{k}": float(v)
            for k, v in metrics.items()
            if isinstance(v, (int, float)) and v == v and k != "epoch"
        }
        self.writer.add_hparams(hparams, shown, run_name=".")
        self.writer.flush()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


def _tensorboard_writer(folder: Path):
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        raise CnnkitError(
            "train.tensorboard=true needs TensorBoard: pip install 'cnnkit[tensorboard]'"
        ) from None
    return SummaryWriter(str(folder))


PLAIN_EVERY_S = 30.0  # plain mode: a progress line within long epochs at most this often


class Progress:
    """A progress bar per epoch on a terminal; plain log lines otherwise (CI, pipes, --quiet):
    one per epoch, plus one every ``PLAIN_EVERY_S`` seconds inside long epochs. ``shown``: the
    metrics.csv fields an epoch's line prints (the task's); a running line prints the fields of
    the training summary."""

    def __init__(self, mode: str, epochs: int, shown: Sequence[str] = ("train_loss", "val_loss")):
        self.bar = mode == "bar" or (mode == "auto" and sys.stderr.isatty())
        self.epochs, self.shown = epochs, tuple(shown)
        self._live = None

    def start_epoch(self, epoch: int, steps: int) -> None:
        self._t0, self._steps = time.perf_counter(), steps
        self._epoch, self._last_line = epoch, self._t0
        if self.bar:
            # local: rich's Progress would shadow this class's name at module level
            from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn

            self._live = Progress(
                TextColumn(f"epoch {epoch + 1}/{self.epochs}"),
                BarColumn(),
                TextColumn("{task.completed}/{task.total}"),
                TimeRemainingColumn(),
                TextColumn("{task.fields[info]}"),
                transient=True,
            )
            self._live.start()
            self._task = self._live.add_task("train", total=steps, info="")

    def step(self, step: int, running: dict) -> None:
        now = time.perf_counter()
        if self._live is None and now - self._last_line < PLAIN_EVERY_S:
            return
        elapsed = now - self._t0
        fields = [f"{k} {v:.4f}" for k, v in running.items() if k not in ("lr", "images")]
        info = (
            f"{'  '.join(fields)} lr {running['lr']:.3g} "
            f"{running['images'] / max(elapsed, 1e-9):.0f} img/s"
        )
        if self._live is not None:
            self._live.update(self._task, completed=step, info=info)
            return
        self._last_line = now
        eta = elapsed / step * (self._steps - step)
        print(
            f"epoch {self._epoch + 1}/{self.epochs} step {step}/{self._steps}  {info}  "
            f"eta {eta:.0f}s",
            flush=True,
        )

    def end_epoch(self, row: dict) -> None:
        if self._live is not None:
            self._live.stop()
            self._live = None
        print(format_row(row, self.epochs, self.shown), flush=True)

    def message(self, text: str) -> None:
        print(text, flush=True)

    def close(self) -> None:
        if self._live is not None:
            self._live.stop()
            self._live = None


class SilentProgress(Progress):
    """Progress of distributed ranks other than 0: prints nothing."""

    def __init__(self, epochs: int) -> None:
        super().__init__("plain", epochs)

    def start_epoch(self, epoch: int, steps: int) -> None:
        pass

    def step(self, step: int, running: dict) -> None:
        pass

    def end_epoch(self, row: dict) -> None:
        pass

    def message(self, text: str) -> None:
        pass


def format_row(row: dict, epochs: int, shown: Sequence[str]) -> str:
    parts = [f"epoch {row['epoch']}/{epochs}"]
    for key in shown:
        if key in row and row[key] == row[key]:  # skip NaN (no validation split)
            parts.append(f"{key} {row[key]:.4f}")
    parts.append(f"lr {row['lr']:.3g}")
    parts.append(f"{row['images_per_s']:.0f} img/s")
    parts.append(f"{row['epoch_time']:.1f}s")
    return "  ".join(parts)
