"""Hyperparameter studies on Optuna: ``cnnkit tune`` and ``cnnkit.tune(...)``.

A study is a folder ``runs/<study>/`` holding one normal run folder per trial (``trial-<n>/``),
the study database (``study.db``, SQLite, unless ``storage`` names another SQLAlchemy URL),
``best.yaml`` (the best trial's config, for ``cnnkit train --config``) and ``study.html``.
Trials are sampled by TPE and pruned from the per-epoch validation metric (median or
Hyperband). Several processes (``jobs``, or ``cnnkit tune`` on several machines sharing a
PostgreSQL/MySQL URL) share one study through Optuna's storage; nothing here coordinates them.
A study started again continues: finished and pruned trials count toward ``trials``; a trial
whose process died (SIGKILL, power loss) is marked failed, found by its process id on this
machine at once, by Optuna's heartbeat elsewhere.

The module is not named tune.py: ``cnnkit.tune`` is the public function, and a submodule of
that name would replace it on the package once imported.
"""

from __future__ import annotations

import contextlib
import io
import multiprocessing
import os
import socket
import time
import warnings
from pathlib import Path

import torch
import yaml

from cnnkit import prepare, run, space
from cnnkit.config import Config, resolve
from cnnkit.deploy.formats import require
from cnnkit.engine.callbacks import MINIMIZED
from cnnkit.errors import CnnkitError
from cnnkit.evaluation import studypage
from cnnkit.fileio import atomic_write_bytes
from cnnkit.models import _registry, builder_options

HEARTBEAT_S, GRACE_S = 30, 120  # a trial silent this long on another machine is marked failed
PRUNERS = ("median", "hyperband", "none")


def tune(
    data_source: str | None = None,
    *,
    trials: int = 20,
    timeout: float | None = None,
    space_file: str | Path | None = None,
    metric: str | None = None,
    storage: str | None = None,
    study: str | None = None,
    pruner: str = "median",
    jobs: int = 1,
    config: str | Path | Config | dict | None = None,
    overrides: list[str] | None = None,
    **options,
):
    """Run (or continue) a study until ``trials`` trials finished or were pruned; returns the
    ``optuna.Study``. ``data_source``, ``config``, ``overrides`` and ``options`` describe the
    runs as for ``cnnkit.train``; ``metric``: the validation metric to optimise (default:
    ``train.monitor``); ``space_file``: a YAML search space over the recipe's default;
    ``storage``: an SQLAlchemy URL (default: SQLite in the study folder); ``jobs``: processes
    on this machine working on the study."""
    optuna = require("optuna", "cnnkit tune")  # optional: pip install 'cnnkit[tune]'
    base = _base(data_source, config, overrides, options)
    if pruner not in PRUNERS:
        raise CnnkitError(f"--pruner must be one of {', '.join(PRUNERS)}, got '{pruner}'")
    name = study or _study_name(base)
    folder = Path(base.train.out_dir) / name
    folder.mkdir(parents=True, exist_ok=True)
    work = {
        "data_source": data_source, "config": config, "overrides": overrides,
        "options": options, "trials": trials, "timeout": timeout, "space_file": space_file,
        "metric": metric or base.train.monitor, "pruner": pruner, "name": name,
        "url": storage or f"sqlite:///{(folder / 'study.db').resolve()}",
    }  # fmt: skip
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    # made here once, before any helper opens it
    the_study = _open(optuna, base, work, seeded=storage is None)
    _fail_dead_trials(optuna, the_study)
    params = space.build(_default_space(base), space_file)
    print(f"study {name}: {work['url']}  ({len(params)} parameters, {work['metric']})")
    helpers = _start_helpers(jobs - 1, work)
    _work(optuna, base, work, the_study, params)
    for process in helpers:
        process.join()
    finish(the_study, folder, work["metric"])
    return the_study


def _open(optuna, base: Config, work: dict, seeded: bool):
    """The study, made if new. Only a lone process seeds its sampler (from train.seed): processes
    sharing a study with one seed would sample the same first trials."""
    return optuna.create_study(
        study_name=work["name"],
        storage=_storage(optuna, work["url"]),
        sampler=optuna.samplers.TPESampler(seed=base.train.seed if seeded else None),
        pruner=_pruner(optuna, work["pruner"], base.train.epochs),
        direction="minimize" if work["metric"] in MINIMIZED else "maximize",
        load_if_exists=True,
    )


def _work(optuna, base: Config, work: dict, the_study, params: list) -> None:
    """Run trials of the study until it holds ``trials`` finished or pruned ones."""
    folder = Path(base.train.out_dir) / work["name"]
    objective = _objective(optuna, folder, base, work, params)
    left = work["trials"] - _done(optuna, the_study)
    if left <= 0:
        return
    done = optuna.study.MaxTrialsCallback(work["trials"], states=_counted(optuna))
    the_study.optimize(
        objective,
        n_trials=left,
        timeout=work["timeout"],
        callbacks=[done, _line],
        catch=(CnnkitError,),  # a trial's own error fails that trial, not the study
    )


def finish(the_study, folder: Path, metric: str) -> None:
    """best.yaml, the top-trials table and study.html (after every run of the study)."""
    best = _best(the_study)
    if best is None:
        print("no trial finished; nothing to report")
        return
    cfg = yaml.safe_load((Path(best.user_attrs["run_dir"]) / "config.yaml").read_text())
    cfg["train"].update(name=None, out_dir=Config().train.out_dir)  # train anew, not in the study
    atomic_write_bytes(folder / "best.yaml", yaml.safe_dump(cfg, sort_keys=False).encode())
    print(top_table(the_study, metric))
    print(f"best: trial {best.number}, {metric} {best.value:.4f}; config: {folder / 'best.yaml'}")
    print(f"study page: {studypage.write(the_study, folder, metric)}")


def _best(the_study):
    import optuna  # optional dependency, present once a study exists

    done = the_study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))
    return the_study.best_trial if done else None


def _objective(optuna, folder: Path, base: Config, work: dict, params: list):
    metric = work["metric"]

    def objective(trial) -> float:
        trial.set_user_attr("pid", os.getpid())
        trial.set_user_attr("host", socket.gethostname())
        values = {p.key: p.suggest(trial) for p in params}
        sampled = _overrides(values, base.model.kwargs)
        name = f"trial-{trial.number}"
        trial.set_user_attr("run_dir", str(folder / name))
        history: list[dict] = []

        def report(row: dict) -> None:  # after each epoch: record, then let the pruner judge
            if metric not in row:
                shown = ", ".join(row)
                raise CnnkitError(f"--metric {metric} is not measured; choose from {shown}")
            history.append(row)
            trial.report(row[metric], row["epoch"])
            trial.set_user_attr("epochs", row["epoch"])
            if trial.should_prune():
                raise optuna.TrialPruned(f"pruned at epoch {row['epoch']}")

        start = time.perf_counter()
        log = io.StringIO()
        try:
            with contextlib.redirect_stdout(log):  # the trial's own lines go to its train.log
                result = run.train(
                    work["data_source"],
                    config=work["config"],
                    overrides=[*(work["overrides"] or []), *sampled, *_placement(folder, name)],
                    on_epoch=report,
                    **{**work["options"], "progress": "plain"},
                )
        finally:
            trial.set_user_attr("seconds", round(time.perf_counter() - start, 2))
            if (folder / name).is_dir():
                atomic_write_bytes(folder / name / "train.log", log.getvalue().encode())
        if result.test is not None:
            trial.set_user_attr(f"{result.test_split}_acc", result.test.get("acc"))
        values = [row[metric] for row in history if row[metric] == row[metric]]
        if not values:
            raise CnnkitError(f"{metric} was never measured (no validation split?)")
        return min(values) if metric in MINIMIZED else max(values)

    return objective


def _overrides(values: dict, model_kwargs: dict) -> list[str]:
    """The sampled values as ``section.key=value`` overrides (``model.kwargs.*`` merged)."""
    kwargs = dict(model_kwargs)
    items = []
    for key, value in values.items():
        if key.startswith("model.kwargs."):
            kwargs[key.split(".", 2)[2]] = value
        else:
            items.append(space.override(key, value, {}))
    if kwargs != model_kwargs:
        items.append(space.override("model.kwargs", kwargs, {}))
    return items


def _placement(folder: Path, name: str) -> list[str]:
    return [f"train.out_dir={folder}", f"train.name={name}"]


def _base(data_source, config, overrides, options: dict) -> Config:
    """The config every trial starts from, its task resolved (image/mask folders: segmentation,
    with its monitor and defaults) so the space, metric and pruner fit the trials' runs."""
    base = resolve(data_source, config, overrides, **options)
    prepare.resolve_task(base)
    return base


def _default_space(cfg: Config) -> dict:
    """The recipe's default space; width/depth entries when the model's builder takes them."""
    try:
        takes = tuple(builder_options(_registry._lookup(_model_name(cfg)).builder) or ())
    except CnnkitError:  # adapters and your own modules: no width/depth entries
        takes = ()
    return space.default_space(cfg.train.recipe, cfg.optim.name, takes, cfg.train.task)


def _study_name(cfg: Config) -> str:
    data_name = Path(str(cfg.data.source or "digits")).name or "data"
    return f"tune-{_model_name(cfg)}-{data_name}".replace(":", "-").replace("/", "-")


def _model_name(cfg: Config) -> str:
    """The configured model, or what ``model: auto`` picks for the data (each trial's run
    resolves it again, the same way)."""
    device = "cuda" if torch.cuda.is_available() and cfg.runtime.device != "cpu" else "cpu"
    choice = prepare.auto_choice(cfg, device)
    return cfg.model.name if choice is None else choice.name


def _storage(optuna, url: str):
    """The study's SQLAlchemy storage, with Optuna's heartbeat so that a trial whose process
    died is marked failed; SQLite waits for its lock instead of failing under several writers."""
    engine = {"connect_args": {"timeout": 60}} if url.startswith("sqlite") else {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # Optuna calls the heartbeat experimental
        return optuna.storages.RDBStorage(
            url, engine_kwargs=engine, heartbeat_interval=HEARTBEAT_S, grace_period=GRACE_S
        )


def _pruner(optuna, name: str, epochs: int):
    if name == "median":
        return optuna.pruners.MedianPruner(n_startup_trials=2, n_warmup_steps=0)
    if name == "hyperband":
        return optuna.pruners.HyperbandPruner(min_resource=1, max_resource=max(epochs, 1))
    return optuna.pruners.NopPruner()


def _counted(optuna) -> tuple:
    state = optuna.trial.TrialState
    return (state.COMPLETE, state.PRUNED)


def _done(optuna, the_study) -> int:
    return len(the_study.get_trials(deepcopy=False, states=_counted(optuna)))


def _fail_dead_trials(optuna, the_study) -> None:
    """Mark failed the running trials of dead processes on this machine (a killed study)."""
    host = socket.gethostname()
    for trial in the_study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,)):
        pid = trial.user_attrs.get("pid")
        if trial.user_attrs.get("host") != host or pid is None or _alive(pid):
            continue
        the_study._storage.set_trial_state_values(trial._trial_id, optuna.trial.TrialState.FAIL)
        print(f"trial {trial.number}: its process ({pid}) is gone; marked failed", flush=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _line(the_study, trial) -> None:
    """One line per trial as it ends."""
    state = trial.state.name.lower()
    value = f"{trial.value:.4f}" if trial.value is not None else "-"
    if state == "pruned":
        state = f"pruned at epoch {trial.user_attrs.get('epochs', '?')}"
    shown = "  ".join(f"{k.split('.')[-1]}={_fmt(v)}" for k, v in trial.params.items())
    best = _best(the_study)
    best_text = f"  (best {best.value:.4f}, trial {best.number})" if best else ""
    seconds = trial.user_attrs.get("seconds", 0.0)
    print(f"trial {trial.number:3d}  {value}  {state:<18} {seconds:6.1f}s  {shown}{best_text}")


def top_table(the_study, metric: str, top: int = 5) -> str:
    """The best finished or pruned trials, best first, as a text table."""
    import optuna  # optional dependency, present once a study exists

    rows = [t for t in the_study.get_trials(states=_counted(optuna)) if t.value is not None]
    rows.sort(key=lambda t: t.value, reverse=the_study.direction.name == "MAXIMIZE")
    keys = sorted({k for t in rows for k in t.params})
    head = ["trial", metric, "state", "epochs", "seconds", *(k.split(".")[-1] for k in keys)]
    lines = [head]
    for t in rows[:top]:
        attrs = t.user_attrs
        cells = [t.number, f"{t.value:.4f}", t.state.name.lower(), attrs.get("epochs", "")]
        lines.append([*cells, attrs.get("seconds", ""), *(_fmt(t.params.get(k)) for k in keys)])
    widths = [max(len(str(row[i])) for row in lines) for i in range(len(head))]
    text = [
        "  ".join(str(c).ljust(w) for c, w in zip(row, widths, strict=True)).rstrip()
        for row in lines
    ]
    return f"top {min(top, len(rows))} of {len(rows)} trials:\n" + "\n".join(text)


def _fmt(value) -> str:
    return f"{value:.3g}" if isinstance(value, float) else str(value)


def _start_helpers(count: int, work: dict) -> list:
    """``jobs`` > 1: more processes on the same study (its storage decides who runs which
    trial); spawned, so none inherits this one's torch threads."""
    context = multiprocessing.get_context("spawn")
    helpers = [context.Process(target=_helper, args=(work,)) for _ in range(count)]
    for process in helpers:
        process.start()
    return helpers


def _helper(work: dict) -> None:
    optuna = require("optuna", "cnnkit tune")
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    with contextlib.redirect_stdout(io.StringIO()):  # the main process said it all
        base = _base(work["data_source"], work["config"], work["overrides"], work["options"])
    params = space.build(_default_space(base), work["space_file"])
    _work(optuna, base, work, _open(optuna, base, work, seeded=False), params)
