"""What a run trains, made from its config: the data (``build_data``, under torchrun the first
process of each machine decodes first), the model (a zoo name, an import path or the user's own
module, with its starting weights), the normalisation published weights expect, the checks a
recipe makes of the data, and the metadata its model file carries. ``cnnkit.run`` calls these.
"""

from __future__ import annotations

import dataclasses

from torch import nn

from cnnkit import __version__, data, models, recipes
from cnnkit.config import Config
from cnnkit.data import images as image_files
from cnnkit.data import masks
from cnnkit.engine import distributed
from cnnkit.errors import CnnkitError
from cnnkit.modelfile import load_model_file, read_weights
from cnnkit.models import auto, published


def model_option(options: dict) -> tuple[dict, nn.Module | None]:
    """``model=`` given as a module (returned, to train in place), a class or a builder: the
    config holds its name (``models.name_for``) either way."""
    value = options.get("model")
    if not callable(value):
        return options, None
    module = value if isinstance(value, nn.Module) else None
    return {**options, "model": models.name_for(value)}, module


def resolve_auto_model(cfg: Config, device: str) -> auto.Choice | None:
    """``model.name: auto``: pick the model (and, for photos, the training side) from the data
    and ``device`` (its type: cpu, cuda, mps), write the choice into ``cfg`` (so config.yaml
    records it and a resume rebuilds the same net) and print it once."""
    choice = auto_choice(cfg, device, fetch=True)
    if choice is None:
        return None
    if cfg.data.input_size is None:
        cfg.data.input_size = choice.input_size
    elif cfg.data.input_size != choice.input_size:  # the user's side wins; the line says so
        given = f"{choice.reason}; --input-size {cfg.data.input_size} as given"
        choice = dataclasses.replace(choice, input_size=cfg.data.input_size, reason=given)
    cfg.model.name, cfg.model.auto_choice = choice.name, choice.line()
    cfg.model.pretrained = choice.pretrained
    cfg.model.kwargs = {**cfg.model.kwargs, **choice.kwargs}
    apply_defaults(cfg, choice.settings)  # keys the user left at their defaults
    if choice.pretrained and cfg.train.freeze_epochs == 0:
        cfg.train.freeze_epochs = 1  # head-only warm-up: a random head would wreck the body
    if choice.pretrained and cfg.optim.body_lr_mult == 1.0:
        cfg.optim.body_lr_mult = auto.PRETRAINED_BODY_LR_MULT
    if distributed.current().main:
        print(choice.line(), flush=True)
    return choice


SMALL_BN_BATCH = 16  # images per process: fewer give batch statistics too noisy to learn from


def resolve_bn_stats(cfg: Config) -> None:
    """``train.bn_stats: auto`` (after the batch size is known): fine-tuning given or published
    weights on small batches keeps their batch-norm statistics, which a few noisy batches would
    otherwise overwrite; anything else updates them. The resolved value goes into config.yaml."""
    if cfg.train.bn_stats != "auto":
        return
    fine_tuning = cfg.model.pretrained or cfg.model.weights is not None
    small = cfg.data.batch_size < SMALL_BN_BATCH
    cfg.train.bn_stats = "frozen" if fine_tuning and small else "update"


def auto_choice(cfg: Config, device: str, fetch: bool = False) -> auto.Choice | None:
    """What ``model.name: auto`` picks for this config's data on ``device``; None when the
    config names a model. Reads file headers and caches; with ``fetch``, photos with no
    published weights on disk may download them (``_fetch_weights``)."""
    if cfg.model.name != auto.AUTO:
        return None
    if cfg.train.task == "segmentation":
        return auto.choose_segmentation(*masks.peek(cfg.data), device)
    side, count = data.peek(cfg.data)
    arch = _weights_architecture(cfg.model.weights) if cfg.model.weights else None
    photos = side > auto.SMALL_MAX_SIDE
    found = published.find() if photos else None
    missing = f"no pretrained weights on disk ({published.looked_where()})"
    if photos and found is None and arch is None and not cfg.model.pretrained and fetch:
        found, failed = _fetch_weights(cfg.model.download)
        missing = f"{missing}; {failed}"
    return auto.choose(side, count, device, found, arch, cfg.model.pretrained, missing)


def _fetch_weights(setting: str) -> tuple[published.Published | None, str]:
    """Published weights downloaded for ``model: auto``, or None and why not. Under torchrun
    no process downloads: each must make the same choice."""
    why_not = published.why_not_download(setting)
    if not why_not and distributed.current().enabled:
        why_not = "distributed run"
    if why_not:
        return None, f"not downloading: {why_not}"
    return published.fetch(lambda line: print(line, flush=True))


def _weights_architecture(path: str) -> str | None:
    """The model name a ``--weights`` file fits (its metadata, or its keys), or None."""
    try:
        meta = load_model_file(path)[1]
    except CnnkitError:  # not a cnnkit model file: a plain state dict
        meta = None
    return auto.weights_architecture(read_weights(path), meta)


def build_model(
    cfg: Config, splits, load_weights: bool = True, module: nn.Module | None = None
) -> nn.Module:
    """The configured architecture (or ``module``, the user's own); with ``load_weights`` also
    its starting weights (published or from a file). Resuming passes False: the checkpoint
    holds the weights, no download."""
    mc = cfg.model
    num_classes, in_chans = len(splits.classes), splits.in_chans
    if module is not None:
        model = _from_module(module, cfg, num_classes, in_chans)
    else:
        model = models.create_model(
            mc.name,
            num_classes=num_classes,
            in_chans=in_chans,
            pretrained=mc.pretrained and load_weights,
            **mc.kwargs,
        )
    # not one of ours (fpn:resnet18_slim only looks like a path): run it once before training
    if models.is_import_path(mc.name) and models.head_prefix(mc.name) is None:
        models.check_logits(model, mc.name, (in_chans, *splits.input_size), num_classes)
    if load_weights and mc.weights:
        skipped = models.load_state_into(model, read_weights(mc.weights))
        if skipped:
            print(
                f"note: {len(skipped)} head tensors of {mc.weights} did not match "
                f"{len(splits.classes)} classes; the head starts fresh"
            )
    if load_weights and cfg.train.freeze_epochs and not (mc.weights or mc.pretrained):
        print(
            "note: --freeze-epochs without --weights or --pretrained trains a random body "
            "only later; it is meant for fine-tuning"
        )
    return model


def _from_module(module: nn.Module, cfg: Config, num_classes: int, in_chans: int) -> nn.Module:
    if cfg.model.pretrained:
        raise CnnkitError(
            "model.pretrained downloads published weights for tv:/timm: names; a module you "
            "pass trains from the weights it has"
        )
    model = models.as_classifier(module, cfg.model.name, num_classes, in_chans)
    note = models.rebuild_note(model, cfg.model.name, cfg.model.kwargs, num_classes, in_chans)
    if note and distributed.current().main:
        print(f"note: {note}")
    return model


def match_pretrained_normalisation(cfg: Config, splits, model: nn.Module):
    """Published weights expect the mean/std they were trained with (ImageNet's, usually), not
    the statistics of the user's data; rebuild the splits with them unless data.mean is set."""
    mean, std = model.default_cfg["mean"], model.default_cfg["std"]
    if not cfg.model.pretrained or cfg.data.mean is not None or len(mean) != splits.in_chans:
        return splits
    cfg.data.mean, cfg.data.std = [float(v) for v in mean], [float(v) for v in std]
    return data.build(cfg.data, seed=cfg.train.seed, note=_data_note())


def build_data(cfg: Config):
    """``data.build`` for a run. Under torchrun the first process of each machine builds first,
    decoding (and so checking) the files into the cache once; the others then read it back
    instead of decoding the same files at the same time."""
    dd = distributed.current()
    if dd.enabled and dd.local_rank != 0:
        distributed.barrier()  # wait for this machine's first process to fill the cache
    splits = masks.build_splits(cfg.data, cfg.train.task, cfg.train.seed, _data_note())
    if dd.enabled and dd.local_rank == 0:
        distributed.barrier()
    return splits


# segmentation: the classification names of these keys, and what they mean there
SEGMENTATION_MONITORS = {"val_acc": "val_miou", "train_acc": "train_miou"}


def resolve_task(cfg: Config) -> None:
    """Make ``cfg`` say the task its data is for: a folder of image and mask folders trains
    segmentation (``train.task`` set, monitor val_acc read as val_miou, the keys the user left
    at their defaults set to the task's: ``auto.segmentation_settings``); refuse what the task
    cannot do. The config saved with the run holds the result."""
    main = distributed.current().main
    if cfg.train.task == "classification" and masks.is_mask_source(cfg.data):
        cfg.train.task = "segmentation"
        if main:
            print(f"note: {cfg.data.source} holds image and mask folders: task segmentation")
    if cfg.train.task != "segmentation":
        return
    cfg.train.monitor = SEGMENTATION_MONITORS.get(cfg.train.monitor, cfg.train.monitor)
    applied = apply_defaults(
        cfg, auto.segmentation_settings(len(masks.train_pairs(cfg.data)), cfg.optim.name)
    )
    if applied and main:
        print(f"segmentation defaults where not set: {applied}", flush=True)
    unsupported = [
        key for key, value in (("data.batch_size=auto", cfg.data.batch_size == "auto"),) if value
    ]
    if unsupported:
        raise CnnkitError(f"segmentation does not support {', '.join(unsupported)} yet")
    if cfg.model.name != auto.AUTO and models.model_task(cfg.model.name) != "segmentation":
        raise CnnkitError(
            f"model '{cfg.model.name}' is a classifier; segmentation needs a model with "
            f"per-pixel outputs: {', '.join(models.list_models(task='segmentation'))}, or a "
            f"decoder head on a backbone: fpn:{cfg.model.name}, deeplab:{cfg.model.name}"
        )


def apply_defaults(cfg: Config, settings) -> str:
    """Set each (section, key, value) of ``settings`` whose key ``cfg`` holds at its default;
    returns what was set, as "section.key=value, ..." (the override that sets it)."""
    defaults = Config()
    applied = []
    for section, key, value in settings:
        if getattr(getattr(cfg, section), key) == getattr(getattr(defaults, section), key):
            setattr(getattr(cfg, section), key, value)
            applied.append(f"{section}.{key}={value}")
    return ", ".join(applied)


def _data_note():
    """Where a training run's data notes (decoding once...) go: the progress output (stdout) of
    the main process; other ranks stay silent."""
    return (lambda text: print(text, flush=True)) if distributed.current().main else _silent


def _silent(text: str) -> None:
    pass


def model_meta(cfg: Config, splits, precision: str) -> dict:
    """What the model file must carry to be used without the training data or config;
    ``precision`` is the run's (fp32 | bf16 | fp16), the default for scoring and predicting."""
    return {
        "task": cfg.train.task,
        "arch": cfg.model.name,
        "kwargs": cfg.model.kwargs,
        "num_classes": len(splits.classes),
        "in_chans": splits.in_chans,
        "classes": list(splits.classes),
        "input_size": list(splits.input_size),
        "mean": list(splits.mean),
        "std": list(splits.std),
        "preprocessing": splits.preprocessing,
        "dataset": splits.name,
        "fingerprint": splits.fingerprint,
        "precision": precision,
        "cnnkit_version": __version__,
    }


def check_recipe_data(cfg: Config, splits) -> None:
    """Refuse data a recipe cannot train; say what it resized."""
    recipe = cfg.train.recipe
    if recipe not in ("speedrun", "airbench94"):
        return
    side = recipes.SPEEDRUN_SIDE
    if tuple(splits.input_size) != (side, side):
        raise CnnkitError(
            f"the {recipe} recipe trains at {side}x{side} but data.input_size is "
            f"{cfg.data.input_size}; drop data.input_size or use --recipe default"
        )
    native = _native_size(splits.train)
    if native is not None and native != (side, side):
        print(
            f"note: {recipe} recipe: images of {native[0]}x{native[1]} are resized to "
            f"{side}x{side}; the recipe is tuned for CIFAR-like 32x32 data"
        )
    if splits.test is None and splits.val is None:
        print("note: no test or validation split: the run ends without a score")


def _native_size(dataset) -> tuple[int, int] | None:
    """(H, W) of the first training image (in-memory tensor or file header)."""
    images = getattr(dataset, "images", None)
    if images is not None:
        return tuple(images.shape[-2:])
    paths = getattr(dataset, "paths", None)
    if paths:
        width, height, _ = image_files.image_info(paths[0])
        return height, width
    return None
