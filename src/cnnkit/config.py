"""One validated configuration for a run, in five parts: data, model, optim, train, runtime.

Sources, later ones winning: the defaults below, a YAML file (``--config``), CLI flags for common
options, then dotted ``key=value`` overrides for any key (``optim.weight_decay=5e-4``). Unknown keys
and wrong types raise ``CnnkitError`` naming the key, the valid keys or the expected type. The
resolved config is saved as ``config.yaml`` in the run folder and is enough to repeat the run.
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from cnnkit.errors import CnnkitError


@dataclass
class DataConfig:
    source: str = (
        "digits"  # image folder, CSV of path,label, or a built-in name (digits, cifar10...)
    )
    val: str | None = None  # explicit validation folder/CSV; else val/ inside source, else carved
    test: str | None = None  # explicit test folder/CSV; else test/ inside source
    val_fraction: float = 0.1  # share of train carved out (seeded, stratified) when there is no val
    input_size: int | None = None  # square side in pixels; None: the dataset's native size
    mean: list | None = None  # per-channel normalisation (0..1 units); None: known or measured
    std: list | None = None  # (pretrained models set both to the values their weights expect)
    batch_size: int | str = 128  # per process; "auto": measured for this machine and model
    num_workers: int | None = None  # DataLoader workers; None: chosen for the machine
    cache_dir: str = "~/.cache/cnnkit"  # downloads of built-in datasets, decoded image caches
    decode_cache: str = "auto"  # auto: decode files once when they fit cache_memory | on | off
    cache_memory: float | None = None  # GiB a decoded split may take; None: half the free RAM
    hflip: float | str | None = None  # flip probability or "alternate"; None: preset by dataset
    pad_crop: int | None = None  # random crop after padding by this many pixels; None: preset
    pad_mode: str = "zero"  # zero | reflect: how pad_crop fills the border
    cutout: int = 0  # side in pixels of a square set to the mean colour per image; 0: off
    random_resized_crop: bool | None = None  # None: on for inputs of 64 px and more
    auto_augment: str = "none"  # none | trivial | rand
    random_erasing: float = 0.0  # probability
    mixup: float = 0.0  # Beta(alpha, alpha) for MixUp; 0 turns it off
    cutmix: float = 0.0  # Beta(alpha, alpha) for CutMix; 0 turns it off
    check_files: bool = True  # decode every image file before training (cached by cnnkit doctor)
    skip_bad: bool = False  # leave out files that cannot be decoded instead of stopping


@dataclass
class ModelConfig:
    name: str = "simple_cnn"  # registry name, "spec", "tv:<torchvision name>" or "timm:<name>"
    kwargs: dict = field(default_factory=dict)  # passed to the builder (e.g. layers for "spec")
    pretrained: bool = False  # adapted models only: download the published weights
    weights: str | None = None  # start from a cnnkit model file or a torchvision/timm state dict


@dataclass
class OptimConfig:
    name: str = "sgd"  # sgd (Nesterov) | adamw
    lr: float | str | None = None  # None: 0.1 per 256 images for sgd, 1e-3 for adamw;
    # "auto": the lr finder's suggestion (cnnkit.evaluation.lr_finder), saved as a number
    momentum: float = 0.9
    nesterov: bool = True
    weight_decay: float | None = None  # None: 5e-4 for sgd, 0.05 for adamw; never on norm/bias
    betas: list = field(default_factory=lambda: [0.9, 0.999])
    scheduler: str = "onecycle"  # onecycle | cosine | step | plateau | constant | triangle
    warmup_epochs: float = 1.0  # cosine: linear warmup length
    step_size: int = 30  # step: epochs between decays
    gamma: float = 0.1  # step/plateau: decay factor
    plateau_patience: int = 3  # plateau: epochs without improvement before a decay
    norm_bias_lr_mult: float = 1.0  # lr multiplier for batch-norm biases (speedrun: 64)
    decoupled_wd: bool = False  # sgd: weight_decay is the shrink per step at peak lr, whatever lr


@dataclass
class TrainConfig:
    recipe: str = "default"  # default | speedrun (32x32 data); a preset under your own settings
    epochs: int = 20
    seed: int = 0
    deterministic: bool = False  # deterministic kernels (slower on GPU)
    label_smoothing: float = 0.1
    grad_clip: float | None = None  # max global gradient norm
    freeze_epochs: int = 0  # train only the head for this many epochs first (fine-tuning)
    ema: bool = False  # keep an exponential moving average of the weights and evaluate it
    ema_decay: float = 0.999
    lookahead: bool = False  # every lookahead_every steps pull the weights toward a slow average
    lookahead_every: int = 5
    tta: str = "none"  # final test evaluation: none | flip | flip_translate (mean of views)
    monitor: str = "val_acc"  # metric that picks the best weights and drives early stopping
    patience: int | None = None  # early stopping: epochs without improvement of monitor
    out_dir: str = "runs"
    name: str | None = None  # run folder name; None: <model>-<data>-<n>
    progress: str = "auto"  # auto (bar on a TTY) | bar | plain
    tensorboard: bool = False
    balance: str = "auto"  # sampler | loss | none | auto (sampler when classes are imbalanced)
    nan_policy: str = "stop"  # stop | skip: what a non-finite loss does
    nan_limit: int = 10  # skip: stop anyway after this many skipped steps in a run
    report: bool = True  # write report.html and its PNG figures at the end of training


@dataclass
class RuntimeConfig:
    device: str = "auto"  # auto | cpu | cuda | cuda:N | mps
    precision: str = "auto"  # auto | fp32 | bf16 | fp16
    channels_last: str = "auto"  # auto | on | off
    threads: int | None = None  # torch intra-op threads; None: the cores this process may use
    compile: str = "auto"  # torch.compile the training model: auto (CUDA runs) | on | off
    sync_bn: bool = False  # distributed CUDA runs: batch-norm statistics over all processes


@dataclass
class Config:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    runtime: RuntimeConfig = field(default_factory=RuntimeConfig)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)


def from_dict(raw: dict, base: Config | None = None) -> Config:
    """Merge a nested dict into ``base`` (defaults when None), validating every key and type."""
    cfg = copy.deepcopy(base) if base is not None else Config()
    if not isinstance(raw, dict):
        raise CnnkitError(f"config must be a mapping of sections, got {type(raw).__name__}")
    for section, values in raw.items():
        part = getattr(cfg, _check_key(Config, section, ""), None)
        if not isinstance(values, dict):
            raise CnnkitError(f"config section '{section}' must be a mapping, got {values!r}")
        for key, value in values.items():
            setattr(part, _check_key(type(part), key, section), _coerce(part, key, value, section))
    return cfg


def load(
    path: str | Path | None = None, overrides: list[str] | None = None, base: Config | None = None
) -> Config:
    """Config from defaults (or ``base``), a YAML file, then ``key=value`` overrides."""
    cfg = base or Config()
    if path is not None:
        cfg = from_dict(read_yaml(Path(path)), cfg)
    for item in overrides or []:
        cfg = from_dict(parse_override(item), cfg)
    return cfg


def parse_override(item: str) -> dict:
    """``'optim.weight_decay=5e-4'`` -> ``{'optim': {'weight_decay': 5e-4}}``; values are YAML."""
    key, sep, text = item.partition("=")
    parts = key.strip().split(".")
    if not sep or len(parts) != 2 or not all(parts):
        raise CnnkitError(
            f"override '{item}' must look like section.key=value, "
            f"e.g. optim.weight_decay=5e-4 (sections: {', '.join(section_names())})"
        )
    try:
        value = yaml.safe_load(text) if text.strip() else None
    except yaml.YAMLError as e:
        raise CnnkitError(f"override '{item}': cannot read the value: {e}") from None
    return {parts[0]: {parts[1]: value}}


def section_names() -> list[str]:
    return [f.name for f in _fields(Config)]


def read_yaml(path: Path) -> dict:
    if not path.is_file():
        raise CnnkitError(f"config file not found: {path}")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise CnnkitError(f"config file {path} is not valid YAML: {e}") from None
    return raw


def _fields(cls) -> tuple[dataclasses.Field, ...]:
    return dataclasses.fields(cls)


def _check_key(cls, key: str, section: str) -> str:
    names = [f.name for f in _fields(cls)]
    if key in names:
        return key
    where = f"in section '{section}'" if section else "at the top level"
    close = difflib.get_close_matches(str(key), names, n=1)
    hint = f" Did you mean '{close[0]}'?" if close else ""
    raise CnnkitError(f"unknown config key '{key}' {where}.{hint} Valid keys: {', '.join(names)}")


def _coerce(part: Any, key: str, value: Any, section: str) -> Any:
    """Check ``value`` against the field's annotation; ints are accepted where floats are."""
    hint = typing.get_type_hints(type(part))[key]
    allowed = typing.get_args(hint) if isinstance(hint, types.UnionType) else (hint,)
    allowed = tuple(typing.get_origin(a) or a for a in allowed)
    if value is None and type(None) in allowed:
        return None
    if isinstance(value, bool) and str in allowed and bool not in allowed:
        return "on" if value else "off"  # YAML 1.1 reads on/off as booleans: auto|on|off keys
    if float in allowed and isinstance(value, str):
        value = _float_or_same(value)  # YAML 1.1 reads "5e-4" (no dot) as a string
    if isinstance(value, bool) and bool not in allowed:
        allowed_ok = False
    elif float in allowed and isinstance(value, int):
        return float(value)
    else:
        allowed_ok = isinstance(value, tuple(a for a in allowed if a is not type(None)))
    if not allowed_ok:
        names = " or ".join("null" if a is type(None) else a.__name__ for a in allowed)
        raise CnnkitError(f"config key '{section}.{key}' expects {names}, got {value!r}")
    return value


def _float_or_same(text: str) -> float | str:
    try:
        return float(text)
    except ValueError:
        return text
