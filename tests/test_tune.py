"""cnnkit tune / runs / compare on digits with test_simple_cnn: real Optuna studies in SQLite, real
training, real processes (killed, or sharing one study), and the study page in a browser."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

optuna = pytest.importorskip("optuna")

import cnnkit  # noqa: E402
from cnnkit import space  # noqa: E402
from cnnkit.errors import CnnkitError  # noqa: E402

QUICK = ["train.report=false", "runtime.threads=1", "data.check_files=false"]
# lr from far too small to good, so that weak trials exist for the pruner to stop
SPACE = "optim.lr: {low: 1.0e-4, high: 0.5, log: true}\ndata.batch_size: 64\n"
SPACE += "data.mixup: null\nmodel.kwargs.depth: null\n"


def _cli(*args: str, cwd: Path, env: dict | None = None, check: bool = True):
    done = subprocess.run(
        [sys.executable, "-m", "cnnkit", *args],
        cwd=cwd,
        env={**os.environ, **(env or {})},
        capture_output=True,
        text=True,
        timeout=120,
    )
    if check:
        assert done.returncode == 0, done.stdout + done.stderr
    return done


def _states(url: str, name: str) -> list[tuple[int, str]]:
    study = optuna.load_study(study_name=name, storage=url)
    return [(t.number, t.state.name) for t in study.trials]


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    """A 6-trial median-pruned study (shared by the tests that read its results)."""
    root = tmp_path_factory.mktemp("study")
    (root / "space.yaml").write_text(SPACE)
    result = cnnkit.tune(
        "digits",
        trials=6,
        space_file=root / "space.yaml",
        study="s",
        model="test_simple_cnn",
        epochs=3,
        out_dir=str(root / "runs"),
        overrides=[*QUICK, "train.report=true"],
    )
    return result, root / "runs" / "s"


def test_a_pruned_study_writes_best_yaml_that_trains(study, tmp_path, capsys):
    result, folder = study
    states = [t.state.name for t in result.trials]
    assert len(states) == 6 and "PRUNED" in states, states
    assert {int(p.name.split("-")[1]) for p in folder.glob("trial-*")} == set(range(6))
    best = folder / "best.yaml"
    _cli("train", "--config", str(best), "--epochs", "1", "--name", "again", cwd=tmp_path)
    assert (tmp_path / "runs" / "again" / "model.safetensors").is_file()


def test_a_study_killed_mid_trial_resumes_and_finishes(tmp_path):
    url = f"sqlite:///{tmp_path / 'k.db'}"
    args = ["tune", "--trials", "3", "--epochs", "2", "--model", "test_simple_cnn"]
    args += ["--study", "k", "--storage", url, "--pruner", "none", *QUICK]  # every trial ends
    # trial 0 SIGKILLs its own process after step 2 of its second epoch (as a crash would)
    killed = _cli(*args, cwd=tmp_path, env={"CNNKIT_FAULT_INJECT": "0:1:2"}, check=False)
    assert killed.returncode == -9, killed.stdout + killed.stderr
    assert _states(url, "k") == [(0, "RUNNING")]
    done = _cli(*args, cwd=tmp_path)
    assert "trial 0: its process" in done.stdout and "marked failed" in done.stdout
    states = _states(url, "k")
    assert states[0] == (0, "FAIL")
    assert sum(s in ("COMPLETE", "PRUNED") for _, s in states) == 3, states
    lines = done.stdout.splitlines()  # a line per trial, then the table of the top trials
    assert sum(bool(re.match(r"trial +\d+  ", line)) for line in lines) == 3, done.stdout
    assert any(line.startswith("top ") for line in lines), done.stdout
    assert (tmp_path / "runs" / "k" / "best.yaml").is_file()


def test_two_processes_share_one_sqlite_study(tmp_path):
    url = f"sqlite:///{tmp_path / 'shared.db'}"
    args = ["tune", "--trials", "4", "--epochs", "1", "--model", "test_simple_cnn"]
    args += ["--study", "shared", "--storage", url, *QUICK]
    _cli(*args[: -len(QUICK)], "--trials", "0", *QUICK, cwd=tmp_path)  # creates the study
    hooks = str(Path(__file__).with_name("childhooks.py"))
    procs = [  # each waits after its first trial until the other has started one
        subprocess.Popen([sys.executable, hooks, "share-trials", str(tmp_path), name, "--", *args],
                         cwd=tmp_path, text=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        for name in ("a", "b")
    ]  # fmt: skip
    outputs = [p.communicate(timeout=120)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs), outputs
    states = _states(url, "shared")
    numbers = [n for n, _ in states]
    assert len(numbers) == len(set(numbers)) and len(numbers) >= 4, states
    assert sum(s in ("COMPLETE", "PRUNED") for _, s in states) >= 4
    assert all(any(f"trial {n:3d}" in o for o in outputs) for n in numbers)  # both worked
    assert all("trial " in o for o in outputs), outputs


def test_runs_lists_and_compare_diffs_three_runs(study, tmp_path):
    _, folder = study
    done = _cli("runs", str(folder), "--sort", "best_val", cwd=tmp_path)
    lines = done.stdout.splitlines()
    assert lines[0].split()[:4] == ["run", "model", "data", "epochs"]
    assert len(lines) == 7 and all("test_simple_cnn" in line for line in lines[1:])
    rows = json.loads(_cli("runs", str(folder), "--json", cwd=tmp_path).stdout)
    finished = [r for r in rows if r["status"] == "finished" and r["test_acc"] is not None]
    assert finished and all(r["precision"] in ("bf16", "fp32") for r in rows)
    runs = [str(folder / f"trial-{n}") for n in range(3)]
    done = _cli("compare", *runs, "--out", "cmp", cwd=tmp_path)
    assert "optim.lr: trial-0=" in done.stdout and "train.name:" in done.stdout
    assert (tmp_path / "cmp" / "compare.png").read_bytes()[:4] == b"\x89PNG"
    assert "data:image/png;base64," in (tmp_path / "cmp" / "compare.html").read_text()


def test_study_html_renders_with_every_image(study, chromium):
    _, folder = study
    page = chromium.new_page()
    page.goto((folder / "study.html").as_uri())
    images = page.eval_on_selector_all(
        "img", "els => els.map(e => e.complete && e.naturalWidth > 0)"
    )
    assert len(images) >= 4 and all(images), images  # Optuna plots + the best trial's figures
    assert page.locator("text=Parameter importances").count() == 1
    assert page.locator("a[href$='report.html']").count() >= 1


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("optim.lrr: {low: 0.01, high: 0.1}", "Did you mean 'lr'"),
        ("optim.lr: {low: 0.1, high: 0.01}", "low < high"),
        ("optim.lr: {low: 0, high: 0.1, log: true}", "low must be > 0"),
        ("optim.lr: {lo: 0.01, high: 0.1}", "Did you mean 'low'"),
        ("data.batch_size: {choices: [64, 0]}", "data.batch_size must be >= 1"),
        ("train.monitor: {choices: [val_ac]}", "Did you mean 'val_acc'"),
    ],
)
def test_a_bad_search_space_is_a_clear_error(tmp_path, text, message):
    (tmp_path / "space.yaml").write_text(text)
    with pytest.raises(CnnkitError, match=message):
        space.build(space.default_space("default", "sgd"), tmp_path / "space.yaml")


def test_tensorboard_gets_the_hparams(tmp_path):
    pytest.importorskip("tensorboard")
    result = cnnkit.train(
        "digits", model="test_simple_cnn", epochs=1, out_dir=str(tmp_path),
        overrides=[*QUICK, "train.tensorboard=true"],
    )  # fmt: skip
    events = b"".join(p.read_bytes() for p in (result.run_dir / "tensorboard").rglob("events*"))
    assert b"hparams" in events and b"optim.lr" in events


def test_each_pruner_name_builds_its_optuna_pruner():
    optuna = pytest.importorskip("optuna")
    from cnnkit import study

    assert isinstance(study._pruner(optuna, "hyperband", 5), optuna.pruners.HyperbandPruner)
    assert isinstance(study._pruner(optuna, "median", 5), optuna.pruners.MedianPruner)
    assert isinstance(study._pruner(optuna, "none", 5), optuna.pruners.NopPruner)


def test_image_mask_folders_are_tuned_in_the_segmentation_space(tmp_path, capsys):
    """A folder of image/mask pairs: the study tunes the task's parameters (AdamW's lr and
    decay, small batches, the Dice weight) on val_miou, and every trial trains."""
    from test_segmentation import make_shapes

    data = make_shapes(tmp_path / "shapes", 16, side=24)
    result = cnnkit.tune(
        str(data), trials=2, study="seg", model="test_unet", epochs=2, pruner="none",
        out_dir=str(tmp_path / "runs"), overrides=QUICK,
    )  # fmt: skip
    assert "val_miou" in capsys.readouterr().out
    assert [t.state.name for t in result.trials] == ["COMPLETE", "COMPLETE"]
    assert set(result.trials[0].params) == set(space.SEGMENTATION_SPACE)
    assert all(0 <= t.value <= 1 for t in result.trials)
    best = (tmp_path / "runs" / "seg" / "best.yaml").read_text()
    assert "task: segmentation" in best and "name: adamw" in best
