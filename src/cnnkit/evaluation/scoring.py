"""Scoring a trained model: ``evaluate`` (metrics on a labelled split), ``report`` (rebuild a run's
report.html) and ``score``, the one pass both use and the end of training calls with the run's own
runtime.

Without data given, a run folder is scored on its own test split (its validation split when it has
no test split), rebuilt from its ``config.yaml``.
"""

from __future__ import annotations

from pathlib import Path

from torch import nn

from cnnkit import tasks
from cnnkit.config import DataConfig, load
from cnnkit.data import masks
from cnnkit.data.memory import run_loader
from cnnkit.data.transforms import at_side
from cnnkit.deploy.formats import load_model
from cnnkit.engine import runtime
from cnnkit.engine.loop import evaluate as evaluate_loader
from cnnkit.errors import CnnkitError
from cnnkit.evaluation.report import check_run, write_report
from cnnkit.evaluation.tta import check_mode, with_tta
from cnnkit.modelfile import run_folder_of


def evaluate(
    run_or_model: str | Path,
    data_source: str | None = None,
    *,
    batch_size: int = 256,
    device: str = "auto",
    num_workers: int | None = None,
    precision: str | None = None,
    tta: str = "none",
    input_size: int | None = None,
) -> dict:
    """Loss, top-1/top-5, per-class precision/recall/F1 and the confusion matrix.

    Without ``data_source`` the run's own test split is used (its validation split when it has
    no test split); that needs a run folder, not a bare model file. ``precision``: fp32, bf16,
    fp16 or auto; default: the precision the run trained with. ``tta``: none, flip or
    flip_translate (``evaluation.tta``); the metrics then also hold ``acc_no_tta``
    (segmentation: ``miou_no_tta`` and ``pixel_acc_no_tta``), so the gain is measured, not
    assumed. ``input_size``: evaluate at this square side instead of the
    trained one (the metrics then hold ``input_size`` and ``trained_size``).
    """
    model = load_model(run_or_model, device=device)
    trained = model.meta["preprocessing"]["input_size"]
    if input_size is not None:
        model.meta["preprocessing"] = at_side(model.meta["preprocessing"], input_size)
    check_mode(tta)
    rt = runtime.for_model(model.meta, device, precision)
    dataset, split = eval_dataset(run_or_model, model, data_source, input_size)
    data_cfg = DataConfig(num_workers=num_workers)
    metrics = score(model, dataset, batch_size, rt, data_cfg, tta)
    if tta != "none":  # the task's headline scores without it, beside
        plain = score(model, dataset, batch_size, rt, data_cfg)
        for key in tasks.get(model.meta.get("task", "classification")).headline:
            metrics[f"{key}_no_tta"] = plain[key]
    metrics["split"] = split
    if input_size is not None:
        metrics["input_size"], metrics["trained_size"] = input_size, trained
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
    tta: str | None = None,
) -> Path:
    """(Re)build a run's ``report.html`` and PNG figures; returns the HTML's path.

    Scored on ``data_source`` when given, else on the run's own test (else val) split; written
    to ``out_dir`` (default: the run folder); ``precision`` as for ``evaluate``; ``tta``: test-
    time augmentation, by default the run's own (``train.tta``), as its end of training scored.
    """
    run_dir = Path(run_dir)
    check_run(run_dir)
    model = load_model(run_dir, device=device)
    rt = runtime.for_model(model.meta, device, precision)
    dataset, split = eval_dataset(run_dir, model, data_source)
    config = run_dir / "config.yaml"
    if tta is None:
        tta = load(config).train.tta if config.is_file() else "none"
    return write_report(
        run_dir, model, dataset, split, rt, out_dir=out_dir, batch_size=batch_size,
        data_cfg=DataConfig(num_workers=num_workers), tta=check_mode(tta),
    )  # fmt: skip


def eval_dataset(
    run_or_model: str | Path,
    model: nn.Module,
    data_source: str | None,
    input_size: int | None = None,
):
    """(dataset, split name): ``data_source`` mapped to the model's classes, else the run's own
    (at ``input_size`` px when given: ``model.meta`` must say the same)."""
    if data_source is not None:
        return masks.eval_data(data_source, model.meta), data_source
    return _own_split(run_folder_of(run_or_model), input_size)


def _own_split(run_dir: Path, input_size: int | None = None):
    """The run's test (else val) split; at square ``input_size`` px when given."""
    if not run_dir.is_dir() or not (run_dir / "config.yaml").is_file():
        raise CnnkitError(f"{run_dir} is not a run folder; give the DATA to evaluate on")
    cfg = load(run_dir / "config.yaml")
    cfg.data.input_size = input_size or cfg.data.input_size
    splits = masks.build_splits(cfg.data, cfg.train.task, cfg.train.seed)
    if splits.test is not None:
        return splits.test, "test"
    if splits.val is not None:
        return splits.val, "val"
    raise CnnkitError(
        f"run {run_dir} has no test or validation split; give the DATA to evaluate on"
    )


def score(
    model: nn.Module,
    dataset,
    batch_size: int,
    rt: runtime.Runtime,
    data_cfg: DataConfig,
    tta: str = "none",
    task: tasks.Task | None = None,
    keep: list | None = None,
) -> dict:
    """Metrics of ``model`` (with ``.meta``) on ``dataset``, computed on ``rt``; the dict names the
    precision it was computed in. ``task``: the run's configured task (its loss weights); by
    default the one the model file names, with default settings. ``keep``: a list that gets
    each batch's (outputs, targets), as ``engine.loop.evaluate`` says."""
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
    task = task or tasks.get(model.meta.get("task", "classification"))
    raw = evaluate_loader(
        with_tta(model, tta), loader, rt, task.metrics(len(classes), rt.device, train=False),
        task.loss(0.0, None), keep,
    )  # fmt: skip
    metrics = task.summarize(raw, classes)
    metrics["precision"] = rt.precision
    if tta != "none":
        metrics["tta"] = tta
    return metrics
