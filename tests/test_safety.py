"""Crash safety with real processes and files: kills, signals, full disks, poisoned batches,
damaged checkpoints, malicious pickles, and resume that refuses to drift."""

from __future__ import annotations

import errno
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import cnnkit
from cnnkit import data, tasks
from cnnkit.cli.main import run
from cnnkit.config import resolve as resolve_config
from cnnkit.data.datasets import FileImageDataset
from cnnkit.engine import checkpoint, runtime
from cnnkit.engine.checkpoint import load_checkpoint, load_latest, save_checkpoint
from cnnkit.engine.fit import fit
from cnnkit.errors import CnnkitError
from cnnkit.modelfile import load_model_file, save_model_file
from conftest import make_folder

SRC = str(Path(cnnkit.__file__).resolve().parents[1])
CHILD_ENV = {**os.environ, "PYTHONPATH": SRC, "OMP_NUM_THREADS": "1"}
HOOKS = str(Path(__file__).with_name("childhooks.py"))  # deterministic triggers in the child
# Digits with every source of randomness on: MixUp, EMA, per-step schedule, small batches.
RUN = ["data.mixup=0.2", "train.ema=true", "data.batch_size=16", "runtime.threads=1"]


def _equal_weights(a: Path, b: Path) -> None:
    sa, sb = load_checkpoint(a), load_checkpoint(b)
    assert sa["epoch"] == sb["epoch"] and sa["step"] == sb["step"] == 0
    for key in sa["model"]:
        assert torch.equal(sa["model"][key], sb["model"][key]), key
    for key in (sa["ema"] or {"module": {}})["module"]:
        assert torch.equal(sa["ema"]["module"][key], sb["ema"]["module"][key]), key


@pytest.mark.parametrize(
    "sig", [signal.SIGINT, pytest.param(signal.SIGTERM, marks=pytest.mark.slow)]
)
def test_signal_mid_epoch_then_resume_equals_uninterrupted(tmp_path, sig):
    argv = ["train", "--epochs", "2", "--quiet", "--num-workers", "0", "--name", "cut"]
    hook = [HOOKS, "signal-after-step", "2", "5", sig.name, "--"]  # inside epoch 2 of 2
    child = subprocess.run(
        [sys.executable, *hook, *argv, *RUN, f"train.out_dir={tmp_path}"],
        capture_output=True,
        text=True,
        env=CHILD_ENV,
        timeout=300,
    )
    out = child.stdout + child.stderr
    assert child.returncode == 128 + sig, out
    assert f"continue with: cnnkit train --resume {tmp_path / 'cut'}" in out
    state = load_checkpoint(tmp_path / "cut" / "checkpoints" / "last.pt")
    assert (state["epoch"], state["step"]) == (1, 5), "stopped before the step after the signal"
    resumed = cnnkit.train(resume=tmp_path / "cut")
    whole = cnnkit.train(
        epochs=2, num_workers=0, name="whole", out_dir=str(tmp_path), overrides=RUN
    )
    _equal_weights(resumed.run_dir / "checkpoints/last.pt", whole.run_dir / "checkpoints/last.pt")
    assert [r["epoch"] for r in resumed.fit.history] == [1, 2]
    assert resumed.fit.history[1]["train_loss"] == pytest.approx(whole.fit.history[1]["train_loss"])


# One process imports torch once, then forks savers and SIGKILLs each at a different moment of
# its loop of atomic saves; after every kill the latest checkpoint must load. (Used below.)
KILLER = """
import os, signal, sys, time, torch
from cnnkit.engine.checkpoint import load_checkpoint, load_latest, save_checkpoint
path = sys.argv[1]
for round_ in range(8):
    pid = os.fork()
    if pid == 0:
        for i in range(1, 10**6):
            w = torch.full((50000 + i,), float(i))
            save_checkpoint(path, {"model": {"w": w}, "i": i}, keep_previous=True)
    time.sleep(0.15 + 0.037 * round_)
    os.kill(pid, signal.SIGKILL)
    os.waitpid(pid, 0)
    state = load_checkpoint(path)
    assert state["model"]["w"].numel() == 50000 + state["i"], state["i"]
    assert load_latest(os.path.dirname(path))[0]["i"] == state["i"]
    print("killed after save", state["i"], flush=True)
"""


def test_training_killed_in_the_middle_of_a_save_resumes_from_its_latest_checkpoint(tmp_path):
    # a real training process, SIGKILLed in its 4th checkpoint save: the temporary file is
    # written, last.pt not yet replaced
    argv = ["train", "--epochs", "6", "--quiet", "--num-workers", "0", "--name", "k"]
    child = subprocess.run(
        [sys.executable, HOOKS, "kill-in-save", "4", "--", *argv, "data.batch_size=512"]
        + [f"train.out_dir={tmp_path}"],
        capture_output=True,
        text=True,
        env=CHILD_ENV,
        timeout=300,
    )
    assert child.returncode == -signal.SIGKILL, child.stdout + child.stderr
    folder = tmp_path / "k" / "checkpoints"
    assert len(list(folder.glob(".last.pt.*.tmp"))) == 1, "the kill landed inside the save"
    state, path = load_latest(folder)
    assert path.name == "last.pt" and state["epoch"] == 3
    assert cnnkit.train(resume=tmp_path / "k", stop_after=1).fit.epochs_done == 4
    assert load_checkpoint(folder / "last.pt")["epoch"] == 4
    assert load_checkpoint(folder / "previous.pt")["epoch"] == 3
    # the killed save's temporary is cleared; for the one its previous.pt link leaves, see
    # test_a_save_killed_after_linking_previous_leaves_no_temporary_behind below
    assert not list((tmp_path / "k").rglob(".last.pt.*.tmp"))


def test_sigkill_at_many_points_of_a_save_loop(tmp_path):
    path = tmp_path / "checkpoints" / "last.pt"
    done = subprocess.run(
        [sys.executable, "-c", KILLER, str(path)],
        capture_output=True,
        text=True,
        env=CHILD_ENV,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    saves = [int(line.split()[-1]) for line in done.stdout.splitlines()]
    assert len(saves) == 8 and saves[-1] > 1, done.stdout


def test_failed_write_keeps_the_old_checkpoint(tmp_path, monkeypatch):
    path = tmp_path / "last.pt"
    save_checkpoint(path, {"model": {"w": torch.ones(3)}})

    def full_disk(fd):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(checkpoint.os, "fsync", full_disk)
    with pytest.raises(CnnkitError, match="No space left on device"):
        save_checkpoint(path, {"model": {"w": torch.zeros(3)}})
    monkeypatch.undo()
    assert torch.equal(load_checkpoint(path)["model"]["w"], torch.ones(3))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.pt"]


def test_atomic_files_get_the_permissions_of_an_ordinary_file(tmp_path):
    (tmp_path / "plain").write_bytes(b"x")
    checkpoint.atomic_write_bytes(tmp_path / "atomic", b"x")  # from mkstemp: 0600 unless fixed
    assert (tmp_path / "atomic").stat().st_mode == (tmp_path / "plain").stat().st_mode


def test_a_save_killed_while_keeping_the_previous_file_leaves_no_temporary(tmp_path):
    path = tmp_path / "last.pt"
    save_checkpoint(path, {"model": {"w": torch.ones(3)}})
    (tmp_path / ".previous.pt.link.tmp").write_bytes(b"half")  # killed between link and rename
    save_checkpoint(path, {"model": {"w": torch.zeros(3)}})  # the next save clears it
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.pt"]


def test_a_save_killed_after_linking_previous_leaves_no_temporary_behind(tmp_path):
    path = tmp_path / "last.pt"
    save_checkpoint(path, {"model": {"w": torch.ones(3)}})
    os.link(path, tmp_path / "previous.pt.new")  # what the killed save had done: previous.pt
    os.replace(tmp_path / "previous.pt.new", tmp_path / "previous.pt")  # is last.pt's inode
    save_checkpoint(path, {"model": {"w": torch.zeros(3)}}, keep_previous=True)
    assert torch.equal(load_checkpoint(tmp_path / "previous.pt")["model"]["w"], torch.ones(3))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.pt", "previous.pt"]


def test_non_finite_weights_are_never_written(tmp_path):
    bad = {"w": torch.tensor([1.0, float("nan")])}
    with pytest.raises(CnnkitError, match="non-finite"):
        save_checkpoint(tmp_path / "last.pt", {"model": bad})
    with pytest.raises(CnnkitError, match="non-finite"):
        save_model_file(tmp_path / "model.safetensors", bad, {})
    assert not list(tmp_path.iterdir())


class _Evil:
    def __init__(self, target: Path):
        self.target = target

    def __reduce__(self):
        return (open, (str(self.target), "w"))  # would create the file when unpickled


def test_loading_never_runs_pickled_code(tmp_path):
    target = tmp_path / "pwned.txt"
    torch.save({"model": _Evil(target)}, tmp_path / "evil.pt")
    with pytest.raises(CnnkitError, match="evil.pt"):
        load_checkpoint(tmp_path / "evil.pt")
    with pytest.raises(CnnkitError, match="evil.pt"):
        cnnkit.train(epochs=1, out_dir=str(tmp_path / "r"), weights=str(tmp_path / "evil.pt"))
    assert not target.exists()


def test_truncated_or_foreign_files_give_clean_errors(tmp_path):
    save_checkpoint(tmp_path / "last.pt", {"model": {"w": torch.ones(1000)}})
    save_model_file(tmp_path / "m.safetensors", {"w": torch.ones(1000)}, {"arch": "x"})
    for name in ("last.pt", "m.safetensors"):
        whole = (tmp_path / name).read_bytes()
        (tmp_path / f"cut-{name}").write_bytes(whole[: len(whole) // 2])
    (tmp_path / "header.safetensors").write_bytes(b"\xff" * 8 + b"{not json")
    with pytest.raises(CnnkitError, match="cut-last.pt"):
        load_checkpoint(tmp_path / "cut-last.pt")
    for name in ("cut-m.safetensors", "header.safetensors"):
        with pytest.raises(CnnkitError, match=name):
            load_model_file(tmp_path / name)


def test_resume_falls_back_from_a_damaged_checkpoint_and_refuses_changes(tmp_path, capsys):
    options = dict(epochs=3, num_workers=0, out_dir=str(tmp_path), overrides=RUN[2:])
    part = cnnkit.train(name="part", stop_after=2, **options)
    folder = part.run_dir / "checkpoints"
    assert load_checkpoint(folder / "previous.pt")["epoch"] == 1
    last = folder / "last.pt"
    last.write_bytes(last.read_bytes()[:1000])  # damaged on disk
    assert run(["train", "--resume", str(part.run_dir), "optim.lr=0.5", "--epochs", "4"]) == 2
    err = capsys.readouterr().err.strip()
    assert "optim.lr, train.epochs changed" in err and "--resume-changed" in err
    assert len(err.splitlines()) == 1
    resumed = cnnkit.train(resume=part.run_dir, overrides=["train.progress=plain"])
    assert "resuming from the newest good checkpoint" in capsys.readouterr().out
    whole = cnnkit.train(name="whole", **options)
    _equal_weights(last, whole.run_dir / "checkpoints/last.pt")
    assert resumed.fit.epochs_done == 3


class _Poisoned(FileImageDataset):
    """A real image-folder dataset whose file ``target`` turns into NaN once ``poison`` is set."""

    poison, target = False, None

    def __getitem__(self, index: int):
        x, y = super().__getitem__(index)
        if self.poison and self.paths[index] == self.target:
            x = torch.full_like(x, float("nan"))
        return x, y


def _poisoned_run(tmp_path, policy: str):
    cfg = resolve_config(str(make_folder(tmp_path / "img")), epochs=2, num_workers=0)
    cfg.train.nan_policy, cfg.data.batch_size = policy, 8
    cfg.data.decode_cache = "off"  # stream through the dataset, so its poisoned file is read
    splits = data.build(cfg.data, seed=0)
    train = splits.train
    splits.train = _Poisoned(train.paths, train.targets, train.mode, train.transform)
    _Poisoned.target = train.paths[5]
    model = cnnkit.create_model("simple_cnn", num_classes=3, in_chans=3)
    meta = {"arch": "simple_cnn"}
    run_dir = tmp_path / "run"
    rt = runtime.resolve(cfg.runtime)
    task = tasks.get("classification")
    fit(model, splits, cfg, run_dir, meta, rt, task, stop_after=1)
    _Poisoned.poison = True  # the tests set it back
    state = load_checkpoint(run_dir / "checkpoints/last.pt")
    return run_dir, lambda: fit(model, splits, cfg, run_dir, meta, rt, task, resume=state)


def test_nan_batch_stops_naming_step_and_files(tmp_path):
    run_dir, resume = _poisoned_run(tmp_path, "stop")
    before = {p: p.read_bytes() for p in run_dir.rglob("*") if p.is_file()}
    try:
        with pytest.raises(CnnkitError, match=r"non-finite loss .* epoch 2 step \d+") as info:
            resume()
    finally:
        _Poisoned.poison = False
    assert str(_Poisoned.target) in str(info.value)
    assert {p: p.read_bytes() for p in run_dir.rglob("*") if p.is_file()} == before


def test_nan_policy_skip_counts_and_finishes(tmp_path):
    run_dir, resume = _poisoned_run(tmp_path, "skip")
    try:
        result = resume()
    finally:
        _Poisoned.poison = False
    assert result.history[-1]["skipped_steps"] == 1
    state = load_checkpoint(run_dir / "checkpoints/last.pt")
    assert state["nan_skipped"] == 1 and all(v.isfinite().all() for v in state["model"].values())


def test_resume_refuses_changed_data_unless_told(tmp_path):
    root = make_folder(tmp_path / "img", per_class=6)
    part = cnnkit.train(str(root), epochs=2, stop_after=1, num_workers=0, out_dir=str(tmp_path))
    (root / "red" / "0.jpg").write_bytes((root / "red" / "2.jpg").read_bytes())  # edited file
    with pytest.raises(CnnkitError, match="data files .*--resume-changed"):
        cnnkit.train(resume=part.run_dir)
    assert cnnkit.train(resume=part.run_dir, resume_changed=True).fit.epochs_done == 2
