"""The ``cnnkit`` command end to end on real image files, and every bad input's one-line error."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from cnnkit.cli.main import run

FAST = ["--epochs", "2", "--model", "simple_cnn", "--quiet", "--num-workers", "0"]


def cli(capsys, *argv):
    code = run([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def test_train_eval_predict_on_image_folder(tmp_path, split_folder, capsys):
    runs = tmp_path / "runs"
    code, out, err = cli(
        capsys,
        "train",
        split_folder,
        *FAST,
        "--name",
        "t",
        f"train.out_dir={runs}",
        "--input-size",
        "32",
    )
    assert code == 0, err
    run_dir = runs / "t"
    assert "test (best weights): acc" in out
    assert (run_dir / "model.safetensors").is_file()

    code, out, err = cli(capsys, "eval", run_dir, "--json")
    assert code == 0, err
    metrics = json.loads(out)
    assert metrics["split"] == "test" and metrics["images"] == 12
    assert len(metrics["per_class"]) == 3 and len(metrics["confusion"]) == 3

    code, out, err = cli(capsys, "eval", run_dir, split_folder / "test")
    assert code == 0, err
    assert "per class" in out and "confusion matrix" in out

    images = sorted((split_folder / "test").rglob("*.*"))
    code, out, err = cli(
        capsys,
        "predict",
        run_dir / "model.safetensors",
        images[0],
        split_folder / "test" / "red",
        str(split_folder / "test" / "*" / "*.png"),
        "--top-k",
        "2",
        "--json",
    )
    assert code == 0, err
    results = json.loads(out)
    assert len(results) == 1 + 4 + 12  # one file, the red folder, every test PNG
    assert all(len(r["top"]) == 2 for r in results)
    assert {t["class"] for r in results for t in r["top"]} <= {"red", "green", "blue"}

    code, out, err = cli(capsys, "predict", run_dir, images[0], "--csv")
    assert code == 0 and out.splitlines()[0] == "input,rank,class,prob"


def test_models_lists_zoo(capsys):
    code, out, err = cli(capsys, "models", "resnet*", "--json")
    assert code == 0, err
    names = {r["name"] for r in json.loads(out)}
    assert {"resnet18", "resnet20", "resnet50"} <= names
    assert all(r["params"] > 0 for r in json.loads(out))


@pytest.mark.parametrize("verb", ["train", "eval", "predict", "models"])
def test_help_on_every_verb(capsys, verb):
    code, out, _ = cli(capsys, verb, "--help")
    assert code == 0 and "Usage" in out


def test_console_script_runs_as_a_real_process(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "cnnkit", "train", "/no/such/folder"],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        stdin=subprocess.DEVNULL,
    )
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [proc.stderr.strip()], "one line, no traceback"
    assert "/no/such/folder" in proc.stderr
    assert not (tmp_path / "runs").exists()


def _bad(tmp_path, capsys, *argv):
    code, out, err = cli(capsys, *argv)
    assert code == 2, (out, err)
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    return err


def test_missing_data_path(tmp_path, capsys):
    err = _bad(
        tmp_path, capsys, "train", tmp_path / "nothing", *FAST, f"train.out_dir={tmp_path}/r"
    )
    assert str(tmp_path / "nothing") in err
    assert not (tmp_path / "r").exists()


def test_folder_without_images(tmp_path, capsys):
    (tmp_path / "empty" / "cat").mkdir(parents=True)
    (tmp_path / "empty" / "cat" / "notes.txt").write_text("hi")
    err = _bad(tmp_path, capsys, "train", tmp_path / "empty", *FAST, f"train.out_dir={tmp_path}/r")
    assert "empty" in err
    assert not (tmp_path / "r").exists()


def test_empty_class_folder(tmp_path, image_folder, capsys):
    (image_folder / "purple").mkdir()
    err = _bad(tmp_path, capsys, "train", image_folder, *FAST, f"train.out_dir={tmp_path}/r")
    assert "purple" in err
    assert not (tmp_path / "r").exists()


def test_csv_with_missing_file_and_unknown_label(tmp_path, image_folder, capsys):
    rows = [f"{p.relative_to(image_folder)},{p.parent.name}" for p in image_folder.rglob("*.png")]
    csv = image_folder / "labels.csv"
    csv.write_text("path,label\n" + "\n".join(rows + ["red/missing.png,red"]) + "\n")
    err = _bad(tmp_path, capsys, "train", csv, *FAST, f"train.out_dir={tmp_path}/r")
    assert "missing.png" in err

    csv.write_text("path,label\n" + "\n".join(rows) + "\n")
    test_csv = image_folder / "test.csv"
    test_csv.write_text("path,label\nred/1.png,purple\n")
    err = _bad(
        tmp_path,
        capsys,
        "train",
        csv,
        *FAST,
        f"train.out_dir={tmp_path}/r",
        f"data.test={test_csv}",
    )
    assert "purple" in err


def test_unknown_model_suggests(tmp_path, capsys):
    err = _bad(
        tmp_path,
        capsys,
        "train",
        "--model",
        "resnet2",
        "--epochs",
        "1",
        f"train.out_dir={tmp_path}/r",
    )
    assert "resnet2" in err and "resnet20" in err
    assert not (tmp_path / "r").exists()


def test_unknown_config_key(tmp_path, capsys):
    err = _bad(tmp_path, capsys, "train", "optim.weight_decy=1", f"train.out_dir={tmp_path}/r")
    assert "weight_decay" in err


def test_resume_without_checkpoint(tmp_path, capsys):
    (tmp_path / "run").mkdir()
    err = _bad(tmp_path, capsys, "train", "--resume", tmp_path / "run")
    assert "no checkpoint" in err and str(tmp_path / "run") in err


def test_corrupt_image_met_during_training_is_named(tmp_path, image_folder, capsys):
    bad = image_folder / "green" / "broken.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n this is not really a png")
    code, out, err = cli(capsys, "train", image_folder, *FAST, f"train.out_dir={tmp_path}/r")
    assert code == 2, (out, err)
    assert "broken.png" in err and len(err.strip().splitlines()) == 1


def test_model_file_class_count_mismatch(tmp_path, digits_model, capsys):
    from cnnkit.engine.checkpoint import load_model_file, save_model_file

    state, meta = load_model_file(digits_model)
    meta["classes"] = meta["classes"][:5]
    save_model_file(tmp_path / "bad.safetensors", state, meta)
    err = _bad(tmp_path, capsys, "predict", tmp_path / "bad.safetensors", "x.png")
    assert "bad.safetensors" in err and "10" in err and "5" in err


def test_debug_shows_traceback(tmp_path, capsys):
    from cnnkit.errors import CnnkitError

    with pytest.raises(CnnkitError):
        run(["train", str(tmp_path / "nothing"), "--debug"])


def test_name_clash_is_refused(tmp_path, capsys):
    code, _, err = cli(capsys, "train", *FAST, "--name", "x", f"train.out_dir={tmp_path}")
    assert code == 0, err
    before = (tmp_path / "x" / "model.safetensors").read_bytes()
    err = _bad(tmp_path, capsys, "train", *FAST, "--name", "x", f"train.out_dir={tmp_path}")
    assert "already exists" in err
    assert (tmp_path / "x" / "model.safetensors").read_bytes() == before


def test_layer_spec_model_from_yaml_config(tmp_path, capsys):
    config = tmp_path / "spec.yaml"
    config.write_text(
        "model:\n  name: spec\n  kwargs:\n    layers:\n"
        "      - {conv: 16, kernel: 3, padding: 1, bn: true, act: relu}\n"
        "      - {pool: max, kernel: 2}\n"
        "      - {conv: 32, kernel: 3, dilation: 1, groups: 2, bn: true, act: gelu}\n"
        "      - {flatten: true}\n      - {dropout: 0.1}\n      - {linear: 32}\n"
        "      - {act: relu}\n"
        "train:\n  epochs: 6\noptim:\n  lr: 0.3\n"
    )
    code, out, err = cli(
        capsys,
        "train",
        "--config",
        config,
        "--quiet",
        "--name",
        "spec",
        f"train.out_dir={tmp_path}",
    )
    assert code == 0, err
    metrics = json.loads((tmp_path / "spec" / "test_metrics.json").read_text())
    assert metrics["acc"] > 0.8
    code, out, err = cli(capsys, "eval", tmp_path / "spec", "--json")
    assert code == 0 and json.loads(out)["acc"] == pytest.approx(metrics["acc"])


@pytest.mark.parametrize(
    "argv, message",
    [
        (["train", "--bogus"], "No such option: --bogus"),
        (["--debug", "train", "--epochs", "x"], "Invalid value for '--epochs'"),
        (["nosuchverb"], "No such command"),
    ],
)
def test_usage_errors_exit_2_with_click_message(capsys, argv, message):
    code, out, err = cli(capsys, *argv)
    assert code == 2 and message in err and "internal error" not in err, (out, err)
