"""The Python API behind every CLI verb: train, load_model, evaluate, predict.

``train`` is the path of one run: config -> data.build -> models.create -> engine.fit -> the run
folder. The others read a model file (or a run folder holding one) and nothing else.
"""

from __future__ import annotations

import json
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from cnnkit import __version__, data, models
from cnnkit.config import Config, RuntimeConfig, from_dict, load
from cnnkit.deploy.formats import is_exported, load_exported
from cnnkit.engine import runtime
from cnnkit.engine.checkpoint import atomic_write_bytes, load_checkpoint, load_model_file
from cnnkit.engine.fit import CHECKPOINT, FitResult, fit
from cnnkit.engine.loop import evaluate as evaluate_loader
from cnnkit.errors import CnnkitError
from cnnkit.evaluation.metrics import summarize

MODEL_FILE = "model.safetensors"


@dataclass
class TrainResult:
    run_dir: Path
    fit: FitResult
    test: dict | None  # metrics of the best weights on the test split (or val when no test)
    test_split: str | None  # "test" | "val" | None


def train(
    data_source: str | None = None,
    *,
    config: str | Path | Config | dict | None = None,
    overrides: list[str] | None = None,
    resume: str | Path | None = None,
    stop_after: int | None = None,
    **options,
) -> TrainResult:
    """Train a classifier and return where the run went and how it scored.

    ``data_source``: folder, CSV or built-in name (default: digits). ``config``: YAML path, dict or
    ``Config``. ``options``: section-free shortcuts ``model``, ``epochs``, ``batch_size``, ``lr``,
    ``seed``, ``name``, ... applied after the config; ``overrides``: dotted ``key=value`` strings
    applied last. ``resume``: a run folder to continue exactly where its checkpoint stopped.
    """
    if resume is not None:
        return _resume(Path(resume), stop_after)
    cfg = resolve_config(data_source, config, overrides, **options)
    runtime.seed_everything(cfg.train.seed)
    splits = data.build(cfg.data, seed=cfg.train.seed)
    model = _build_model(cfg, splits)
    splits = _match_pretrained_normalisation(cfg, splits, model)
    run_dir = _new_run_dir(cfg, splits.name)
    return _fit_in(
        run_dir, model, splits, cfg, resume_state=None, stop_after=stop_after, created=True
    )


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
    "device": "runtime.device",
    "precision": "runtime.precision",
    "pretrained": "model.pretrained",
    "weights": "model.weights",
    "freeze_epochs": "train.freeze_epochs",
    "num_workers": "data.num_workers",
    "out_dir": "train.out_dir",
    "progress": "train.progress",
}


def resolve_config(
    data_source: str | None = None,
    config: str | Path | Config | dict | None = None,
    overrides: list[str] | None = None,
    **options,
) -> Config:
    """Defaults < config file/dict < shortcut options < dotted overrides."""
    if isinstance(config, Config):
        cfg = config
    elif isinstance(config, dict):
        cfg = from_dict(config)
    else:
        cfg = load(config)
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
    return load(None, overrides, base=from_dict(nested, cfg))


def _resume(run_dir: Path, stop_after: int | None) -> TrainResult:
    if not run_dir.is_dir():
        raise CnnkitError(f"--resume: run folder not found: {run_dir}")
    if not (run_dir / CHECKPOINT).is_file():
        raise CnnkitError(f"--resume: no checkpoint in {run_dir} (expected {run_dir / CHECKPOINT})")
    state = load_checkpoint(run_dir / CHECKPOINT)
    cfg = from_dict(state["config"])
    if state["epoch"] >= cfg.train.epochs:
        raise CnnkitError(f"--resume: {run_dir} already finished its {cfg.train.epochs} epochs")
    splits = data.build(cfg.data, seed=cfg.train.seed)
    model = _build_model(cfg, splits, load_weights=False)
    return _fit_in(
        run_dir, model, splits, cfg, resume_state=state, stop_after=stop_after, created=False
    )


def _fit_in(
    run_dir: Path, model: nn.Module, splits, cfg: Config, *, resume_state, stop_after, created: bool
) -> TrainResult:
    atomic_write_bytes(run_dir / "config.yaml", cfg.to_yaml().encode())
    try:
        result = fit(
            model,
            splits,
            cfg,
            run_dir,
            model_meta(cfg, splits),
            resume=resume_state,
            stop_after=stop_after,
        )
    except (CnnkitError, KeyboardInterrupt) as e:
        if created and not (run_dir / CHECKPOINT).exists():
            shutil.rmtree(run_dir, ignore_errors=True)  # nothing worth keeping was made yet
        elif isinstance(e, KeyboardInterrupt):
            print(f"\ninterrupted; continue with: cnnkit train --resume {run_dir}")
        raise
    test, split_name = _final_eval(run_dir, splits, cfg)
    return TrainResult(run_dir=run_dir, fit=result, test=test, test_split=split_name)


def _final_eval(run_dir: Path, splits, cfg: Config) -> tuple[dict | None, str | None]:
    """Score the saved best weights on the test split (val when there is none); saved as JSON."""
    dataset, name = (splits.test, "test") if splits.test is not None else (splits.val, "val")
    if dataset is None:
        return None, None
    model = load_model(run_dir / MODEL_FILE, device=cfg.runtime.device)
    metrics = _score(model, dataset, cfg.data.batch_size, cfg.runtime.device, cfg.data.num_workers)
    atomic_write_bytes(run_dir / f"{name}_metrics.json", json.dumps(metrics, indent=2).encode())
    return metrics, name


def _build_model(cfg: Config, splits, load_weights: bool = True) -> nn.Module:
    """The configured architecture; with ``load_weights`` also its starting weights (published
    or from a file). Resuming passes False: the checkpoint holds the weights, no download."""
    mc = cfg.model
    model = models.create_model(
        mc.name,
        num_classes=len(splits.classes),
        in_chans=splits.in_chans,
        pretrained=mc.pretrained and load_weights,
        **mc.kwargs,
    )
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


def _match_pretrained_normalisation(cfg: Config, splits, model: nn.Module):
    """Published weights expect the mean/std they were trained with (ImageNet's, usually), not
    the statistics of the user's data; rebuild the splits with them unless data.mean is set."""
    mean, std = model.default_cfg["mean"], model.default_cfg["std"]
    if not cfg.model.pretrained or cfg.data.mean is not None or len(mean) != splits.in_chans:
        return splits
    cfg.data.mean, cfg.data.std = [float(v) for v in mean], [float(v) for v in std]
    return data.build(cfg.data, seed=cfg.train.seed)


def read_weights(path: str | Path) -> dict:
    """A state dict from a cnnkit model file, a plain safetensors file or a torch .pt/.pth file."""
    path = Path(path)
    if not path.is_file():
        raise CnnkitError(f"weights file not found: {path}")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            return load_file(str(path))
        except Exception as e:  # noqa: BLE001 - safetensors raises several types
            raise CnnkitError(f"cannot read weights {path}: {e}") from None
    state = load_checkpoint(path)
    for key in ("state_dict", "model", "model_state_dict"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if not isinstance(state, dict) or not all(torch.is_tensor(v) for v in state.values()):
        raise CnnkitError(f"{path} does not hold a state dict of tensors")
    return state


def model_meta(cfg: Config, splits) -> dict:
    """What the model file must carry to be used without the training data or config."""
    return {
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
        "cnnkit_version": __version__,
    }


def _new_run_dir(cfg: Config, data_name: str) -> Path:
    root = Path(cfg.train.out_dir)
    if cfg.train.name:
        run_dir = root / cfg.train.name
        if run_dir.exists() and any(run_dir.iterdir()):
            raise CnnkitError(
                f"run folder {run_dir} already exists; continue it with --resume "
                f"{run_dir} or pick another --name"
            )
        run_dir.mkdir(parents=True, exist_ok=True)
        return run_dir
    stem = re.sub(r"[^A-Za-z0-9_.-]+", "-", f"{cfg.model.name}-{data_name}").strip("-")
    taken = [p.name for p in root.glob(f"{stem}-*")] if root.is_dir() else []
    pattern = re.compile(rf"{re.escape(stem)}-(\d+)")
    number = max((int(m.group(1)) for n in taken if (m := pattern.fullmatch(n))), default=0) + 1
    while True:  # mkdir without exist_ok: two runs started at once never share a folder
        try:
            (root / f"{stem}-{number}").mkdir(parents=True)
            return root / f"{stem}-{number}"
        except FileExistsError:
            number += 1


def model_path(run_or_model: str | Path) -> Path:
    """Accept a run folder or a model file; return the model file's path."""
    path = Path(run_or_model)
    if path.is_dir():
        path = path / MODEL_FILE
        if not path.is_file():
            raise CnnkitError(
                f"no {MODEL_FILE} in run folder {run_or_model}: did its training finish an epoch?"
            )
    elif not path.exists():
        raise CnnkitError(f"model file or run folder not found: {run_or_model}")
    return path


def load_model(run_or_model: str | Path, device: str = "cpu") -> nn.Module:
    """Rebuild a trained model from its model file (or run folder), in eval mode.

    The returned module carries the file's metadata (classes, preprocessing...) as ``model.meta``.
    Exported ``.onnx`` (ONNX Runtime, CPU) and TorchScript files load too, with the same ``.meta``.
    """
    path = model_path(run_or_model)
    if is_exported(path):  # .onnx / TorchScript: same .meta, same call, another runtime
        return load_exported(path)
    state, meta = load_model_file(path)
    model = models.create_model(
        meta["arch"],
        num_classes=len(meta["classes"]),
        in_chans=meta["in_chans"],
        **meta.get("kwargs", {}),
    )
    _check_shapes(model, state, meta, path)
    try:
        model.load_state_dict(state)
    except RuntimeError as e:
        raise CnnkitError(
            f"{path}: weights do not fit architecture {meta['arch']}: "
            f"{str(e).splitlines()[-1].strip()}"
        ) from None
    model.meta = meta
    return model.to(runtime.resolve_device(device)).eval()


def _check_shapes(model: nn.Module, state: dict, meta: dict, path: Path) -> None:
    """A head whose size differs from the file's class list means the file was tampered with
    or mixed up; say so in those terms rather than as a tensor size mismatch."""
    expected = model.state_dict()
    bad = [k for k, v in state.items() if k in expected and expected[k].shape != v.shape]
    head = model.default_cfg["classifier"] + "."
    if bad and all(k.startswith(head) for k in bad):
        raise CnnkitError(
            f"{path}: the classifier has {state[bad[0]].shape[0]} outputs but the "
            f"file lists {len(meta['classes'])} classes; the file is inconsistent"
        )


def evaluate(
    run_or_model: str | Path,
    data_source: str | None = None,
    *,
    batch_size: int = 256,
    device: str = "auto",
    num_workers: int | None = None,
) -> dict:
    """Loss, top-1/top-5, per-class precision/recall/F1 and the confusion matrix.

    Without ``data_source`` the run's own test split is used (its validation split when it has
    no test split); that needs a run folder, not a bare model file.
    """
    model = load_model(run_or_model, device=device)
    if data_source is not None:
        dataset = data.build_eval(data_source, model.meta["classes"], model.meta["preprocessing"])
        split = str(data_source)
    else:
        dataset, split = _own_split(Path(run_or_model))
    metrics = _score(model, dataset, batch_size, device, num_workers)
    metrics["split"] = split
    return metrics


def _own_split(run_dir: Path):
    if run_dir.is_file():  # a model file inside a run folder (model.onnx...) scores on its run
        run_dir = run_dir.parent
    if not run_dir.is_dir() or not (run_dir / "config.yaml").is_file():
        raise CnnkitError(f"{run_dir} is not a run folder; give the DATA to evaluate on")
    cfg = load(run_dir / "config.yaml")
    splits = data.build(cfg.data, seed=cfg.train.seed)
    if splits.test is not None:
        return splits.test, "test"
    if splits.val is not None:
        return splits.val, "val"
    raise CnnkitError(
        f"run {run_dir} has no test or validation split; give the DATA to evaluate on"
    )


def _score(
    model: nn.Module, dataset, batch_size: int, device: str, num_workers: int | None
) -> dict:
    rt = runtime.resolve(RuntimeConfig(device=device))
    model = model.to(rt.device, memory_format=rt.memory_format)
    loader = data.make_loader(dataset, batch_size, train=False, seed=0, num_workers=num_workers)
    classes = model.meta["classes"]
    raw = evaluate_loader(model, loader, rt, len(classes))
    return summarize(raw, classes)


def predict(
    run_or_model: str | Path | nn.Module,
    inputs,
    *,
    top_k: int = 5,
    batch_size: int = 64,
    device: str = "auto",
) -> list[dict]:
    """Top-k classes for image files, folders or glob patterns (or PIL images)."""
    from cnnkit.deploy.predictor import Predictor

    model = run_or_model if isinstance(run_or_model, nn.Module) else load_model(run_or_model)
    return Predictor(model, device=device).predict(inputs, top_k=top_k, batch_size=batch_size)
