"""Data-parallel training through torchrun: real processes, gloo on the CPU."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import cnnkit
from cnnkit.cli.main import run
from cnnkit.engine.checkpoint import load_checkpoint, load_model_file
from conftest import make_folder

pytestmark = pytest.mark.distributed

NO_BN = """\
model:
  name: spec
  kwargs:
    layers:
      - {conv: 8, kernel: 3, padding: 1, act: relu}
      - {pool: max, kernel: 2}
      - {flatten: true}
      - {linear: 10}
optim:
  lr: 0.2
train:
  epochs: EPOCHS
  progress: plain
runtime:
  precision: fp32  # the runs are compared to 1e-5; bf16 autocast (native-bf16 CPUs) drifts more
"""

SCRIPT = """\
import sys, torch, cnnkit
from cnnkit.engine import distributed
config, out, name, batch = sys.argv[1:5]
result = cnnkit.train(config=config, batch_size=int(batch), name=name, out_dir=out)
rank = distributed.current().rank
torch.save(result.fit.model.state_dict(), f"{out}/{name}/rank{rank}.pt")
"""


def torchrun(tmp_path, args, nproc=2, extra_env=None, restarts=0, module=True):
    env = {**os.environ, "OMP_NUM_THREADS": "1", **(extra_env or {})}
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc-per-node={nproc}",
        f"--max-restarts={restarts}",
    ]
    command += ["-m", "cnnkit", *args] if module else args
    return subprocess.run(
        command, capture_output=True, text=True, cwd=tmp_path, env=env, timeout=600
    )


def config_file(tmp_path: Path, epochs: int) -> Path:
    path = tmp_path / f"nobn{epochs}.yaml"
    path.write_text(NO_BN.replace("EPOCHS", str(epochs)))
    return path


def test_two_processes_equal_one_process_on_the_combined_batch(tmp_path):
    config = config_file(tmp_path, epochs=2)
    script = tmp_path / "run.py"
    script.write_text(SCRIPT)
    proc = torchrun(tmp_path, [str(script), str(config), str(tmp_path), "two", "16"], module=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ranks = [torch.load(tmp_path / "two" / f"rank{r}.pt") for r in (0, 1)]
    single = cnnkit.train(config=str(config), batch_size=32, name="one", out_dir=str(tmp_path))
    one = single.fit.model.state_dict()
    for key in one:
        assert torch.equal(ranks[0][key], ranks[1][key]), key  # replicas stay identical
        torch.testing.assert_close(ranks[0][key], one[key], rtol=1e-4, atol=1e-5)

    # only rank 0 wrote the run's files (the same set a single process writes), and printed
    def listing(run):
        return sorted(str(p.relative_to(run)) for p in run.rglob("*") if "rank" not in p.name)

    assert listing(tmp_path / "two") == listing(tmp_path / "one")
    assert proc.stdout.count("training spec on digits") == 1
    assert "2 processes" in proc.stdout


def test_an_image_folder_is_decoded_once_by_the_first_process(tmp_path):
    # the first process decodes (and checks) the files into the cache while the other waits at
    # a barrier, then reads it back: no deadlock, one cache file, the same data in both
    root = make_folder(tmp_path / "imgs", per_class=8)
    cache = tmp_path / "cache"
    args = ["train", str(root), "--epochs", "1", "--quiet", "--no-report", "--batch-size", "4"]
    proc = torchrun(
        tmp_path,
        [*args, "--name", "f", f"train.out_dir={tmp_path}"],
        extra_env={"CNNKIT_CACHE_DIR": str(cache)},
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("decoding 24 images once") == 1, proc.stdout  # before the val carve
    assert len(list((cache / "decoded").glob("*.npy"))) == 1
    assert not list((cache / "decoded").glob("*tmp*"))


def test_killed_rank_restarts_and_finishes_like_an_uninterrupted_run(tmp_path, capsys):
    config = config_file(tmp_path, epochs=3)
    args = [
        "train",
        "--config",
        str(config),
        "--batch-size",
        "16",
        "train.out_dir=" + str(tmp_path),
    ]
    clean = subprocess.run(  # --nproc: cnnkit starts torchrun itself
        [sys.executable, "-m", "cnnkit", *args, "--name", "clean", "--nproc", "2"],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
        timeout=600,
    )
    assert clean.returncode == 0, clean.stderr[-3000:]
    assert "2 processes" in clean.stdout
    crashed = torchrun(
        tmp_path,
        [*args, "--name", "crashed"],
        restarts=1,
        extra_env={"CNNKIT_FAULT_INJECT": "1:1:5"},  # rank 1 dies at step 5 of epoch 2
    )
    assert crashed.returncode == 0, crashed.stderr[-3000:]
    assert "torchrun restart 1: continuing" in crashed.stdout
    a = load_checkpoint(tmp_path / "clean" / "checkpoints" / "last.pt")
    b = load_checkpoint(tmp_path / "crashed" / "checkpoints" / "last.pt")
    assert a["epoch"] == b["epoch"] == 3
    for key in a["model"]:
        assert torch.equal(a["model"][key], b["model"][key]), key

    # a finished run is not resumed; an unfinished one (its epoch-2 checkpoint) is not resumed
    # by one process either (the next test: unless allowed)
    assert run(["train", "--resume", str(tmp_path / "clean")]) == 2
    assert f"{tmp_path / 'clean'} already finished its 3 epochs" in capsys.readouterr().err
    half = tmp_path / "half"
    shutil.copytree(tmp_path / "clean", half)
    shutil.copy(half / "checkpoints" / "previous.pt", half / "checkpoints" / "last.pt")
    assert run(["train", "--resume", str(half)]) == 2
    err = capsys.readouterr().err
    assert "trained with 2 process(es) and is resumed with 1" in err, err


def test_resume_with_another_world_size_is_refused_unless_allowed(tmp_path):
    config = config_file(tmp_path, epochs=2)
    cnnkit.train(config=str(config), name="run", out_dir=str(tmp_path), stop_after=1)
    args = ["train", "--resume", str(tmp_path / "run")]
    refused = torchrun(tmp_path, args)
    assert refused.returncode != 0
    assert "trained with 1 process(es) and is resumed with 2" in refused.stderr
    allowed = torchrun(tmp_path, [*args, "--allow-world-change"])
    assert allowed.returncode == 0, allowed.stderr[-3000:]
    assert load_checkpoint(tmp_path / "run" / "checkpoints" / "last.pt")["epoch"] == 2


def test_ema_under_ddp_tracks_the_unwrapped_model(tmp_path):
    # the average of two processes' replicas (batch 16 each) is the average one process keeps
    # on the combined batch of 32; fp32, so the two are equal up to summation order
    config = config_file(tmp_path, epochs=1)
    options = ["train.ema=true", "runtime.precision=fp32", f"train.out_dir={tmp_path}"]
    proc = torchrun(
        tmp_path,
        ["train", "--config", str(config), "--batch-size", "16", "--name", "two", *options],
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    cnnkit.train(config=str(config), batch_size=32, name="one", overrides=options)
    two = load_checkpoint(tmp_path / "two" / "checkpoints" / "last.pt")
    one = load_checkpoint(tmp_path / "one" / "checkpoints" / "last.pt")
    assert two["ema"]["updates"] == one["ema"]["updates"] == 1293 // 32  # one per step
    ema = two["ema"]["module"]
    for key in one["ema"]["module"]:
        torch.testing.assert_close(ema[key], one["ema"]["module"][key], rtol=1e-4, atol=1e-5)
    assert not all(torch.allclose(ema[k], two["model"][k]) for k in ema)  # an average, not a copy
    saved, _ = load_model_file(tmp_path / "two" / "model.safetensors")
    assert all(torch.equal(saved[k], ema[k]) for k in ema)  # what the run evaluated and kept
