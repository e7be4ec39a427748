"""Where a speedrun epoch's time goes: cnnkit's loop against the hand-written reference, per part.

Runs the reference loop of ``cifar10.py --reference`` and ``cnnkit.train --recipe speedrun``
alternately (``--rounds`` times) on the same data in one process, with wall-clock timers around
each part of a step: data (batch cut + augmentation), forward+backward (with zero_grad and the
loss), optimizer step, lr schedule, lookahead, metrics, progress, the non-finite check; and, once
per epoch or run, checkpoint, model file, metrics.csv, the whitening init, the final TTA
evaluation and the report. cnnkit's parts are timed by wrapping its functions here (no change to
its code); "loop rest" is the epoch's time outside every timed part. Prints a table of ms per step
(totals over all rounds / steps). Not a test: run it by hand, e.g.

    python benchmarks/speedrun_profile.py --data /tmp/cifar --epochs 1 --rounds 2
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import torch
from cifar10 import (
    FULL_EPOCHS,
    machine,
    overrides_for,
    reference_data,
    reference_run,
    run_once,
    timed,
    warm_up,
)

import cnnkit.run
from cnnkit.config import resolve as resolve_config
from cnnkit.data.memory import MemoryLoader
from cnnkit.engine import callbacks, fit, loop, runtime
from cnnkit.tasks.classification import ClassificationMetrics

# side -> part -> [wall s, CPU s]; CPU time (all threads) is the work done, which a busy shared
# machine inflates less than the wall time
TIMES: dict[str, dict[str, list[float]]] = {
    "reference": defaultdict(lambda: [0.0, 0.0]),
    "cnnkit": defaultdict(lambda: [0.0, 0.0]),
}
SIDE = ["reference"]  # whose table the timers add to
ACTIVE: set[str] = set()  # parts being timed now
PER_STEP = [
    "data",
    "to_device",
    "forward+backward",
    "non-finite check",
    "optimizer",
    "lr schedule",
    "lookahead",
    "metrics",
    "progress",
]
PER_RUN = ["init_from_data", "checkpoint", "model file", "metrics.csv", "final eval", "report"]


@contextlib.contextmanager
def phase(name: str):
    """Time a part; cnnkit's per-step parts count only inside a training epoch (its loaders and
    metrics also run in the whitening init, the final evaluation and the report)."""
    counted = name not in PER_STEP or SIDE[0] == "reference" or "epoch" in ACTIVE
    counted = counted and name not in ACTIVE  # the reference's optimizer phase holds SGD.step
    ACTIVE.add(name)
    wall, cpu = time.perf_counter(), time.process_time()
    try:
        yield
    finally:
        ACTIVE.discard(name)
        if counted:
            total = TIMES[SIDE[0]][name]
            total[0] += time.perf_counter() - wall
            total[1] += time.process_time() - cpu


def wrap(owner, attr: str, name: str) -> None:
    """Time every call of ``owner.attr`` as phase ``name``."""
    original = getattr(owner, attr)

    @functools.wraps(original)
    def timed(*args, **kwargs):
        with phase(name):
            return original(*args, **kwargs)

    setattr(owner, attr, timed)


def wrap_iter(owner, name: str) -> None:
    """Time the making of each item of ``owner.__iter__``'s iterator as phase ``name``."""
    original = owner.__iter__

    def __iter__(self):
        return timed(original(self), phase, name)

    owner.__iter__ = __iter__


def install_timers() -> None:
    wrap_iter(MemoryLoader, "data")
    wrap(runtime.Runtime, "to_device", "to_device")
    wrap(loop, "_forward_backward", "forward+backward")
    wrap(loop, "_non_finite", "non-finite check")
    wrap(torch.optim.SGD, "step", "optimizer")
    wrap(torch.optim.lr_scheduler.LambdaLR, "step", "lr schedule")
    wrap(callbacks.Lookahead, "update", "lookahead")
    wrap(ClassificationMetrics, "update", "metrics")
    wrap(ClassificationMetrics, "summary", "progress")
    wrap(callbacks.Progress, "step", "progress")
    wrap(fit, "train_one_epoch", "epoch")
    wrap(fit, "_init_from_data", "init_from_data")
    wrap(fit, "save_checkpoint", "checkpoint")
    wrap(fit, "save_model_file", "model file")
    wrap(callbacks.MetricsLog, "append", "metrics.csv")
    wrap(cnnkit.run, "_final_eval", "final eval")
    wrap(cnnkit.run, "_report_after_training", "report")


def table(steps: int) -> None:
    ref, ours = TIMES["reference"], TIMES["cnnkit"]
    for unit, k in (("wall", 0), ("CPU", 1)):
        print(f"{unit} ms per step ({steps} steps each)")
        print(f"{'part':<20} {'reference':>10} {'cnnkit':>10} {'cnnkit - ref':>13}")
        for name in [*PER_STEP, "loop rest", "epoch"]:
            values = []
            for t in (ref, ours):
                rest = t["epoch"][k] - sum(t[p][k] for p in PER_STEP)
                values.append(1000 * (rest if name == "loop rest" else t[name][k]) / steps)
            diff = values[1] - values[0]
            print(f"{name:<20} {values[0]:>10.1f} {values[1]:>10.1f} {diff:>+13.1f}")
    print(f"{'once per run/epoch':<20} {'reference':>10} {'cnnkit':>10}   (wall s, totals)")
    for name in PER_RUN:
        print(f"{name:<20} {ref[name][0]:>10.2f} {ours[name][0]:>10.2f}")


def tail(run_dir: str, tta: str | None) -> None:
    """Time the end of a trained run alone: the final test score with the recipe's TTA, then
    the report and its parts, against the run's wall time projected to the recipe's epochs."""
    from cnnkit import data, tasks
    from cnnkit.config import load
    from cnnkit.deploy.formats import load_model
    from cnnkit.evaluation import plots, report, scoring

    cfg = load(f"{run_dir}/config.yaml")
    tta = tta or cfg.train.tta
    rt = runtime.resolve(cfg.runtime)
    splits = data.build(cfg.data, seed=cfg.train.seed)
    SIDE[0] = "cnnkit"
    for name in ("collect_logits", "_mistakes", "_gradcam", "_model_summary", "render"):
        wrap(report, name, f"report: {name.strip('_')}")
    wrap(plots, "png", "report: figures to PNG")
    model = load_model(run_dir, str(rt.device))
    task = tasks.get(cfg.train.task).configured(cfg.train)
    batch = cfg.data.batch_size
    with phase("final eval"):
        metrics = scoring.score(model, splits.test, batch, rt, cfg.data, tta, task)
    with phase("report"):
        report.write_report(run_dir, model, splits.test, "test", rt, batch_size=batch,
                            data_cfg=cfg.data, **TAIL_REPORT_KW)  # fmt: skip
    t = TIMES["cnnkit"]
    rows = report.read_history(Path(run_dir) / "metrics.csv")
    epoch_s = sum(r["epoch_time"] for r in rows) / len(rows)
    run_s = FULL_EPOCHS * epoch_s + t["final eval"][0] + t["report"][0]
    print(f"{len(splits.test)} test images, tta {tta}, batch {batch}, acc {metrics['acc']:.4f}; "
          f"mean epoch of the run {epoch_s:.1f} s")  # fmt: skip
    for name, (wall, cpu) in t.items():
        print(f"{name:<28} {wall:>7.1f} s wall {cpu:>7.1f} s CPU")
    end = t["final eval"][0] + t["report"][0]
    print(f"final eval + report: {end:.1f} s = {end / run_s:.1%} of a {FULL_EPOCHS}-epoch run "
          f"at this epoch time ({run_s:.0f} s, decode left out)")  # fmt: skip


TAIL_REPORT_KW: dict = {}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default="/tmp/cifar", help="folder with train/ and test/")
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--widths", default=None, help="speedrun_net widths, e.g. 32,128,128")
    parser.add_argument("--tail", default=None, help="a trained run folder: time its end only")
    parser.add_argument("--tta", default=None, help="--tail: TTA mode (default: the run's)")
    args = parser.parse_args()
    if args.tail:
        print(f"machine: {machine()}")
        tail(args.tail, args.tta)
        return
    overrides = overrides_for("speedrun", args)
    cfg = resolve_config(args.data, recipe="speedrun", overrides=overrides)
    rt = runtime.resolve(cfg.runtime)
    print(f"machine: {machine()}")
    print(f"settings: data {args.data}, {args.rounds} round(s), overrides {overrides}, "
          f"{rt.describe()}", flush=True)  # fmt: skip
    d = reference_data(cfg)
    warm_up(cfg, d, rt)
    install_timers()
    for _ in range(args.rounds):
        SIDE[0] = "reference"
        for epoch in reference_run(cfg, d, rt, phase)["epochs"]:
            TIMES["reference"]["epoch"][0] += epoch["seconds"]
            TIMES["reference"]["epoch"][1] += epoch["cpu_seconds"]
        SIDE[0] = "cnnkit"
        with tempfile.TemporaryDirectory() as out:
            run_once(args.data, "speedrun", cfg.train.seed, overrides, out)
    steps = args.rounds * cfg.train.epochs * (len(d["train"][1]) // cfg.data.batch_size)
    table(steps)


if __name__ == "__main__":
    main()
