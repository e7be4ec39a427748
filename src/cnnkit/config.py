"""One validated configuration for a run, in five parts: data, model, optim, train, runtime.

Sources, later ones winning (``resolve``): the defaults below, the recipe's preset, a YAML file
(``--config``), CLI flags for common options, then dotted ``key=value`` overrides for any key
(``optim.weight_decay=5e-4``). Unknown keys, wrong types and choices outside a ``Literal`` raise
``CnnkitError`` naming the key, the valid keys or choices (with a did-you-mean) or the expected
type, when the config is loaded; nothing downstream validates them again. The resolved config is
saved as ``config.yaml`` in the run folder and is enough to repeat the run.
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from cnnkit import recipes
from cnnkit.errors import CnnkitError

OnOff = Literal["auto", "on", "off"]


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
    batch_size: int | Literal["auto"] = 128  # per process; "auto": measured for this machine
    num_workers: int | None = None  # DataLoader workers; None: chosen for the machine
    cache_dir: str = "~/.cache/cnnkit"  # downloads of built-in datasets, decoded image caches
    decode_cache: OnOff = "auto"  # auto: decode files once when they fit cache_memory | on | off
    cache_memory: float | None = None  # GiB a decoded split may take; None: half the free RAM
    hflip: float | Literal["alternate"] | None = None  # flip probability; None: dataset preset
    pad_crop: int | None = None  # random crop after padding by this many pixels; None: preset
    pad_mode: Literal["zero", "reflect"] = "zero"  # how pad_crop fills the border
    cutout: int = 0  # side in pixels of a square set to the mean colour per image; 0: off
    rotate: float = 0.0  # degrees: each image turned by an angle drawn in [-rotate, rotate]
    random_resized_crop: bool | None = None  # None: on for inputs of 64 px and more
    # [min, max] area of a random resized crop, fractions of the image; None: [0.08, 1] from
    # 128 px, [0.25, 1] below
    rrc_scale: list | None = None
    auto_augment: Literal["none", "trivial", "rand"] = "none"
    random_erasing: float = 0.0  # probability
    mixup: float = 0.0  # Beta(alpha, alpha) for MixUp; 0 turns it off
    cutmix: float = 0.0  # Beta(alpha, alpha) for CutMix; 0 turns it off
    check_files: bool = True  # decode every image file before training (cached by cnnkit doctor)
    skip_bad: bool = False  # leave out files that cannot be decoded instead of stopping
    # segmentation: the image and mask folders paired by file stem; None: the first pair of
    # images/+masks/, image/+label/, images/+labels/, image/+mask/ found
    image_dir: str | None = None
    mask_dir: str | None = None
    ignore_index: int = 255  # mask value of pixels not scored (binary 0/255 masks: none)


@dataclass
class ModelConfig:
    # "auto": chosen from the data and device (cnnkit.models.auto), the choice saved here;
    # else a registry name, "spec", "tv:<torchvision name>" or "timm:<name>"
    name: str = "auto"
    kwargs: dict = field(default_factory=dict)  # passed to the builder (e.g. layers for "spec")
    pretrained: bool = False  # adapted models only: download the published weights
    weights: str | None = None  # start from a cnnkit model file or a torchvision/timm state dict
    auto_choice: str | None = None  # written by a run with name "auto": what it picked, why
    # auto: with no published weights on disk, model auto tries downloading ImageNet weights
    # (2 s to answer; not when CI or HF_HUB_OFFLINE is set); never: no network
    download: Literal["auto", "never"] = "auto"


@dataclass
class OptimConfig:
    # sgd: Nesterov momentum; muon: Muon for the conv filters, Nesterov SGD for the rest
    name: Literal["sgd", "adamw", "muon"] = "sgd"
    lr: float | Literal["auto"] | None = None  # None: 0.1 per 256 images for sgd, 1e-3 adamw;
    # "auto": the lr finder's suggestion (cnnkit.evaluation.lr_finder), saved as a number
    momentum: float = 0.9
    nesterov: bool = True
    weight_decay: float | None = None  # None: 5e-4 for sgd, 0.05 for adamw; never on norm/bias
    betas: list = field(default_factory=lambda: [0.9, 0.999])
    scheduler: Literal[
        "onecycle", "cosine", "step", "plateau", "constant", "triangle", "linear"
    ] = "onecycle"  # fmt: skip
    warmup_epochs: float = 1.0  # cosine: linear warmup length
    step_size: int = 30  # step: epochs between decays
    gamma: float = 0.1  # step/plateau: decay factor
    plateau_patience: int = 3  # plateau: epochs without improvement before a decay
    norm_bias_lr_mult: float = 1.0  # lr multiplier for batch-norm biases (speedrun: 64)
    # lr of all but the classifier head, relative to lr: fine-tuning keeps pretrained features
    # from being wrecked by the new head's large early gradients (model auto, pretrained: 0.1)
    body_lr_mult: float = 1.0
    decoupled_wd: bool = False  # sgd: weight_decay is the shrink per step at peak lr, whatever lr
    muon_lr: float = 0.24  # muon: lr of the conv filters (their norm is held fixed)
    muon_momentum: float = 0.6  # muon: Nesterov momentum of the conv filters
    # speedrun_net: train the whitening layer's bias only for this many epochs, its lr (norm-bias
    # lr) falling to 0 by then (airbench94_muon: 3 of 8); None: trained all run at the base lr
    whiten_bias_epochs: float | None = None


@dataclass
class TrainConfig:
    # what is learned (cnnkit.tasks); a source of image and mask folders trains segmentation
    task: Literal["classification", "segmentation"] = "classification"
    # a preset under your own settings (cnnkit.recipes)
    recipe: Literal["default", "speedrun", "airbench94"] = "default"
    epochs: int = 20
    seed: int = 0
    deterministic: bool = False  # deterministic kernels (slower on GPU)
    label_smoothing: float = 0.1
    grad_clip: float | None = None  # max global gradient norm
    freeze_epochs: int = 0  # train only the head for this many epochs first (fine-tuning)
    # batch-norm running statistics: update, or frozen (the weights' own, kept); auto: frozen
    # when fine-tuning given or published weights with under 16 images per process and step
    bn_stats: Literal["auto", "update", "frozen"] = "auto"
    ema: bool = False  # keep an exponential moving average of the weights and evaluate it
    ema_decay: float = 0.999
    lookahead: bool = False  # every lookahead_every steps pull the weights toward a slow average
    lookahead_every: int = 5
    tta: Literal["none", "flip", "flip_translate"] = "none"  # final test score: mean of views
    # progressive resizing: the first epochs train on batches resized down to this fraction of
    # data.input_size, growing to the full size by progressive_epochs of the run (1.0: off)
    progressive_min: float = 1.0
    progressive_epochs: float = 0.5  # share of the epochs after which batches are full size
    # the metric that picks the best weights and drives early stopping
    # (segmentation: val_acc means val_miou, train_acc train_miou)
    monitor: Literal[
        "val_acc", "val_loss", "train_acc", "train_loss",
        "val_miou", "val_dice", "val_pixel_acc", "train_miou", "train_pixel_acc",
    ] = "val_acc"  # fmt: skip
    patience: int | None = None  # early stopping: epochs without improvement of monitor
    out_dir: str = "runs"
    name: str | None = None  # run folder name; None: <model>-<data>-<n>
    progress: Literal["auto", "bar", "plain"] = "auto"  # auto: a bar on a terminal
    tensorboard: bool = False
    # auto: sampler when the classes are imbalanced
    balance: Literal["auto", "sampler", "loss", "none"] = "auto"
    nan_policy: Literal["stop", "skip"] = "stop"  # what a non-finite loss does
    nan_limit: int = 10  # skip: stop anyway after this many skipped steps in a run
    report: bool = True  # write report.html and its PNG figures at the end of training
    ce_weight: float = 1.0  # segmentation loss: ce_weight x cross-entropy + dice_weight x Dice
    dice_weight: float = 1.0


@dataclass
class RuntimeConfig:
    device: str = "auto"  # auto | cpu | cuda | cuda:N | mps
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "auto"
    channels_last: OnOff = "auto"
    threads: int | None = None  # torch intra-op threads; None: the cores this process may use
    compile: OnOff = "auto"  # torch.compile the training model; auto: on CUDA
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
    _check_values(cfg)
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
    """Check ``value`` against the field's annotation; ints are accepted where floats are, and a
    string must be one of the field's ``Literal`` choices."""
    members = _members(typing.get_type_hints(type(part))[key])
    choices = [c for a in members if typing.get_origin(a) is Literal for c in typing.get_args(a)]
    allowed = tuple(
        typing.get_origin(a) or a for a in members if typing.get_origin(a) is not Literal
    )
    if value is None and type(None) in allowed:
        return None
    if choices:
        value = _choice(value, choices, f"{section}.{key}", allowed)
        if isinstance(value, str) and value in choices:
            return value
    if float in allowed and isinstance(value, str):
        value = _float_or_same(value)  # YAML 1.1 reads "5e-4" (no dot) as a string
    if isinstance(value, bool) and bool not in allowed:
        allowed_ok = False
    elif float in allowed and isinstance(value, int):
        return float(value)
    else:
        allowed_ok = isinstance(value, tuple(a for a in allowed if a is not type(None)))
    if not allowed_ok:
        names = [_type_name(a) for a in allowed] + [f"'{c}'" for c in choices]
        raise CnnkitError(
            f"config key '{section}.{key}' expects {' or '.join(names)}, got {value!r}"
        )
    return value


def _members(hint) -> tuple:
    """The members of a union annotation (``float | Literal["auto"] | None``), or the one type."""
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        return typing.get_args(hint)
    return (hint,)


def _type_name(cls) -> str:
    return "null" if cls is type(None) else cls.__name__


def _choice(value: Any, choices: list[str], key: str, allowed: tuple) -> Any:
    """A string must be one of ``choices`` (with a did-you-mean); other types pass through."""
    if isinstance(value, bool) and "on" in choices and bool not in allowed:
        return "on" if value else "off"  # YAML 1.1 reads on/off as booleans: auto|on|off keys
    if not isinstance(value, str) or value in choices:
        return value
    others = [_type_name(a) for a in allowed if a is not type(None)]
    if float in allowed and _float_or_same(value) != value:
        return value  # a number written as a string ("5e-4"); the type check converts it
    close = difflib.get_close_matches(value, choices, n=1)
    hint = f" Did you mean '{close[0]}'?" if close else ""
    if others:  # a number or a word: batch_size, lr, hflip
        words = " or ".join([*others, *(f"'{c}'" for c in choices)])
        raise CnnkitError(f"config key '{key}' expects {words}, got {value!r}.{hint}")
    raise CnnkitError(f"config key '{key}' is '{value}', not one of {', '.join(choices)}.{hint}")


def _float_or_same(text: str) -> float | str:
    try:
        return float(text)
    except ValueError:
        return text


SHORTCUTS = {  # option name -> config key, for train(...) keywords and CLI flags
    "model": "model.name",
    "epochs": "train.epochs",
    "batch_size": "data.batch_size",
    "lr": "optim.lr",
    "seed": "train.seed",
    "name": "train.name",
    "optimizer": "optim.name",
    "scheduler": "optim.scheduler",
    "input_size": "data.input_size",
    "val": "data.val",
    "test": "data.test",
    "device": "runtime.device",
    "precision": "runtime.precision",
    "pretrained": "model.pretrained",
    "weights": "model.weights",
    "freeze_epochs": "train.freeze_epochs",
    "num_workers": "data.num_workers",
    "out_dir": "train.out_dir",
    "progress": "train.progress",
    "skip_bad": "data.skip_bad",
    "balance": "train.balance",
    "nan_policy": "train.nan_policy",
    "report": "train.report",
    "recipe": "train.recipe",
    "task": "train.task",
}


def resolve(
    data_source: str | None = None,
    config: str | Path | Config | dict | None = None,
    overrides: list[str] | None = None,
    **options,
) -> Config:
    """Defaults < recipe preset < config file/dict < shortcut options < dotted overrides."""
    layers = [_config_layer(config), _options_layer(data_source, options)]
    layers += [parse_override(item) for item in overrides or []]
    user = Config()
    for layer in layers:
        user = from_dict(layer, user)
    given_batch = any("batch_size" in layer.get("data", {}) for layer in layers)
    cfg = from_dict(
        recipes.preset(user.train.recipe, user.data.batch_size if given_batch else None)
    )
    for layer in layers:
        cfg = from_dict(layer, cfg)
    return cfg


def _config_layer(config: str | Path | Config | dict | None) -> dict:
    """What the user's config sets, as a nested dict (a ``Config``: its non-default values)."""
    if config is None:
        return {}
    if isinstance(config, dict):
        return config
    if isinstance(config, Config):
        defaults = Config().to_dict()
        return {
            section: changed
            for section, values in config.to_dict().items()
            if (changed := {k: v for k, v in values.items() if defaults[section][k] != v})
        }
    return read_yaml(Path(config))


def _options_layer(data_source: str | None, options: dict) -> dict:
    flat = {} if data_source is None else {"data.source": data_source}
    for key, value in options.items():
        if key not in SHORTCUTS:
            raise CnnkitError(
                f"unknown option '{key}'; options: {', '.join(SHORTCUTS)} "
                "(use overrides=['section.key=value'] for the rest)"
            )
        if value is not None:
            flat[SHORTCUTS[key]] = value
    nested: dict = {}
    for key, value in flat.items():
        section, field = key.split(".")
        nested.setdefault(section, {})[field] = value
    return nested


def _check_values(cfg: Config) -> None:
    """Ranges the types cannot say."""
    if isinstance(cfg.data.batch_size, int) and cfg.data.batch_size < 1:
        raise CnnkitError(f"data.batch_size must be >= 1 or 'auto', got {cfg.data.batch_size}")
    if cfg.runtime.threads is not None and cfg.runtime.threads < 1:
        raise CnnkitError(f"runtime.threads must be >= 1 or null, got {cfg.runtime.threads}")
    d = cfg.data
    for key, value in (("hflip", d.hflip), ("random_erasing", d.random_erasing)):
        if isinstance(value, float) and not 0.0 <= value <= 1.0:
            raise CnnkitError(f"data.{key} is a probability in [0, 1], got {value}")
    if not cfg.optim.body_lr_mult > 0:
        raise CnnkitError(f"optim.body_lr_mult must be > 0, got {cfg.optim.body_lr_mult}")
    if not 0 <= d.ignore_index <= 255:
        raise CnnkitError(f"data.ignore_index is a mask value in 0..255, got {d.ignore_index}")
    if d.rrc_scale is not None and not (
        len(d.rrc_scale) == 2
        and all(isinstance(v, (int, float)) for v in d.rrc_scale)
        and 0 < d.rrc_scale[0] <= d.rrc_scale[1] <= 1
    ):
        raise CnnkitError(
            f"data.rrc_scale is [min, max] crop area, fractions with 0 < min <= max <= 1, "
            f"got {d.rrc_scale}"
        )
    if not 0 <= d.rotate <= 180:
        raise CnnkitError(f"data.rotate is an angle in degrees in [0, 180], got {d.rotate}")
    for key in ("pad_crop", "cutout", "mixup", "cutmix", "cache_memory"):
        value = getattr(d, key)
        if value is not None and value < 0:
            raise CnnkitError(f"data.{key} must be >= 0 (0 turns it off), got {value}")
    t = cfg.train
    if not 0.25 <= t.progressive_min <= 1.0:
        raise CnnkitError(
            f"train.progressive_min is the starting side as a fraction of data.input_size, in "
            f"[0.25, 1] (1 turns it off), got {t.progressive_min}"
        )
    if not 0.0 < t.progressive_epochs <= 1.0:
        raise CnnkitError(
            f"train.progressive_epochs is a share of the run in (0, 1], got {t.progressive_epochs}"
        )
    o = cfg.optim
    if o.whiten_bias_epochs is not None and not o.whiten_bias_epochs > 0:
        raise CnnkitError(
            f"optim.whiten_bias_epochs must be > 0 (or null: all run), got {o.whiten_bias_epochs}"
        )
    if not o.muon_lr > 0 or not 0 <= o.muon_momentum < 1:
        raise CnnkitError(
            f"optim.muon_lr must be > 0 and optim.muon_momentum in [0, 1); got {o.muon_lr} and "
            f"{o.muon_momentum}"
        )
    if t.ce_weight < 0 or t.dice_weight < 0 or t.ce_weight + t.dice_weight == 0:
        raise CnnkitError(
            f"train.ce_weight and train.dice_weight must be >= 0, not both 0; got "
            f"{t.ce_weight} and {t.dice_weight}"
        )
