"""Search spaces of ``cnnkit tune``: a default per recipe, overridden or narrowed by a YAML file.

A space maps dotted config keys (``optim.lr``, or ``model.kwargs.depth`` for a builder's
keyword) to a range or a list::

    optim.lr: {low: 1e-3, high: 0.3, log: true}
    data.batch_size: {choices: [64, 128]}
    train.label_smoothing: null      # leave the default space's entry out (keep the config's)

Every bound and choice is checked as the config checks a value (unknown keys with a
did-you-mean, types, ranges), so a bad space fails before the first trial. ``train.epochs`` is
the budget, not a parameter: each trial trains up to it and the pruner ends weak ones early.
"""

from __future__ import annotations

import difflib
import json
import math
from dataclasses import dataclass
from pathlib import Path

from cnnkit.config import from_dict, parse_override, read_yaml
from cnnkit.errors import CnnkitError

SPEC_KEYS = ("low", "high", "log", "step", "choices")


@dataclass(frozen=True)
class Param:
    """One dimension: a float or int range (``log``: sampled on a log scale) or ``choices``."""

    key: str
    low: float | None = None
    high: float | None = None
    log: bool = False
    step: float | None = None
    choices: tuple | None = None

    def suggest(self, trial):
        """The trial's value (``trial``: an ``optuna.Trial``)."""
        if self.choices is not None:
            return trial.suggest_categorical(self.key, list(self.choices))
        if isinstance(self.low, int) and isinstance(self.high, int) and self.step != 0.0:
            return trial.suggest_int(self.key, self.low, self.high, log=self.log)
        return trial.suggest_float(self.key, self.low, self.high, log=self.log, step=self.step)


DEFAULT_SPACES = {  # recipe -> {key: spec}; lr and decay span about 100x around the defaults
    "default": {
        "optim.lr": {"low": 0.01, "high": 0.5, "log": True},  # sgd's default: 0.05 at batch 128
        "optim.weight_decay": {"low": 1e-5, "high": 1e-2, "log": True},
        "train.label_smoothing": {"low": 0.0, "high": 0.2},
        "data.batch_size": {"choices": [64, 128, 256]},
        "data.mixup": {"low": 0.0, "high": 0.4},  # augmentation strength (0: off)
    },
    "speedrun": {  # the recipe's values (recipes.py) sit inside these ranges
        "optim.lr": {"low": 0.5, "high": 4.0, "log": True},
        "optim.muon_lr": {"low": 0.08, "high": 0.6, "log": True},
        "optim.weight_decay": {"low": 5e-4, "high": 8e-3, "log": True},
        "train.label_smoothing": {"low": 0.0, "high": 0.3},
    },
    "airbench94": {  # airbench94's values (recipes.py) sit inside these ranges
        "optim.lr": {"low": 0.5, "high": 4.0, "log": True},
        "optim.weight_decay": {"low": 5e-4, "high": 8e-3, "log": True},
        "train.label_smoothing": {"low": 0.0, "high": 0.3},
    },
}
ADAMW_SPACE = {  # adamw trains at ~100x smaller lrs, with larger decoupled decay
    "optim.lr": {"low": 1e-4, "high": 1e-2, "log": True},
    "optim.weight_decay": {"low": 1e-3, "high": 0.3, "log": True},
}
SEGMENTATION_SPACE = {  # image/mask folders: AdamW (auto.segmentation_settings), small batches
    "optim.lr": {"low": 3e-4, "high": 3e-2, "log": True},  # the task's default: 3e-3
    "optim.weight_decay": {"low": 1e-3, "high": 0.3, "log": True},
    "data.batch_size": {"choices": [2, 4, 8]},
    "train.dice_weight": {"low": 0.0, "high": 2.0},  # against cross-entropy's 1
}
WIDTH_DEPTH = {"depth": {"choices": [1, 2]}}  # builders that take these keywords (simple_cnn)


def default_space(
    recipe: str, optimizer: str, model_kwargs: tuple[str, ...] = (), task: str = "classification"
) -> dict:
    """The default space as specs: the recipe's, adamw ranges under adamw, and the model's
    width/depth keywords when its builder takes them (simple_cnn's); segmentation: its own."""
    if task == "segmentation":
        return dict(SEGMENTATION_SPACE)
    space = dict(DEFAULT_SPACES[recipe])
    if optimizer == "adamw":
        space.update(ADAMW_SPACE)
    space.update({f"model.kwargs.{k}": v for k, v in WIDTH_DEPTH.items() if k in model_kwargs})
    return space


def build(defaults: dict, path: str | Path | None = None) -> list[Param]:
    """The space: ``defaults`` with the YAML file at ``path`` laid over it, every entry checked."""
    space = dict(defaults)
    if path is not None:
        raw = read_yaml(Path(path))
        if not isinstance(raw, dict):
            raise CnnkitError(f"search space {path} must map config keys to ranges")
        for key, spec in raw.items():
            if spec is None:
                space.pop(str(key), None)
            else:
                space[str(key)] = spec
    return [_param(key, spec, path) for key, spec in space.items()]


def _param(key: str, spec, path) -> Param:
    where = f"search space {path}: " if path else "search space: "
    if not isinstance(spec, dict):
        spec = {"choices": [spec]}  # a fixed value
    for name in spec:
        if name not in SPEC_KEYS:
            close = difflib.get_close_matches(str(name), SPEC_KEYS, n=1)
            hint = f" Did you mean '{close[0]}'?" if close else ""
            raise CnnkitError(
                f"{where}'{key}' has unknown field '{name}'.{hint} Fields: {', '.join(SPEC_KEYS)}"
            )
    if "choices" in spec:
        choices = spec["choices"]
        if not isinstance(choices, list) or not choices:
            raise CnnkitError(f"{where}'{key}' choices must be a non-empty list, got {choices!r}")
        for value in choices:
            check_value(key, value, where)
        return Param(key, choices=tuple(choices))
    low, high = _number(spec, "low", key, where), _number(spec, "high", key, where)
    log, step = bool(spec.get("log", False)), spec.get("step")
    if not low < high:
        raise CnnkitError(f"{where}'{key}' needs low < high, got low {low}, high {high}")
    if log and low <= 0:
        raise CnnkitError(f"{where}'{key}' is sampled on a log scale: low must be > 0, got {low}")
    check_value(key, low, where)
    check_value(key, high, where)
    return Param(key, low, high, log, step)


def _number(spec: dict, name: str, key: str, where: str) -> float:
    value = spec.get(name)
    if isinstance(value, str):
        try:
            value = float(value)  # YAML 1.1 reads 1e-3 (no dot) as a string
        except ValueError:
            pass
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise CnnkitError(f"{where}'{key}' needs a number '{name}' (or 'choices'), got {value!r}")
    return value


def check_value(key: str, value, where: str = "") -> None:
    """Refuse ``key=value`` as the config would (model.kwargs.NAME takes any value)."""
    try:
        override(key, value, {})
    except CnnkitError as e:
        raise CnnkitError(f"{where}{e}") from None


def override(key: str, value, model_kwargs: dict) -> str:
    """``key=value`` as a checked ``section.key=value`` override for ``cnnkit.run.train``;
    ``model.kwargs.NAME`` becomes the whole ``model.kwargs`` with NAME set in ``model_kwargs``."""
    parts = key.split(".")
    if parts[:2] == ["model", "kwargs"] and len(parts) == 3:
        key, value = "model.kwargs", {**model_kwargs, parts[2]: value}
    item = f"{key}={json.dumps(value)}"  # JSON is YAML, which parse_override reads
    from_dict(parse_override(item))
    return item
