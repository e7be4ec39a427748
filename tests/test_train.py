"""Training end to end through the Python API: accuracy, exact resume, the model file."""

from __future__ import annotations

import pytest
import torch

import cnnkit
from cnnkit.engine.checkpoint import load_checkpoint
from cnnkit.modelfile import load_model_file
from conftest import assert_same_checkpoints


def test_digits_reaches_95_percent(digits_result):
    result = digits_result  # cnnkit.train(epochs=8): the default model and data
    assert result.test_split == "test"
    assert result.test["acc"] >= 0.95, result.test
    run = result.run_dir
    assert run.name == "simple_cnn-digits-1"
    for name in (
        "config.yaml",
        "metrics.csv",
        "model.safetensors",
        "checkpoints/last.pt",
        "test_metrics.json",
    ):
        assert (run / name).is_file(), name
    rows = (run / "metrics.csv").read_text().splitlines()
    assert rows[0].startswith("epoch,train_loss,train_acc,val_loss,val_acc")
    assert len(rows) == 1 + 8
    assert not list(run.rglob("*.tmp")), "atomic writes leave no temp files"


@pytest.mark.parametrize("num_workers", [0, 2])
def test_resume_is_bit_exact(tmp_path, num_workers):
    # Randomness everywhere: augmentation, MixUp, dropout-free model + EMA, per-step schedule.
    options = dict(
        epochs=3,
        out_dir=str(tmp_path),
        progress="plain",
        num_workers=num_workers,
        overrides=[
            "data.pad_crop=1",
            "data.mixup=0.2",
            "train.ema=true",
            "optim.scheduler=cosine",
            "data.batch_size=64",
        ],
    )
    whole = cnnkit.train(name="whole", **options)
    part = cnnkit.train(name="part", stop_after=1, **options)
    assert load_checkpoint(part.run_dir / "checkpoints/last.pt")["epoch"] == 1
    resumed = cnnkit.train(resume=part.run_dir)
    a = assert_same_checkpoints(whole.run_dir, resumed.run_dir, epoch=3)
    assert a["ema"]["module"]  # the EMA weights were compared too
    csv_rows = (resumed.run_dir / "metrics.csv").read_text().splitlines()
    assert (
        len(csv_rows) == 4
        and csv_rows[0] == (whole.run_dir / "metrics.csv").read_text().splitlines()[0]
    )


def test_model_file_round_trip(digits_result):
    result = digits_result
    state, meta = load_model_file(result.run_dir / "model.safetensors")
    assert meta["arch"] == "simple_cnn" and meta["classes"] == [str(i) for i in range(10)]
    assert meta["preprocessing"]["input_size"] == [8, 8]
    model = cnnkit.load_model(result.run_dir)
    for key, value in model.state_dict().items():
        assert torch.equal(value, state[key])
    again = cnnkit.load_model(result.run_dir / "model.safetensors")
    x = torch.randn(4, 1, 8, 8)
    with torch.no_grad():
        assert torch.equal(model(x), again(x))
    metrics = cnnkit.evaluate(result.run_dir)
    assert metrics["split"] == "test"
    assert metrics["acc"] == pytest.approx(result.test["acc"])


def test_checkpoint_is_weights_only(digits_result):
    state = torch.load(digits_result.run_dir / "checkpoints/last.pt", weights_only=True)
    assert set(state) >= {"model", "optimizer", "scheduler", "rng", "tracker", "config", "epoch"}


def test_early_stop_when_monitor_stalls(tmp_path):
    # lr 0: nothing changes, so val_acc stops improving after the first epoch.
    result = cnnkit.train(
        epochs=6,
        out_dir=str(tmp_path),
        progress="plain",
        overrides=["optim.lr=0", "optim.scheduler=constant", "train.patience=2"],
    )
    assert result.fit.stopped_early and result.fit.epochs_done == 3


@pytest.mark.parametrize("scheduler", ["onecycle", "cosine", "step", "plateau", "constant"])
def test_adamw_with_each_scheduler_learns(tmp_path, scheduler):
    result = cnnkit.train(
        epochs=4,
        out_dir=str(tmp_path),
        progress="plain",
        overrides=[
            "optim.name=adamw",
            f"optim.scheduler={scheduler}",
            "optim.lr=3e-3",
            "train.grad_clip=1.0",
        ],
    )
    assert result.test["acc"] > 0.8


def test_tensorboard_logging(tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    result = cnnkit.train(
        epochs=2, out_dir=str(tmp_path), progress="plain", overrides=["train.tensorboard=true"]
    )
    events = EventAccumulator(str(result.run_dir / "tensorboard"))
    events.Reload()
    assert [e.step for e in events.Scalars("val_acc")] == [1, 2]
    assert events.Scalars("train_loss")[-1].value == pytest.approx(
        result.fit.history[-1]["train_loss"], rel=1e-6
    )


def test_no_validation_split(tmp_path):
    from cnnkit.errors import CnnkitError

    with pytest.raises(CnnkitError, match="no validation split"):
        cnnkit.train(
            epochs=1,
            out_dir=str(tmp_path),
            overrides=["data.val_fraction=0", "optim.scheduler=plateau"],
        )
    assert not any(tmp_path.iterdir()), "a refused run leaves nothing behind"
    result = cnnkit.train(
        epochs=2, out_dir=str(tmp_path), progress="plain", overrides=["data.val_fraction=0"]
    )
    assert result.test_split == "test" and result.fit.epochs_done == 2
    assert (result.run_dir / "model.safetensors").is_file()
