"""The Python API behind every CLI verb: train, load_model, evaluate, predict.

``train`` is the path of one run: config -> data.build -> models.create -> engine.fit -> the run
folder. The others read a model file (or a run folder holding one) and nothing else.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import re
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from cnnkit import __version__, data, models, recipes
from cnnkit.config import (
    Config,
    DataConfig,
    from_dict,
    load,
    parse_override,
    read_yaml,
)
from cnnkit.data.memory import run_loader
from cnnkit.deploy.formats import is_exported, load_exported
from cnnkit.engine import distributed, runtime
from cnnkit.engine.checkpoint import (
    atomic_write_bytes,
    load_checkpoint,
    load_latest,
    load_model_file,
)
from cnnkit.engine.fit import CHECKPOINT, FitResult, fit
from cnnkit.engine.interrupt import Interrupted
from cnnkit.engine.loop import evaluate as evaluate_loader
from cnnkit.engine.tuning import auto_batch_size
from cnnkit.errors import CnnkitError
from cnnkit.evaluation.metrics import summarize
from cnnkit.evaluation.tta import check_mode, with_tta

MODEL_FILE = "model.safetensors"
SKIPPED_FILE = "skipped_files.tsv"


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
    resume_changed: bool = False,
    allow_world_change: bool = False,
    **options,
) -> TrainResult:
    """Train a classifier and return where the run went and how it scored.

    ``data_source``: folder, CSV or built-in name (default: digits). ``config``: YAML path, dict or
    ``Config``. ``options``: section-free shortcuts ``model``, ``epochs``, ``batch_size``, ``lr``,
    ``seed``, ``name``, ... applied after the config (``model`` may also be your own module,
    trained in place, or its class or registered builder); ``overrides``: dotted ``key=value``
    strings applied last. ``resume``: a run folder to continue exactly where its checkpoint stopped
    (``overrides`` may change its config where exactness allows, any key with
    ``resume_changed=True``; ``allow_world_change``: even with another number of processes than
    it was started with).

    Started by torchrun, every process calls this and they train as one data-parallel run.
    """
    if resume is not None:
        distributed.init()
        return _resume(
            Path(resume), stop_after, overrides or [], resume_changed, allow_world_change
        )
    options, module = _model_option(options)
    cfg = resolve_config(data_source, config, overrides, **options)
    _check_batch_size(cfg.data.batch_size)
    dd = distributed.init(cfg.runtime.device)
    restarted = _torchrun_restart(cfg)
    if restarted is not None:
        return _resume(restarted, stop_after, [], False, allow_world_change)
    rt = run_runtime(cfg)
    runtime.seed_everything(cfg.train.seed)
    splits = _build_data(cfg)
    recipes.check_data(cfg, splits)
    model = _build_model(cfg, splits, module=module)
    splits = _match_pretrained_normalisation(cfg, splits, model)
    if cfg.data.batch_size == "auto":
        shape = (splits.in_chans, *splits.input_size)
        size = auto_batch_size(model, rt, shape, len(splits.classes), len(splits.train))
        cfg.data.batch_size = distributed.broadcast(size)  # every process steps alike
    _resolve_auto_lr(cfg, splits, model, rt)  # after the batch size: the sweep uses it
    cfg.optim.lr = distributed.broadcast(cfg.optim.lr)  # rank 0's sweep decides for all
    run_dir = _shared_run_dir(cfg, splits.name, dd)
    return _fit_in(
        run_dir, model, splits, cfg, rt, resume_state=None, stop_after=stop_after, created=True,
        template=module,
    )  # fmt: skip


def run_runtime(cfg: Config) -> runtime.Runtime:
    """The one runtime of a run, resolved once per process (under torchrun each process takes
    its own GPU) and passed to the lr finder, fit, the final score and the report."""
    rt = runtime.resolve(cfg.runtime, cfg.train.deterministic)
    dd = distributed.current()
    if dd.enabled and rt.device.type == "cuda":
        rt = dataclasses.replace(rt, device=torch.device("cuda", dd.local_rank))
    return rt


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
}
# Keys a resumed run may change without losing exactness (they do not touch the numbers).
RESUME_SAFE = frozenset(
    {"train.progress", "train.tensorboard", "data.num_workers", "runtime.threads"}
    | {"train.nan_policy", "train.nan_limit", "data.check_files"}
)


def resolve_config(
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
    check_mode(cfg.train.tta)
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


def _check_batch_size(value) -> None:
    if value == "auto" or (isinstance(value, int) and not isinstance(value, bool) and value >= 1):
        return
    raise CnnkitError(f"data.batch_size must be a positive integer or 'auto', got {value!r}")


def _shared_run_dir(cfg: Config, data_name: str, dd) -> Path:
    """Rank 0 makes the run folder and tells the others (and a torchrun restart) its name."""
    made: tuple[str | None, str | None] = (None, None)
    if dd.main:
        try:
            made = (str(_new_run_dir(cfg, data_name)), None)
        except CnnkitError as e:
            made = (None, str(e))
    path, error = distributed.broadcast(made)
    if error is not None:
        raise CnnkitError(error)
    marker = distributed.restart_marker(cfg.train.out_dir)
    if marker is not None and dd.main:
        atomic_write_bytes(marker, path.encode())
    return Path(path)


def _torchrun_restart(cfg: Config) -> Path | None:
    """Under ``torchrun --max-restarts``: the run folder of this group's previous attempt when it
    holds a checkpoint to continue from."""
    marker = distributed.restart_marker(cfg.train.out_dir)
    if marker is None or distributed.restart_count() == 0 or not marker.is_file():
        return None
    run_dir = Path(marker.read_text().strip())
    if not (run_dir / CHECKPOINT).is_file():
        return None
    if distributed.current().main:
        print(f"torchrun restart {distributed.restart_count()}: continuing {run_dir}")
    return run_dir


def _resume(
    run_dir: Path,
    stop_after: int | None,
    overrides: list[str],
    changed_ok: bool,
    allow_world_change: bool = False,
) -> TrainResult:
    if not run_dir.is_dir():
        raise CnnkitError(f"--resume: run folder not found: {run_dir}")
    state, _ = load_latest(run_dir / CHECKPOINT.parent)
    saved = from_dict(state["config"])
    cfg = load(None, overrides, base=saved)
    changes = _config_changes(saved, cfg)
    if state["epoch"] >= cfg.train.epochs:
        raise CnnkitError(f"--resume: {run_dir} already finished its {cfg.train.epochs} epochs")
    splits = _build_data(cfg)
    if state.get("fingerprint", splits.fingerprint) != splits.fingerprint:
        changes.append("the data files (added, removed or modified since the checkpoint)")
    if changes and not changed_ok:
        raise CnnkitError(
            f"--resume: {', '.join(changes)} changed, so the run would not continue exactly; "
            "add --resume-changed to continue anyway"
        )
    model = _build_model(cfg, splits, load_weights=False)
    return _fit_in(
        run_dir,
        model,
        splits,
        cfg,
        run_runtime(cfg),
        resume_state=state,
        stop_after=stop_after,
        created=False,
        allow_world_change=allow_world_change,
    )


def _config_changes(saved: Config, cfg: Config) -> list[str]:
    """Dotted keys whose values differ and that matter to exactness (not in RESUME_SAFE)."""
    old, new = saved.to_dict(), cfg.to_dict()
    return [
        f"{section}.{key}"
        for section, values in new.items()
        for key, value in values.items()
        if value != old[section][key] and f"{section}.{key}" not in RESUME_SAFE
    ]


def _fit_in(
    run_dir: Path,
    model: nn.Module,
    splits,
    cfg: Config,
    rt: runtime.Runtime,
    *,
    resume_state,
    stop_after,
    created: bool,
    allow_world_change: bool = False,
    template: nn.Module | None = None,
) -> TrainResult:
    """``template``: the user's module the run trained, which the saved weights are loaded
    into (a copy of it) to score and report, since its import path may not rebuild it."""
    main = distributed.current().main
    if main:
        atomic_write_bytes(run_dir / "config.yaml", cfg.to_yaml().encode())
        if splits.skipped:
            _list_skipped(run_dir, splits.skipped)
    try:
        result = fit(
            model,
            splits,
            cfg,
            run_dir,
            model_meta(cfg, splits, rt.precision),
            rt,
            resume=resume_state,
            stop_after=stop_after,
            allow_world_change=allow_world_change,
        )
    except (CnnkitError, KeyboardInterrupt) as e:
        if created and main and not (run_dir / CHECKPOINT).exists():
            shutil.rmtree(run_dir, ignore_errors=True)  # nothing worth keeping was made yet
        elif isinstance(e, Interrupted):
            print(f"\n{e}")  # says where it stopped and how to resume
        elif isinstance(e, KeyboardInterrupt):
            print(f"\ninterrupted; continue with: cnnkit train --resume {run_dir}")
        raise
    start = time.perf_counter()
    test, split_name = _final_eval(run_dir, splits, cfg, rt, template) if main else (None, None)
    result.timings["final_eval"] = time.perf_counter() - start
    if cfg.train.report and main:
        _report_after_training(run_dir, splits, split_name, cfg, rt, template)
    distributed.barrier()
    return TrainResult(run_dir=run_dir, fit=result, test=test, test_split=split_name)


def _list_skipped(run_dir: Path, skipped: list) -> None:
    """--skip-bad: the files left out, one per line (path, kind, reason), in the run folder."""
    lines = [f"{f.path}\t{f.kind}\t{f.message}" for f in skipped]
    atomic_write_bytes(run_dir / SKIPPED_FILE, ("\n".join(lines) + "\n").encode())
    print(f"note: left out {len(skipped)} bad image file(s); listed in {run_dir / SKIPPED_FILE}")


def _final_eval(
    run_dir: Path, splits, cfg: Config, rt: runtime.Runtime, template: nn.Module | None = None
) -> tuple[dict | None, str | None]:
    """Score the saved best weights on the test split (val when there is none); saved as JSON."""
    dataset, name = (splits.test, "test") if splits.test is not None else (splits.val, "val")
    if dataset is None:
        return None, None
    model = load_model(run_dir / MODEL_FILE, str(rt.device), copy.deepcopy(template))
    metrics = _score(model, dataset, cfg.data.batch_size, rt, cfg.data, cfg.train.tta)
    atomic_write_bytes(run_dir / f"{name}_metrics.json", json.dumps(metrics, indent=2).encode())
    return metrics, name


def _report_after_training(
    run_dir: Path,
    splits,
    split: str | None,
    cfg: Config,
    rt: runtime.Runtime,
    template: nn.Module | None = None,
) -> None:
    """report.html and its figures; a failure here must not cost the user the trained run."""
    if split is None:
        print("note: no test or validation split to report on; no report.html written")
        return
    from cnnkit.evaluation.report import write_report

    dataset = splits.test if split == "test" else splits.val
    try:
        model = load_model(run_dir / MODEL_FILE, str(rt.device), copy.deepcopy(template))
        path = write_report(
            run_dir, model, dataset, split, rt, batch_size=cfg.data.batch_size, data_cfg=cfg.data
        )
    except Exception as e:  # noqa: BLE001 - the model is saved; say how to retry
        print(f"note: report not written ({type(e).__name__}: {e}); retry: cnnkit report {run_dir}")
        return
    print(f"report: {path}")


def _resolve_auto_lr(cfg: Config, splits, model: nn.Module, rt: runtime.Runtime) -> None:
    """``optim.lr: auto``: run the lr finder on a copy of the model and train with its
    suggestion; the config saved with the run holds the number, so a resume reuses it."""
    lr = cfg.optim.lr
    if not isinstance(lr, str):
        return
    if lr != "auto":
        raise CnnkitError(f"optim.lr must be a number or 'auto', got '{lr}'")
    from cnnkit.evaluation.lr_finder import lr_find_for_config

    found = lr_find_for_config(model, splits, cfg, rt)
    if found.suggestion is None:
        raise CnnkitError(
            f"lr finder found no lr where the loss falls ({found.stopped}); set --lr yourself"
        )
    cfg.optim.lr = float(f"{found.suggestion:.3g}")
    print(
        f"lr finder: suggested lr {cfg.optim.lr:g} ({found.stopped} after {len(found.lrs)} steps)"
    )


def _model_option(options: dict) -> tuple[dict, nn.Module | None]:
    """``model=`` given as a module (returned, to train in place), a class or a builder: the
    config holds its name (``models.name_for``) either way."""
    value = options.get("model")
    if not callable(value):
        return options, None
    module = value if isinstance(value, nn.Module) else None
    return {**options, "model": models.name_for(value)}, module


def _build_model(
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
    if models.is_import_path(mc.name):  # not one of ours: run it once before training
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


def _match_pretrained_normalisation(cfg: Config, splits, model: nn.Module):
    """Published weights expect the mean/std they were trained with (ImageNet's, usually), not
    the statistics of the user's data; rebuild the splits with them unless data.mean is set."""
    mean, std = model.default_cfg["mean"], model.default_cfg["std"]
    if not cfg.model.pretrained or cfg.data.mean is not None or len(mean) != splits.in_chans:
        return splits
    cfg.data.mean, cfg.data.std = [float(v) for v in mean], [float(v) for v in std]
    return data.build(cfg.data, seed=cfg.train.seed, note=_data_note())


def _build_data(cfg: Config):
    """``data.build`` for a run. Under torchrun the first process of each machine builds first,
    decoding (and so checking) the files into the cache once; the others then read it back
    instead of decoding the same files at the same time."""
    dd = distributed.current()
    if dd.enabled and dd.local_rank != 0:
        distributed.barrier()  # wait for this machine's first process to fill the cache
    splits = data.build(cfg.data, seed=cfg.train.seed, note=_data_note())
    if dd.enabled and dd.local_rank == 0:
        distributed.barrier()
    return splits


def _data_note():
    """Where a training run's data notes (decoding once...) go: the progress output (stdout) of
    the main process; other ranks stay silent."""
    return (lambda text: print(text, flush=True)) if distributed.current().main else _silent


def _silent(text: str) -> None:
    pass


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


def model_meta(cfg: Config, splits, precision: str) -> dict:
    """What the model file must carry to be used without the training data or config;
    ``precision`` is the run's (fp32 | bf16 | fp16), the default for scoring and predicting."""
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
        "precision": precision,
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


def load_model(
    run_or_model: str | Path, device: str = "cpu", model: nn.Module | None = None
) -> nn.Module:
    """Rebuild a trained model from its model file (or run folder), in eval mode.

    The returned module carries the file's metadata (classes, preprocessing...) as ``model.meta``.
    Exported ``.onnx`` (ONNX Runtime, CPU) and TorchScript files load too, with the same ``.meta``.
    Your own model is rebuilt from the import path the file records; ``model``: a module you
    built instead (its weights are replaced by the file's), for one that path cannot rebuild.
    """
    path = model_path(run_or_model)
    if is_exported(path):  # .onnx / TorchScript: same .meta, same call, another runtime
        return load_exported(path)
    state, meta = load_model_file(path)
    model = models.model_from_meta(meta, str(path), model)
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
    precision: str | None = None,
) -> dict:
    """Loss, top-1/top-5, per-class precision/recall/F1 and the confusion matrix.

    Without ``data_source`` the run's own test split is used (its validation split when it has
    no test split); that needs a run folder, not a bare model file. ``precision``: fp32, bf16,
    fp16 or auto; default: the precision the run trained with.
    """
    model = load_model(run_or_model, device=device)
    rt = runtime.for_model(model.meta, device, precision)
    dataset, split = _eval_dataset(run_or_model, model, data_source)
    metrics = _score(model, dataset, batch_size, rt, DataConfig(num_workers=num_workers))
    metrics["split"] = split
    return metrics


def report(
    run_dir: str | Path,
    data_source: str | None = None,
    *,
    out_dir: str | Path | None = None,
    batch_size: int = 256,
    device: str = "auto",
    num_workers: int | None = None,
    precision: str | None = None,
) -> Path:
    """(Re)build a run's ``report.html`` and PNG figures; returns the HTML's path.

    Scored on ``data_source`` when given, else on the run's own test (else val) split; written
    to ``out_dir`` (default: the run folder); ``precision`` as for ``evaluate``.
    """
    from cnnkit.evaluation.report import check_run, write_report

    run_dir = Path(run_dir)
    check_run(run_dir)
    model = load_model(run_dir, device=device)
    rt = runtime.for_model(model.meta, device, precision)
    dataset, split = _eval_dataset(run_dir, model, data_source)
    return write_report(
        run_dir, model, dataset, split, rt, out_dir=out_dir,
        batch_size=batch_size, data_cfg=DataConfig(num_workers=num_workers),
    )  # fmt: skip


def _eval_dataset(run_or_model: str | Path, model: nn.Module, data_source: str | None):
    """(dataset, split name): ``data_source`` mapped to the model's classes, else the run's own."""
    if data_source is not None:
        meta = model.meta
        return data.build_eval(data_source, meta["classes"], meta["preprocessing"]), data_source
    return _own_split(Path(run_or_model))


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
    model: nn.Module,
    dataset,
    batch_size: int,
    rt: runtime.Runtime,
    data_cfg: DataConfig,
    tta: str = "none",
) -> dict:
    model = model.to(rt.device, memory_format=rt.memory_format)
    loader = run_loader(
        dataset,
        model.meta["preprocessing"],
        None,
        data_cfg,
        batch_size,
        train=False,
        seed=0,
        device=rt.device,
        memory_format=rt.memory_format,
    )
    classes = model.meta["classes"]
    raw = evaluate_loader(with_tta(model, tta), loader, rt, len(classes))
    metrics = summarize(raw, classes)
    metrics["precision"] = rt.precision
    if tta != "none":
        metrics["tta"] = tta
    return metrics


def lr_find(
    data_source: str | None = None,
    *,
    config: str | Path | Config | dict | None = None,
    overrides: list[str] | None = None,
    steps: int = 200,
    **options,
):
    """Sweep the learning rate for the run these arguments (as for ``train``) describe; returns
    an ``LrFindResult`` (lrs, losses, smoothed losses, ``suggestion``, ``figure()``)."""
    from cnnkit.evaluation.lr_finder import lr_find_for_config

    options, module = _model_option(options)
    cfg = resolve_config(data_source, config, overrides, **options)
    rt = runtime.resolve(cfg.runtime, cfg.train.deterministic)
    runtime.seed_everything(cfg.train.seed)
    splits = data.build(cfg.data, seed=cfg.train.seed)
    model = _build_model(cfg, splits, module=module)
    splits = _match_pretrained_normalisation(cfg, splits, model)
    return lr_find_for_config(model, splits, cfg, rt, steps=steps)


def predict(
    run_or_model: str | Path | nn.Module,
    inputs,
    *,
    top_k: int = 5,
    batch_size: int = 64,
    device: str = "auto",
    precision: str | None = None,
) -> list[dict]:
    """Top-k classes for image files, folders or glob patterns (or PIL images); ``precision``
    as for ``evaluate``."""
    from cnnkit.deploy.predictor import Predictor

    model = run_or_model if isinstance(run_or_model, nn.Module) else load_model(run_or_model)
    predictor = Predictor(model, device=device, precision=precision)
    return predictor.predict(inputs, top_k=top_k, batch_size=batch_size)
