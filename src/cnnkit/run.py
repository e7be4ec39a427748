"""The path of one run: config -> data.build -> models -> engine.fit -> score and report, all in
the run folder ``runs/<name>/`` (the only place a run writes).

``train`` resolves everything once per process and passes it down: the config (``config.resolve``),
one ``Runtime`` (device, precision, layout, threads, compile), one batch size (``auto`` is measured
here), one lr (``auto`` runs the lr finder here). ``train(resume=...)`` continues a run from its
checkpoint; the rules for what a resumed run may change (``RESUME_SAFE``) live here, and so does
continuing after a torchrun restart.
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

from cnnkit import prepare, tasks
from cnnkit.config import Config, from_dict, load, resolve
from cnnkit.data.host import cache_root
from cnnkit.deploy.formats import load_model
from cnnkit.engine import distributed, runtime
from cnnkit.engine.checkpoint import load_latest
from cnnkit.engine.fit import CHECKPOINT, FitResult, fit
from cnnkit.engine.interrupt import Interrupted
from cnnkit.engine.tuning import auto_batch_size
from cnnkit.errors import CnnkitError
from cnnkit.evaluation.lr_finder import LrFindResult, lr_find_for_config
from cnnkit.evaluation.report import write_report
from cnnkit.evaluation.scoring import score
from cnnkit.fileio import atomic_write_bytes
from cnnkit.modelfile import MODEL_FILE

SKIPPED_FILE = "skipped_files.tsv"
# Keys a resumed run may change without losing exactness (they do not touch the numbers).
RESUME_SAFE = frozenset(
    {"train.progress", "train.tensorboard", "data.num_workers", "runtime.threads"}
    | {"train.nan_policy", "train.nan_limit", "data.check_files", "train.report"}
)
# train(resume=...) keywords that become overrides of the saved config; any other is refused
RESUME_OPTIONS = {
    "epochs": "train.epochs",
    "nan_policy": "train.nan_policy",
    "progress": "train.progress",
    "num_workers": "data.num_workers",
    "report": "train.report",
}


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
    on_epoch=None,
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
    it was started with). ``on_epoch(row)``: called with each epoch's metrics row; it may raise to
    end the run there (``cnnkit.study`` prunes trials so).

    Started by torchrun, every process calls this and they train as one data-parallel run.
    """
    if resume is not None:
        extra = _resume_overrides(data_source, config, options)
        distributed.init()
        return _resume(
            Path(resume), stop_after, extra + (overrides or []), resume_changed, allow_world_change
        )
    options, module = prepare.model_option(options)
    cfg = resolve(data_source, config, overrides, **options)
    prepare.resolve_task(cfg)
    dd = distributed.init(cfg.runtime.device)
    restarted = _torchrun_restart(cfg)
    if restarted is not None:
        return _resume(restarted, stop_after, [], False, allow_world_change)
    rt = run_runtime(cfg)
    runtime.seed_everything(cfg.train.seed)
    prepare.resolve_auto_model(cfg, rt.device.type)
    splits = prepare.build_data(cfg)
    prepare.check_recipe_data(cfg, splits)
    model = prepare.build_model(cfg, splits, module=module)
    splits = prepare.match_pretrained_normalisation(cfg, splits, model)
    if cfg.data.batch_size == "auto":
        shape = (splits.in_chans, *splits.input_size)
        size = auto_batch_size(model, rt, shape, len(splits.classes), len(splits.train))
        cfg.data.batch_size = distributed.broadcast(size)  # every process steps alike
    prepare.resolve_bn_stats(cfg)  # needs the batch size
    _resolve_auto_lr(cfg, splits, model, rt)  # after the batch size: the sweep uses it
    cfg.optim.lr = distributed.broadcast(cfg.optim.lr)  # rank 0's sweep decides for all
    run_dir = _shared_run_dir(cfg, splits.name, dd)
    return _fit_in(
        run_dir, model, splits, cfg, rt, resume_state=None, stop_after=stop_after, created=True,
        template=module, on_epoch=on_epoch,
    )  # fmt: skip


def run_runtime(cfg: Config) -> runtime.Runtime:
    """The one runtime of a run, resolved once per process (under torchrun each process takes
    its own GPU) and passed to the lr finder, fit, the final score and the report."""
    rt = runtime.resolve(cfg.runtime, cfg.train.deterministic)
    dd = distributed.current()
    if dd.enabled and rt.device.type == "cuda":
        rt = dataclasses.replace(rt, device=torch.device("cuda", dd.local_rank))
    return rt


def _resume_overrides(data_source, config, options: dict) -> list[str]:
    """A resumed run keeps its saved config: only RESUME_OPTIONS (and overrides) may change it."""
    given = [k for k, v in options.items() if v is not None and k not in RESUME_OPTIONS]
    given += [name for name, v in (("data", data_source), ("config", config)) if v is not None]
    if given:
        raise CnnkitError(
            f"--resume continues the run with its saved config; drop {', '.join(given)} "
            "(section.key=value overrides and --epochs are allowed)"
        )
    return [f"{RESUME_OPTIONS[k]}={v}" for k, v in options.items() if v is not None]


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
    marker = _restart_marker(cfg)
    if marker is not None and dd.main:
        atomic_write_bytes(marker, path.encode())
    return Path(path)


def _restart_marker(cfg: Config) -> Path | None:
    return distributed.restart_marker(cache_root(cfg.data.cache_dir), cfg.train.out_dir)


def _torchrun_restart(cfg: Config) -> Path | None:
    """Under ``torchrun --max-restarts``: the run folder of this group's previous attempt when it
    holds a checkpoint to continue from."""
    marker = _restart_marker(cfg)
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
    splits = prepare.build_data(cfg)
    if state.get("fingerprint", splits.fingerprint) != splits.fingerprint:
        changes.append("the data files (added, removed or modified since the checkpoint)")
    if changes and not changed_ok:
        raise CnnkitError(
            f"--resume: {', '.join(changes)} changed, so the run would not continue exactly; "
            "add --resume-changed to continue anyway"
        )
    model = prepare.build_model(cfg, splits, load_weights=False)
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
    on_epoch=None,
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
            prepare.model_meta(cfg, splits, rt.precision),
            rt,
            tasks.get(cfg.train.task).configured(cfg.train),
            resume=resume_state,
            stop_after=stop_after,
            allow_world_change=allow_world_change,
            after_step=distributed.fault_hook(),
            on_epoch=on_epoch,
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
    test, split_name, outputs = (None, None, None)
    if main:
        test, split_name, outputs = _final_eval(run_dir, splits, cfg, rt, template)
    result.timings["final_eval"] = time.perf_counter() - start
    start = time.perf_counter()
    if cfg.train.report and main:
        _report_after_training(run_dir, splits, split_name, cfg, rt, template, outputs)
    result.timings["report"] = time.perf_counter() - start
    distributed.barrier()
    return TrainResult(run_dir=run_dir, fit=result, test=test, test_split=split_name)


def _list_skipped(run_dir: Path, skipped: list) -> None:
    """--skip-bad: the files left out, one per line (path, kind, reason), in the run folder."""
    lines = [f"{f.path}\t{f.kind}\t{f.message}" for f in skipped]
    atomic_write_bytes(run_dir / SKIPPED_FILE, ("\n".join(lines) + "\n").encode())
    print(f"note: left out {len(skipped)} bad image file(s); listed in {run_dir / SKIPPED_FILE}")


def _final_eval(
    run_dir: Path, splits, cfg: Config, rt: runtime.Runtime, template: nn.Module | None = None
) -> tuple[dict | None, str | None, tuple | None]:
    """Score the saved best weights on the test split (val when there is none); saved as JSON.
    Also returns the scored (outputs, targets), which the report reuses."""
    dataset, name = (splits.test, "test") if splits.test is not None else (splits.val, "val")
    if dataset is None:
        return None, None, None
    model = load_model(run_dir / MODEL_FILE, str(rt.device), copy.deepcopy(template))
    task = tasks.get(cfg.train.task).configured(cfg.train)  # the loss the run validated with
    kept: list | None = [] if cfg.train.report and task.keeps_outputs else None
    metrics = score(
        model, dataset, cfg.data.batch_size, rt, cfg.data, cfg.train.tta, task, keep=kept
    )
    atomic_write_bytes(run_dir / f"{name}_metrics.json", json.dumps(metrics, indent=2).encode())
    if not kept:
        return metrics, name, None
    return metrics, name, (torch.cat([o for o, _ in kept]), torch.cat([t for _, t in kept]))


def _report_after_training(
    run_dir: Path,
    splits,
    split: str | None,
    cfg: Config,
    rt: runtime.Runtime,
    template: nn.Module | None = None,
    outputs: tuple | None = None,
) -> None:
    """report.html and its figures; a failure here must not cost the user the trained run.
    ``outputs``: the final score's (logits, labels) of the split, reused for the figures."""
    if split is None:
        print("note: no test or validation split to report on; no report.html written")
        return
    dataset = splits.test if split == "test" else splits.val
    try:
        model = load_model(run_dir / MODEL_FILE, str(rt.device), copy.deepcopy(template))
        path = write_report(
            run_dir, model, dataset, split, rt, batch_size=cfg.data.batch_size,
            data_cfg=cfg.data, tta=cfg.train.tta, outputs=outputs,
        )  # fmt: skip
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
    found = lr_find_for_config(model, splits, cfg, rt)
    if found.suggestion is None:
        raise CnnkitError(
            f"lr finder found no lr where the loss falls ({found.stopped}); set --lr yourself"
        )
    cfg.optim.lr = float(f"{found.suggestion:.3g}")
    print(
        f"lr finder: suggested lr {cfg.optim.lr:g} ({found.stopped} after {len(found.lrs)} steps)"
    )


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


def lr_find(
    data_source: str | None = None,
    *,
    config: str | Path | Config | dict | None = None,
    overrides: list[str] | None = None,
    steps: int = 200,
    **options,
) -> LrFindResult:
    """Sweep the learning rate for the run these arguments (as for ``train``) describe; returns
    an ``LrFindResult`` (lrs, losses, smoothed losses, ``suggestion``, ``figure()``)."""
    options, module = prepare.model_option(options)
    cfg = resolve(data_source, config, overrides, **options)
    prepare.resolve_task(cfg)  # image/mask folders: the segmentation task, its loss and data
    rt = runtime.resolve(cfg.runtime, cfg.train.deterministic)
    runtime.seed_everything(cfg.train.seed)
    prepare.resolve_auto_model(cfg, rt.device.type)
    splits = prepare.build_data(cfg)
    model = prepare.build_model(cfg, splits, module=module)
    splits = prepare.match_pretrained_normalisation(cfg, splits, model)
    return lr_find_for_config(model, splits, cfg, rt, steps=steps)
